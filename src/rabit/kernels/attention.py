"""Causal self-attention for the forward passes that need no gradient, through transformers' attention registry.

``fast_attention()`` (a context manager; nestable) puts ``attention_forward`` in place of transformers' "sdpa"
attention function while it is open, so that every model loaded with SDPA attention (transformers' default) uses it
without a change to its config (nothing of it is saved with a model). Each call takes the native kernel
(``attention_cpu``) when it applies and otherwise calls transformers' own SDPA function with the same arguments:

- the kernel: bf16 CPU tensors, or fp32 ones under bf16 autocast (cast as autocast casts them for SDPA), on a CPU
  with AVX-512 BF16 or AVX2 + FMA; fp32 CPU tensors otherwise (the passes of CPUs without native bf16), on a CPU
  with AVX2 + FMA (KERNEL_ISAS gives the paths per dtype); no gradient wanted, no attention mask
  (transformers leaves it out when plain causal attention is meant), as many queries as keys, no dropout, a head
  size that is a multiple of 32 up to 256, none of softcap, position bias or attention sinks;
- everything else (training the student, padding or sliding-window masks, decoding steps, fp16, GPUs):
  torch's ``scaled_dot_product_attention`` as before.

``RABIT_ATTENTION=torch`` turns the kernel off, ``RABIT_ATTENTION=avx2`` (or another of the kernel's paths) picks
a path (for A/B measurements; ``avx512bf16``, a bf16 instruction set, leaves fp32 inputs to torch); unset or
``auto``: the CPU's best path for the inputs' dtype, where it is one of KERNEL_ISAS.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import attention_cpu

ENV_VAR = "RABIT_ATTENTION"
# the native paths faster than torch's kernel, per input dtype, best first (docs/RESULTS.md sections 48-50); the
# portable C ones are slower
KERNEL_ISAS = {torch.bfloat16: ("avx512bf16", "avx2"), torch.float32: ("avx2",)}
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")
_lock = threading.Lock()
_depth = 0
_original = None
_paths: dict[torch.dtype, list[str]] = {}


def kernel_isa(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """The native kernel's path that fast_attention() runs for inputs of `dtype`, or None (torch's SDPA):
    RABIT_ATTENTION's choice ("torch": none; a path's name: that one, or none where it has no version for `dtype`),
    else the CPU's best path where it is one of KERNEL_ISAS[dtype]."""
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting == "torch":
        return None
    if setting not in ("", "auto") and setting not in attention_cpu.ISA_CODES:
        raise ValueError(f"{ENV_VAR}={setting!r}: expected torch, auto or one of the kernel's paths "
                         f"{sorted(n for n in attention_cpu.ISA_CODES if n != 'auto')}")
    if dtype not in KERNEL_ISAS:
        return None
    paths = _runnable(dtype)
    if setting in ("", "auto"):
        return next((p for p in KERNEL_ISAS[dtype] if p in paths), None)
    if setting not in paths:
        runnable = sorted({p for dt in KERNEL_ISAS for p in _runnable(dt)})
        if setting in runnable:   # a path of the other dtype (avx512bf16 for fp32 inputs): torch's kernel runs these
            return None
        raise ValueError(f"{ENV_VAR}={setting}: this CPU (or build) cannot run that path; it runs {runnable or 'none'}")
    return setting


def _runnable(dtype: torch.dtype) -> list[str]:
    if dtype not in _paths:
        _paths[dtype] = attention_cpu.available_isas(dtype) if attention_cpu.is_available() else []
    return _paths[dtype]


def kernel_inputs(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                  dropout: float = 0.0, is_causal: bool | None = None, **kwargs):
    """(path, query, key, value): the kernel's path (kernel_isa) and the tensors it runs for these arguments (cast as
    autocast would), or None where it does not apply (see the module's docstring). The checks that need no cast come
    first: the student's training forward (gradients wanted) is turned away before any copy is made."""
    if attention_mask is not None or dropout != 0.0 or kwargs.get("output_attentions"):
        return None
    if any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS):
        return None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t = query.shape[2]
    window = kwargs.get("sliding_window")
    if not causal or t < 2 or (window is not None and t > window):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    # fp32 under bf16 autocast runs as bf16 (cast as autocast casts them for SDPA)
    isa = kernel_isa(torch.bfloat16 if query.dtype == torch.float32 and _autocast_bf16(query) else query.dtype)
    if isa is None:
        return None
    q, k, v = (_autocast_cast(x) for x in (query, key, value))
    return (isa, q, k, v) if attention_cpu.supports(q, k, v) else None


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (attention output (batch, T, heads, head_dim), None)."""
    inputs = kernel_inputs(module, query, key, value, attention_mask, dropout, is_causal, **kwargs)
    if inputs is not None:
        isa, q, k, v = inputs
        return attention_cpu.causal_attention(q, k, v, scale=scaling, isa=isa), None
    return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                   **kwargs)


def _autocast_cast(t: torch.Tensor) -> torch.Tensor:
    """What CPU autocast to bf16 hands torch's SDPA (an op it runs in bf16): under bf16 autocast the queries and keys
    arrive in fp32 (rotary embeddings multiply the bf16 projections by fp32 tables), and SDPA would cast them."""
    return t.to(torch.bfloat16) if t.dtype == torch.float32 and _autocast_bf16(t) else t


def _autocast_bf16(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _registry():
    from transformers.modeling_utils import AttentionInterface
    return AttentionInterface


def _sdpa():
    if _original is not None:
        return _original
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


@contextlib.contextmanager
def fast_attention():
    """While open, models with SDPA attention run causal forward passes without gradient on the native kernel
    where it applies (see the module's docstring). Nestable; restores transformers' function on the outermost exit."""
    global _depth, _original
    registry = _registry()
    with _lock:
        if _depth == 0:
            _original = registry._global_mapping["sdpa"]
            registry.register("sdpa", attention_forward)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                registry.register("sdpa", _original)
                _original = None
