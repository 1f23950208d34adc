"""Orthogonal rotation of a decoder's residual stream before quantization (QuaRot / SpinQuant's R1, offline only).

A pre-norm decoder computes the same function after three exact rewrites, and its linear layers then hold weights
without the outlier channels the residual stream carries (flatter rows and columns, which a binary path with
one scale per row and per column approximates better; docs/RESULTS.md section 35):

1. every RMSNorm weight is folded into the linear layers that read the norm's output (q/k/v after the attention's
   norm, gate/up after the MLP's, the output head after the final one), and the norms keep a weight of ones;
2. the residual stream is rotated by an orthogonal Q (d x d): the embeddings become E Q, the layers that read the
   stream W Q, the layers that write to it (o_proj, down_proj) Q^T W. RMSNorm without a weight commutes with Q
   (it preserves the norm), so every layer sees the rotated stream and undoes the rotation exactly;
3. optionally each attention head's values are rotated too (SpinQuant's R2): v_proj's rows per head R^T, o_proj's
   columns per head R.

Nothing is added at inference: the rotated model is an ordinary model of the same architecture. The price is that
a head tied to the embeddings becomes a tensor of its own (E diag(w_final) Q differs from E Q): the saved model
stores the head as well (for SmolLM2-135M +56 MB in bf16 beside the 2-bit layers' 28 MB; `--embed-bits` shrinks
both). Llama-style decoders only (Llama, Mistral, Qwen 2/2.5/3): Gemma's (1 + w) norms and its norms after the
attention and the MLP do not fold.
"""
from __future__ import annotations

import torch
from torch import nn

# the attribute rotate_ leaves on a model (copied with it, saved in its quantization_config, read back at load):
# {"seed": int, "values": bool}, what rabit diagnose needs to rotate the full-precision teacher the same way
ROTATION_ATTR = "rabit_rotation"

# architectures whose decoder layers are exactly: x += o(attn(norm1(x))); x += down(act(gate(n)) * up(n)), n = norm2(x)
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_LAYER_NORMS = {"input_layernorm", "post_attention_layernorm"}
_HEAD_NORMS = {"q_norm", "k_norm"}   # Qwen 3: per-head norms after q/k, untouched by a rotation of the stream


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal d x d matrix (float64), reproducible from (d, seed) (a seeded CPU generator)."""
    if d < 1:
        raise ValueError(f"random_orthogonal: d must be positive, got {d}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))   # the sign fix makes the distribution Haar (and Q unique)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot be rotated (None: it can)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not a supported architecture for --rotate (supported: {', '.join(SUPPORTED)})"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        return f"{name} has no model.embed_tokens / layers / norm"
    for i, layer in enumerate(inner.layers):
        norms = {n for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() and n}
        extra = norms - _LAYER_NORMS - {f"self_attn.{h}" for h in _HEAD_NORMS}
        if extra or not _LAYER_NORMS <= norms:
            return f"layer {i} has norms {sorted(norms)}, not exactly {sorted(_LAYER_NORMS)}"
        a, m = layer.self_attn, layer.mlp
        if not all(hasattr(a, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i} lacks q/k/v/o_proj or gate/up/down_proj"
    if getattr(model, "lm_head", None) is None:
        return f"{name} has no lm_head"
    return None


@torch.no_grad()
def rotate_residual_(model: nn.Module, q: torch.Tensor, head_q: torch.Tensor | None = None) -> nn.Module:
    """Fold the norms into the layers and rotate the residual stream by q (and the values by head_q), in place.

    q: orthogonal (d, d), d the hidden size; head_q: orthogonal (head_dim, head_dim) or None. Returns `model`.
    Raises ValueError (and changes nothing) for an unsupported model or a q of the wrong shape.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(reason)
    inner = model.model
    d = inner.embed_tokens.weight.shape[1]
    if q.shape != (d, d):
        raise ValueError(f"rotation is {tuple(q.shape)}, the hidden size is {d}")
    if head_q is not None:
        hd = inner.layers[0].self_attn.head_dim if hasattr(inner.layers[0].self_attn, "head_dim") else None
        if hd is None or head_q.shape != (hd, hd):
            raise ValueError(f"head rotation is {tuple(head_q.shape)}, the head dimension is {hd}")
    q = q.to(torch.float64)

    def reads(lin: nn.Linear, norm_w: torch.Tensor) -> None:      # W diag(w) Q
        w = lin.weight.to(torch.float64) * norm_w.to(torch.float64)[None, :]
        lin.weight.copy_((w @ q.to(w.device)).to(lin.weight.dtype))

    def writes(lin: nn.Linear) -> None:                           # Q^T W (and the bias b Q)
        qd = q.to(lin.weight.device)
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.to(torch.float64) @ qd).to(lin.bias.dtype))
        lin.weight.copy_((qd.T @ lin.weight.to(torch.float64)).to(lin.weight.dtype))

    emb, head = inner.embed_tokens.weight, model.lm_head.weight
    new_head = torch.empty_like(head)   # a tensor of its own: a tied head no longer equals the embeddings
    _rows_times(head, inner.norm.weight.to(torch.float64)[:, None] * q, new_head)
    model.lm_head.weight = nn.Parameter(new_head, requires_grad=head.requires_grad)
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()
                }.values():
        cfg.tie_word_embeddings = False
    inner.norm.weight.fill_(1.0)
    _rows_times(emb, q, emb)
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            reads(lin, layer.input_layernorm.weight)
        for lin in (m.gate_proj, m.up_proj):
            reads(lin, layer.post_attention_layernorm.weight)
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        writes(a.o_proj)
        writes(m.down_proj)
        if head_q is not None:
            _rotate_values(a, head_q.to(torch.float64))
    return model


