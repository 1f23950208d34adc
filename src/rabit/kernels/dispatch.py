"""Backend selection and the one registered operator for the packed RaBiT linear, ``rabit::packed_linear``.

``rabit_linear`` is the entry point every caller uses (``PackedRaBiTLinear``, the decoders of ``rabit.generate``,
the benchmarks). ``torch.ops.rabit.packed_linear`` is its registered form: a ``torch.library`` custom op with a
fake (meta) implementation, so ``torch.compile`` keeps one graph around the native kernels, and an autograd
formula computed with the plain PyTorch reference, so gradients are right whichever backend ran the forward.
Eager calls that need no gradient skip the dispatcher and run the same implementation directly: the custom-op
dispatch costs tens of microseconds per call on a CPU, as much as a whole small GEMV, and a decoding step makes
hundreds of these calls.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..errors import BackendUnavailable
from . import cpu as _cpu
from . import groupwise_cpu as _groupwise_cpu
from .reference import dense_weight_reference, groupwise_linear_reference, rabit_linear_reference

BACKENDS = ("reference", "cpu", "cpu_int8", "triton")
_CPU_BACKENDS = ("cpu", "cpu_int8")
ENV_VAR = "RABIT_KERNEL_BACKEND"
OP_NAME = "rabit::packed_linear"
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _triton_available() -> bool:
    try:
        from . import triton_gemv
    except Exception:  # noqa: BLE001
        return False
    return triton_gemv.is_available()


def backend_available(name: str) -> bool:
    if name == "reference":
        return True
    if name in _CPU_BACKENDS:
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
    if name in _CPU_BACKENDS:
        return device.type == "cpu"
    return device.type == "cuda"


def _why_unavailable(name: str) -> str:
    if name in _CPU_BACKENDS:
        return _cpu.build_error() or "rabit CPU kernel unavailable"
    if name == "triton":
        return "triton is not importable or CUDA is not available"
    return "unavailable"


def select_backend(x: torch.Tensor, backend: str | None = "auto", needs_grad: bool = False) -> str:
    """The backend ``rabit_linear`` would use for this input."""
    if backend in _CPU_BACKENDS and x.is_cpu and _cpu._lib is not None:
        return backend                                               # fast path of the decoders
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
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {_why_unavailable(backend)}")
    return backend


def _run(name: str, x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
         bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """Run the backend `name` (already selected); threads <= 0: torch's thread count."""
    if name in _CPU_BACKENDS:
        return _cpu.linear(x, packed, g, h, bias, threads if threads > 0 else None, lut8=name == "cpu_int8")
    if name == "triton":
        from .triton_gemv import rabit_linear_triton
        return rabit_linear_triton(x, packed, g, h, bias)
    return rabit_linear_reference(x, packed, g, h, bias)


@torch.library.custom_op(OP_NAME, mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                  bias: torch.Tensor | None, backend: str, threads: int) -> torch.Tensor:
    # a custom op may not return one of its inputs or a view of one (a 0-row reshape can be)
    y = _run(select_backend(x, backend), x, packed, g, h, bias, threads)
    return y.clone() if y._base is not None or y is x else y


@packed_linear.register_fake
def _(x, packed, g, h, bias, backend, threads):
    return x.new_empty(*x.shape[:-1], g.shape[-1])


def _setup_context(ctx, inputs, output):
    x, packed, g, h, bias, _backend, _threads = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, packed, g, h, *((bias,) if bias is not None else ()))


def _backward(ctx, grad):
    """Gradients of the reference computation (the same function every backend computes)."""
    x, packed, g, h, *rest = ctx.saved_tensors
    bias = rest[0] if ctx.has_bias else None
    inputs = {0: x, 2: g, 3: h, 4: bias}
    with torch.enable_grad():
        leaves = {i: t.detach().requires_grad_() for i, t in inputs.items()
                  if t is not None and ctx.needs_input_grad[i]}
        args = [leaves.get(i, t) for i, t in inputs.items()]
        y = rabit_linear_reference(args[0], packed, *args[1:])
        grads = torch.autograd.grad(y, list(leaves.values()), grad) if leaves else ()
    out = [None] * 7
    for i, gr in zip(leaves, grads):
        out[i] = gr
    return tuple(out)


