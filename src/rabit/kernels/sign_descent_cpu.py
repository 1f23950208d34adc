"""Native CPU kernel of one coordinate-descent pass over a binary layer's sign planes (``rabit/csrc/
sign_descent_cpu.c``), bitwise the PyTorch loop in ``rabit.ops.refine`` (``_sign_descent_reference``), which it is
tested against and which refine falls back to (other devices, non-finite values, a missing compiler). OpenMP threads
over rows.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "sign_descent_cpu.c"
K_MAX = 8   # the C side's most paths


def _build():
    lib = native_build.build_library(_SRC, "libsign_descent_cpu.so", native_build.BASE_FLAGS,
                                     "the rabit sign-descent CPU kernel")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sd_pass.restype = i32
    lib.sd_pass.argtypes = [vp, vp, i32, vp, i64, vp, vp, vp, i64, i64, vp, i32]
    return lib


_library = native_build.LazyLibrary(_build, "rabit sign-descent CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def supports(g: torch.Tensor, h: torch.Tensor, H: torch.Tensor, order: torch.Tensor, choice: torch.Tensor,
             G: torch.Tensor) -> bool:
    """Whether descent_pass takes these tensors as they are (plain contiguous CPU tensors of the right types and
    shapes)."""
    tensors = (g, h, H, order, choice, G)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    if any(t.dtype != torch.float32 for t in (g, h, H, G)) or order.dtype != torch.int64 or choice.dtype != torch.int64:
        return False
    if g.dim() != 2 or h.dim() != 2 or not 1 <= g.shape[0] <= K_MAX or h.shape[0] != g.shape[0]:
        return False
    out, n = g.shape[1], h.shape[1]
    return (tuple(H.shape) == (n, n) and tuple(order.shape) == (n,) and tuple(choice.shape) == (out, n)
            and tuple(G.shape) == (out, n))


def descent_pass(g: torch.Tensor, h: torch.Tensor, H: torch.Tensor, order: torch.Tensor, choice: torch.Tensor,
                 G: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """One pass over the columns in `order`: moves weights to the level that lowers their row's output error most,
    updating choice (int64 (out, in), level indices) and G = (w - q) H (fp32 (out, in)) in place; returns the moves
    of each row (int64 (out,)). g: fp32 (k, out) row scales, h: fp32 (k, in) column scales, H: fp32 (in, in)."""
    if not supports(g, h, H, order, choice, G):
        raise ValueError("descent_pass needs contiguous CPU g (k, out) and h (k, in) fp32 with 1 <= k <= %d, H (in, in) "
                         "and G (out, in) fp32, order (in,) and choice (out, in) int64" % K_MAX)
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= h.shape[1]):
        raise ValueError("order holds a column index out of range")
    lib = _library.load()
    flips = torch.zeros(g.shape[1], dtype=torch.int64)
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.sd_pass(g.data_ptr(), h.data_ptr(), g.shape[0], H.data_ptr(), H.stride(0), order.data_ptr(),
                     choice.data_ptr(), G.data_ptr(), g.shape[1], h.shape[1], flips.data_ptr(), nt)
    if rc != 0:
        raise RuntimeError(f"sd_pass failed (code {rc})")
    return flips