def _rows_times(w: torch.Tensor, m: torch.Tensor, out: torch.Tensor, rows: int = 8192) -> None:
    """out = w @ m in float64, a slice of rows at a time (a 128k-token vocabulary in float64 at once is GBs)."""
    m = m.to(w.device)
    for r in range(0, w.shape[0], rows):
        out[r:r + rows] = (w[r:r + rows].to(torch.float64) @ m).to(out.dtype)


def _rotate_values(attn: nn.Module, r: torch.Tensor) -> None:
    """v' = v R per head: v_proj's rows (and bias) R^T per head, o_proj's input columns R per head."""
    hd = r.shape[0]
    v, o = attn.v_proj, attn.o_proj
    rv = r.to(v.weight.device)
    wv = v.weight.to(torch.float64).view(-1, hd, v.weight.shape[1])
    v.weight.copy_(torch.einsum("ji,hjd->hid", rv, wv).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.to(torch.float64).view(-1, hd) @ rv).reshape(-1).to(v.bias.dtype))
    wo = o.weight.to(torch.float64).view(o.weight.shape[0], -1, hd)
    o.weight.copy_((wo @ r.to(o.weight.device)).reshape(o.weight.shape).to(o.weight.dtype))


def rotate_(model: nn.Module, seed: int = 0, values: bool = True, check: bool = True) -> nn.Module:
    """Rotate `model` in place with the Haar-random rotations of `seed` (see the module docstring).

    check: compare the logits of a short random sequence before and after, and raise RuntimeError if they moved
    by more than fp32 rounding (an architecture whose layers differ from what the rewrite assumes).
    Records {"seed", "values"} on the model (ROTATION_ATTR): a saved quantized model keeps it, so that the
    full-precision teacher can be rotated the same way later (rabit diagnose).
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(reason)
    if getattr(model, ROTATION_ATTR, None) is not None:
        raise ValueError(f"this model was rotated before ({getattr(model, ROTATION_ATTR)}): rotating it again would "
                         "leave a record that no longer says how to rebuild its teacher")
    d = model.model.embed_tokens.weight.shape[1]
    attn = model.model.layers[0].self_attn
    head_q = random_orthogonal(attn.head_dim, seed + 1) if values else None
    ids = None
    if check:
        g = torch.Generator().manual_seed(seed)
        vocab = model.model.embed_tokens.weight.shape[0]
        ids = torch.randint(0, vocab, (1, 32), generator=g).to(model.model.embed_tokens.weight.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            before = model(ids).logits.float()
    rotate_residual_(model, random_orthogonal(d, seed), head_q)
    if check:
        with torch.no_grad():
            after = model(ids).logits.float()
        model.train(was_training)
        rel = ((after - before).norm() / before.norm().clamp_min(1e-30)).item()
        if not rel < 1e-3:
            raise RuntimeError(f"rotating {type(model).__name__} changed its logits by {rel:.2e} (relative): its "
                               "layers are not the pre-norm form the rotation assumes")
    setattr(model, ROTATION_ATTR, {"seed": int(seed), "values": bool(values)})
    return model


def check_rotation_record(rot, source: str = "rotation") -> dict:
    """A saved rotation record ({"seed": int, "values": bool}); raises ValueError naming `source`."""
    if not (isinstance(rot, dict) and set(rot) == {"seed", "values"} and isinstance(rot["seed"], int)
            and not isinstance(rot["seed"], bool) and isinstance(rot["values"], bool)):
        raise ValueError(f"{source}: expected {{\"seed\": int, \"values\": bool}}, got {rot!r}")
    return rot
