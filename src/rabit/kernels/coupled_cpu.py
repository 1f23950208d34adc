"""Native CPU kernels of the coupled RaBiT linear (``rabit/csrc/coupled_cpu.c``), each one pass over out x in
without the dense temporaries of the PyTorch formulas in ``rabit.ops.coupled`` (which they are tested against and
which the ops fall back to):

- ``derive_cpu``: coupled_weight()'s derivation (weight, bool sign planes, clipped-STE mask), bitwise the
  reference's (``coupled_weight_reference``);
- ``scale_grads_cpu``: d g_i = (dW * B_i) @ h_i and d h_i = g_i @ (dW * B_i) for all k paths
  (``scale_grads_reference``), to fp32 summation order.

AVX-512 / AVX2 / scalar paths chosen at run time; OpenMP threads over rows.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "coupled_cpu.c"
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}
KMAX = 64   # the C side's limit on paths
# out * in * k below which one thread runs (~0.3 ms of single-threaded work at AVX2/AVX-512 speed): the whole
# call is then a small part of the matmuls around it, and a thread that waits for its sibling to be scheduled
# costs milliseconds on a busy machine (measured: 16 ms per call with 2 threads on 2 loaded cores)
PARALLEL_MIN_WORK = 1 << 22


def _build():
    lib = native_build.build_library(_SRC, "libcoupled_cpu.so", native_build.BASE_FLAGS,
                                     "the rabit coupled-op CPU kernels")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sg_scale_grads.restype = i32
    lib.sg_scale_grads.argtypes = [vp, i64, i64, i32, vp, vp, vp, vp, vp, i32, i32, i64]
    lib.sg_scale_grads_bf16.restype = i32
    lib.sg_scale_grads_bf16.argtypes = [vp, i64, i64, i32, vp, vp, vp, vp, vp, i32, i32, i64]
    lib.cw_derive.restype = i32
    lib.cw_derive.argtypes = [vp, i64, i64, i32, vp, vp, vp, vp, vp, ctypes.c_float, i32, i32, i64]
    lib.sg_cpu_isa.restype = i32
    return lib


_library = native_build.LazyLibrary(_build, "rabit coupled-op CPU kernels")


def is_available() -> bool:
    return _library.is_available()


def build_error() -> str | None:
    return None if is_available() else _library.error


def isa() -> str:
    return ISA_NAMES[_library.load().sg_cpu_isa()]


def _plain(t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> bool:
    # plain tensors only: a subclass (DTensor, a fake tensor) may have no memory of its own behind data_ptr()
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == dtype
            and tuple(t.shape) == shape and t.is_contiguous())


def _matrix_and_scales(m: torch.Tensor, dtypes: tuple, g, h) -> bool:
    """A plain contiguous (out, in) CPU matrix of one of `dtypes` and 1..KMAX pairs of fp32 (out,) / (in,) scales."""
    if m.dim() != 2 or m.dtype not in dtypes or not _plain(m, m.dtype, tuple(m.shape)):
        return False
    if not 1 <= len(g) <= KMAX or len(g) != len(h):
        return False
    out, inp = m.shape
    return all(_plain(gi, torch.float32, (out,)) and _plain(hi, torch.float32, (inp,)) for gi, hi in zip(g, h))


def supports_derive(latent: torch.Tensor, g, h) -> bool:
    """Whether derive_cpu takes these inputs as they are (else the caller uses the PyTorch formula)."""
    return _matrix_and_scales(latent, (torch.float32,), g, h)


def supports(grad_w: torch.Tensor, positives, g, h) -> bool:
    """Whether scale_grads_cpu takes these inputs as they are (else the caller uses the PyTorch formula)."""
    if not _matrix_and_scales(grad_w, (torch.float32, torch.bfloat16), g, h) or len(positives) != len(g):
        return False
    return all(_plain(s, torch.bool, tuple(grad_w.shape)) for s in positives)


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def derive_cpu(latent: torch.Tensor, g, h, clip: float | None = None, num_threads: int | None = None,
               isa: str = "auto", min_parallel_work: int = PARALLEL_MIN_WORK
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, bool]:
    """(W, positives, mask, finite) of the coupled derivation, bitwise rabit.ops.coupled.coupled_weight_reference's
    W, positives and mask for a finite latent; finite is False when some latent is not finite (the caller then
    makes W show it, as the reference does). Inputs as supports_derive; mask is None when clip is None.
    """
    if not supports_derive(latent, g, h):
        raise ValueError("derive_cpu needs an fp32 contiguous (out, in) CPU latent and k fp32 (out,) / (in,) "
                         "scales, all contiguous")
    lib = _library.load()
    out, inp = latent.shape
    weight = torch.empty(out, inp, dtype=torch.float32)
    positives = [torch.empty(out, inp, dtype=torch.bool) for _ in g]
    mask = None if clip is None else torch.empty(out, inp, dtype=torch.bool)
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.cw_derive(latent.data_ptr(), out, inp, len(g), _pointers(g), _pointers(h), weight.data_ptr(),
                       _pointers(positives), None if mask is None else mask.data_ptr(),
                       0.0 if clip is None else float(clip), nt, ISA_CODES[isa], min_parallel_work)
    if rc < 0:
        raise RuntimeError(f"cw_derive failed (code {rc})")
    return weight, positives, mask, rc == 0


def scale_grads_cpu(grad_w: torch.Tensor, positives, g, h, num_threads: int | None = None,
                    isa: str = "auto", min_parallel_work: int = PARALLEL_MIN_WORK
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([d g_i], [d h_i]) for the paths of (positives, g, h), fp32; see rabit.ops.coupled.scale_grads_reference.

    grad_w: fp32 or bf16 (out, in) contiguous (bf16: the same sums as for grad_w.float(), without making that);
    positives: k bool planes (out, in) (True = +1); g: k fp32 (out,); h: k fp32 (in,), all contiguous CPU tensors
    (``supports`` checks). Raises ValueError otherwise, RuntimeError when the library is unavailable. num_threads
    (default torch's) threads split the rows when out * in * k is at least min_parallel_work; the result depends
    on the thread count by fp32 summation order only.
    """
    if not supports(grad_w, positives, g, h):
        raise ValueError("scale_grads_cpu needs an fp32 or bf16 contiguous (out, in) CPU grad_w, k bool sign planes "
                         "of its shape and fp32 (out,) / (in,) scales, all contiguous")
    lib = _library.load()
    out, inp = grad_w.shape
    k = len(positives)
    dg = [torch.empty(out, dtype=torch.float32) for _ in range(k)]
    dh = [torch.empty(inp, dtype=torch.float32) for _ in range(k)]
    nt = torch.get_num_threads() if num_threads is None else num_threads
    fn = lib.sg_scale_grads_bf16 if grad_w.dtype == torch.bfloat16 else lib.sg_scale_grads
    rc = fn(grad_w.data_ptr(), out, inp, k, _pointers(positives), _pointers(g), _pointers(h), _pointers(dg),
            _pointers(dh), nt, ISA_CODES[isa], min_parallel_work)
    if rc != 0:
        raise RuntimeError(f"sg_scale_grads failed (code {rc})")
    return dg, dh