packed_linear.register_autograd(_backward, setup_context=_setup_context)


def rabit_linear(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                 bias: torch.Tensor | None = None, backend: str | None = "auto",
                 threads: int | None = None) -> torch.Tensor:
    """y = sum_i g_i * (B_i @ (h_i * x)) + bias for a packed RaBiT layer.

    x:       (..., in_features), float32 / bfloat16 / float16; the result has x's dtype and shape (..., out).
    packed:  uint8 sign planes in the ``rabit.sign_bits`` layout, shape sign_bits.packed_shape(k, out, in).
    g:       (k, out) per-output scales; h: (k, in) per-input scales (any float dtype). bias: (out,) or None.
    backend: "auto", "reference", "cpu", "cpu_int8" or "triton" (see ``select_backend``). "cpu_int8" rounds
             one-row inputs' lookup tables to int8 (decoding; relative error ~5e-3); "auto" never picks it.
    threads: threads of the native CPU kernel (None: ``torch.get_num_threads()``).
    """
    backend = backend or "auto"
    if torch.compiler.is_compiling():
        return torch.ops.rabit.packed_linear(x, packed, g, h, bias, backend, threads or 0)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or g.requires_grad or h.requires_grad or (bias is not None and bias.requires_grad))
    name = select_backend(x, backend, needs_grad)
    if name == "reference":
        return rabit_linear_reference(x, packed, g, h, bias)       # plain PyTorch: autograd as usual
    if needs_grad:                                                 # a fast forward, the reference's gradients
        return torch.ops.rabit.packed_linear(x, packed, g, h, bias, name, threads or 0)
    return _run(name, x, packed, g, h, bias, threads or 0)


def dense_weight(packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dtype: torch.dtype = torch.float32,
                 backend: str | None = "auto") -> torch.Tensor:
    """The dense (out, in) weight sum_i g_i B_i h_i."""
    if packed.device.type == "cpu" and backend in (None, "auto", "cpu") and _cpu.is_available():
        return _cpu.dense_weight_cpu(packed, g, h).to(dtype)
    return dense_weight_reference(packed, g, h, dtype=dtype)


# Up to this many input rows the group-quantized linear runs the native kernel (one pass over the codes per 4
# rows); above it, blocks of dequantized rows and torch's GEMM are faster (prefill).
GROUPWISE_KERNEL_MAX_ROWS = 8


def groupwise_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                     bias: torch.Tensor | None = None, backend: str | None = "auto") -> torch.Tensor | None:
    """y = x @ W^T + bias for a group-quantized W (``rabit.embedquant.quantize_groupwise``'s codes and fp16
    scales), or None when no kernel applies and the caller should use its own dequantize-and-GEMM path.

    backend: "auto" (the native CPU kernel for CPU inputs of at most GROUPWISE_KERNEL_MAX_ROWS rows that need no
    gradient, when it builds), "cpu" (always the kernel; raises if unavailable) or "reference" (dequantize all).
    """
    backend = backend or "auto"
    if backend == "reference":
        return groupwise_linear_reference(x, codes, scales, bits, group_size, bias)
    if backend == "cpu":
        if not _groupwise_cpu.is_available():
            raise BackendUnavailable(f"backend 'cpu' is unavailable: {_groupwise_cpu.build_error()}")
        return _groupwise_cpu.groupwise_linear_cpu(x, codes, scales, bits, group_size, bias)
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r} for the group-quantized linear; expected auto, cpu or "
                         "reference")
    rows = x.numel() // max(1, x.shape[-1])
    if (not x.is_cpu or rows > GROUPWISE_KERNEL_MAX_ROWS or scales.dtype != torch.float16
            or (torch.is_grad_enabled() and x.requires_grad) or not _groupwise_cpu.is_available()):
        return None
    return _groupwise_cpu.groupwise_linear_cpu(x, codes, scales, bits, group_size, bias)
