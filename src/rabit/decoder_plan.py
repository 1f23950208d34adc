"""What the static-cache decoder (rabit.generate.StaticDecoder) must do differently per model family.

Families covered, each checked against the Hugging Face forward pass on tiny random configs (tests/test_families.py):

* Llama, Qwen 3: the reference layout (pre-norms, rotary embedding, gated MLP).
* Qwen 2 / 2.5: q/k/v biases (carried by the projection modules) and optional sliding-window layers.
* Mistral: sliding-window attention on every layer (``config.sliding_window``).
* Gemma 3 (text): alternating sliding-window and global layers with their own rotary tables, q/k norms, the
  (1 + w) RMSNorm and sqrt(hidden) embedding scaling (inside the model's modules, which the decoder calls),
  norms after attention and around the MLP, final-logit soft-capping, tied embeddings. transformers' Gemma 3
  attention does not apply ``attn_logit_softcapping`` (released Gemma 3 configs leave it None); neither do we.
* Gemma 2: the same layout with one rotary table, and attention-score soft-capping.

A query at position i of a sliding layer with window W attends to keys j with i - W < j <= i (as transformers'
``sliding_window_overlay``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GEMMA = ("gemma2", "gemma3_text")
FAMILIES = LLAMA_LIKE + GEMMA
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DecoderPlan:
    family: str
    windows: tuple            # per layer: the sliding window W, or None for global attention
    rope_types: tuple         # per layer: the layer_type given to the rotary embedding (Gemma 3), or None
    sandwich_norms: bool      # Gemma: post_attention_layernorm after attention, pre/post_feedforward_layernorm
    attn_softcap: float | None = None
    final_softcap: float | None = None


def decoder_plan(model: nn.Module) -> tuple[DecoderPlan | None, str]:
    """(plan, "") for a model StaticDecoder can run, else (None, why not)."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in FAMILIES:
        return None, f"model_type {mtype!r} is not one of {FAMILIES}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return None, "no model.model.layers / rotary_emb"
    if getattr(model, "lm_head", None) is None:
        return None, "no lm_head"
    n = len(inner.layers)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if layer_types and (len(layer_types) != n or any(t not in _LAYER_TYPES for t in layer_types)):
        return None, f"layer types {sorted(set(layer_types))} (supported: {_LAYER_TYPES})"
    window = getattr(cfg, "sliding_window", None)
    if layer_types:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        if any(t == "sliding_attention" for t in layer_types) and not window:
            return None, "sliding-attention layers without a sliding_window"
    elif mtype == "mistral":   # Mistral applies its window (when set) to every layer
        windows = (window,) * n
    else:
        windows = (None,) * n
    if mtype in GEMMA:
        if getattr(cfg, "use_bidirectional_attention", False):
            return None, "bidirectional attention"
        gemma3 = mtype == "gemma3_text"
        rope_types = tuple(layer_types or ("full_attention",) * n) if gemma3 else (None,) * n
        return DecoderPlan(mtype, windows, rope_types, True,
                           None if gemma3 else getattr(cfg, "attn_logit_softcapping", None),
                           getattr(cfg, "final_logit_softcapping", None)), ""
    return DecoderPlan(mtype, windows, (None,) * n, False), ""


__all__ = ["DecoderPlan", "decoder_plan", "FAMILIES"]
