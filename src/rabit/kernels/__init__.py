"""One entry point for RaBiT linear layers: ``rabit_linear`` picks a backend at run time.

Backends
  "reference"  plain PyTorch (unpack the sign planes to +-1, dense matmuls); any device, differentiable.
  "cpu"        native C kernel (lookup tables over 4 inputs, AVX-512/AVX2/scalar picked at run time, OpenMP
               threads); CPU tensors.  Built with the system C compiler on first use.
  "triton"     Triton GEMV (decode) / GEMM (prefill) kernels; CUDA tensors, needs ``triton``.

``backend="auto"`` (default) takes ``$RABIT_KERNEL_BACKEND`` if set, else "triton" for CUDA tensors when
available, "cpu" for CPU tensors when the native library builds, and "reference" otherwise (with a one-time
warning when an accelerated backend was expected but is unavailable).  Gradients: when autograd would need to
flow through the call, "auto" uses the reference (the native kernels are inference-only).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import cpu as _cpu
from .reference import dense_weight_reference, rabit_linear_reference

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "RABIT_KERNEL_BACKEND"
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _triton_available() -> bool:
    try:
        from . import triton_gemv
    except Exception:  # noqa: BLE001
        return False
    return triton_gemv.is_available()


def backend_available(name: str) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return _cpu.is_available()
    if name == "triton":
        return _triton_available()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends() -> list[str]:
    """Backends usable in this process (building the CPU kernel if needed)."""
    return [b for b in BACKENDS if backend_available(b)]


def _supports(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    return device.type == "cuda"


def select_backend(x: torch.Tensor, backend: str | None = "auto", needs_grad: bool = False) -> str:
    """The backend ``rabit_linear`` would use for this input."""
    if backend is None or backend == "auto":
        forced = os.environ.get(ENV_VAR)
        if forced is None and not needs_grad and x.is_cpu and _cpu._lib is not None:
            return "cpu"                                             # fast path of the common case
        forced = (forced or "").strip().lower()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {BACKENDS} or 'auto'")
            if not _supports(forced, x.device):
                _warn_once(f"env-{forced}-{x.device.type}",
                           f"{ENV_VAR}={forced} cannot run on {x.device.type} tensors; using 'reference'")
                return "reference"
            if not backend_available(forced):
                _warn_once(f"env-{forced}", f"{ENV_VAR}={forced} is unavailable "
                           f"({_why_unavailable(forced)}); falling back to the slow 'reference' backend")
                return "reference"
            return forced
        if needs_grad:
            return "reference"
        if x.device.type == "cpu":
            if _cpu.is_available():
                return "cpu"
            _warn_once("cpu", f"{_why_unavailable('cpu')}; falling back to the slow 'reference' backend")
            return "reference"
        if x.device.type == "cuda":
            if _triton_available():
                return "triton"
            _warn_once("triton", "triton is not available; RaBiT layers on CUDA use the slow 'reference' backend")
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")
    if not _supports(backend, x.device):
        raise ValueError(f"backend {backend!r} cannot run on {x.device.type} tensors")
    if not backend_available(backend):
        raise RuntimeError(f"backend {backend!r} is unavailable: {_why_unavailable(backend)}")
    return backend


def _why_unavailable(name: str) -> str:
    if name == "cpu":
        return _cpu.build_error() or "rabit CPU kernel unavailable"
    if name == "triton":
        return "triton is not importable or CUDA is not available"
    return "unavailable"


def rabit_linear(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                 bias: torch.Tensor | None = None, backend: str | None = "auto") -> torch.Tensor:
    """y = sum_i g_i * (B_i @ (h_i * x)) + bias for a packed RaBiT layer.

    x:      (..., in_features), float32 / bfloat16 / float16; the result has x's dtype and shape (..., out).
    packed: uint8 sign planes in the ``rabit.sign_bits`` layout, shape sign_bits.packed_shape(k, out, in).
    g:      (k, out) per-output scales; h: (k, in) per-input scales (any float dtype).
    bias:   (out,) or None.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or g.requires_grad or h.requires_grad or (bias is not None and bias.requires_grad))
    name = select_backend(x, backend, needs_grad)
    if name == "cpu":
        return _cpu.rabit_linear_cpu(x, packed, g, h, bias)
    if name == "triton":
        from .triton_gemv import rabit_linear_triton
        return rabit_linear_triton(x, packed, g, h, bias)
    return rabit_linear_reference(x, packed, g, h, bias)


def dense_weight(packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dtype: torch.dtype = torch.float32,
                 backend: str | None = "auto") -> torch.Tensor:
    """The dense (out, in) weight sum_i g_i B_i h_i."""
    if packed.device.type == "cpu" and backend in (None, "auto", "cpu") and _cpu.is_available():
        return _cpu.dense_weight_cpu(packed, g, h).to(dtype)
    return dense_weight_reference(packed, g, h, dtype=dtype)


__all__ = ["BACKENDS", "ENV_VAR", "available_backends", "backend_available", "select_backend", "rabit_linear",
           "dense_weight", "rabit_linear_reference", "dense_weight_reference"]
