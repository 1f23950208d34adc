"""Native CPU kernel for the coupled RaBiT linear's path-scale gradients (``rabit/csrc/scale_grad_cpu.c``):
d g_i = (dW * B_i) @ h_i and d h_i = g_i @ (dW * B_i) for all k paths in one pass over dW, without the dense
out x in temporaries of the PyTorch formula (``rabit.ops.coupled.scale_grads_reference``, which it is tested
against and which ``rabit.ops.coupled.scale_grads`` falls back to). AVX-512 / AVX2 / scalar paths chosen at
run time; OpenMP threads over rows.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "scale_grad_cpu.c"
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}
KMAX = 64   # the C side's limit on paths
# out * in * k below which one thread runs (~0.3 ms of single-threaded work at AVX2/AVX-512 speed): the whole
# call is then a small part of the matmuls around it, and a thread that waits for its sibling to be scheduled
# costs milliseconds on a busy machine (measured: 16 ms per call with 2 threads on 2 loaded cores)
PARALLEL_MIN_WORK = 1 << 22


def _build():
    lib = native_build.build_library(_SRC, "libscale_grad_cpu.so", native_build.BASE_FLAGS,
                                     "the rabit scale-gradient CPU kernel")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sg_scale_grads.restype = i32
    lib.sg_scale_grads.argtypes = [vp, i64, i64, i32, vp, vp, vp, vp, vp, i32, i32, i64]
    lib.sg_cpu_isa.restype = i32
    return lib


_library = native_build.LazyLibrary(_build, "rabit scale-gradient CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def build_error() -> str | None:
    return None if is_available() else _library.error


def isa() -> str:
    return ISA_NAMES[_library.load().sg_cpu_isa()]


def supports(grad_w: torch.Tensor, positives, g, h) -> bool:
    """Whether the kernel takes these inputs as they are (else the caller uses the PyTorch formula)."""
    if grad_w.device.type != "cpu" or grad_w.dtype != torch.float32 or grad_w.dim() != 2:
        return False
    if not grad_w.is_contiguous() or not 1 <= len(positives) <= KMAX or not len(positives) == len(g) == len(h):
        return False
    out, inp = grad_w.shape
    for s, gi, hi in zip(positives, g, h):
        if s.device.type != "cpu" or s.dtype != torch.bool or s.shape != grad_w.shape or not s.is_contiguous():
            return False
        for t, n in ((gi, out), (hi, inp)):
            if t.device.type != "cpu" or t.dtype != torch.float32 or t.shape != (n,) or not t.is_contiguous():
                return False
    return True


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def scale_grads_cpu(grad_w: torch.Tensor, positives, g, h, num_threads: int | None = None,
                    isa: str = "auto", min_parallel_work: int = PARALLEL_MIN_WORK
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([d g_i], [d h_i]) for the paths of (positives, g, h), fp32; see rabit.ops.coupled.scale_grads_reference.

    grad_w: fp32 (out, in) contiguous; positives: k bool planes (out, in) (True = +1); g: k fp32 (out,); h: k
    fp32 (in,), all contiguous CPU tensors (``supports`` checks). Raises ValueError otherwise, RuntimeError when
    the library is unavailable. num_threads (default torch's) threads split the rows when out * in * k is at
    least min_parallel_work; the result depends on the thread count by fp32 summation order only.
    """
    if not supports(grad_w, positives, g, h):
        raise ValueError("scale_grads_cpu needs an fp32 contiguous (out, in) CPU grad_w, k bool sign planes of "
                         "its shape and fp32 (out,) / (in,) scales, all contiguous")
    lib = _library.load()
    out, inp = grad_w.shape
    k = len(positives)
    dg = [torch.empty(out, dtype=torch.float32) for _ in range(k)]
    dh = [torch.empty(inp, dtype=torch.float32) for _ in range(k)]
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.sg_scale_grads(grad_w.data_ptr(), out, inp, k, _pointers(positives), _pointers(g), _pointers(h),
                            _pointers(dg), _pointers(dh), nt, ISA_CODES[isa], min_parallel_work)
    if rc != 0:
        raise RuntimeError(f"sg_scale_grads failed (code {rc})")
    return dg, dh
