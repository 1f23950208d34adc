"""Native CPU kernel of GPTQ-style sign rounding's column loop (``rabit/csrc/gptq_cpu.c``): one block of columns,
each row walking its columns in a private buffer, bitwise the PyTorch loop in ``rabit.ops.refine``
(``_block_columns_reference``), which it is tested against and which refine falls back to (other devices, non-finite
values, a missing compiler). OpenMP threads over rows.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "gptq_cpu.c"
BS_MAX = 4096   # the C side's largest block of columns


def _build():
    lib = native_build.build_library(_SRC, "libgptq_cpu.so", native_build.BASE_FLAGS,
                                     "the rabit GPTQ column-loop CPU kernel")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.gq_block_columns.restype = i32
    lib.gq_block_columns.argtypes = [vp, i64, vp, i32, vp, i64, vp, i64, vp, i64, i64, i32]
    return lib


_library = native_build.LazyLibrary(_build, "rabit GPTQ column-loop CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def supports(w: torch.Tensor, levels: torch.Tensor, u: torch.Tensor, choice: torch.Tensor) -> bool:
    """Whether block_columns takes these tensors as they are (plain fp32 / int64 CPU tensors, rows contiguous)."""
    tensors = (w, levels, u, choice)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in tensors):
        return False
    if w.dtype != torch.float32 or levels.dtype != torch.float32 or u.dtype != torch.float32:
        return False
    if choice.dtype != torch.int64 or w.dim() != 2 or levels.dim() != 3 or u.dim() != 2 or choice.dim() != 2:
        return False
    out, bs = w.shape
    return (bs <= BS_MAX and tuple(levels.shape[:2]) == (bs, out) and levels.is_contiguous()
            and tuple(u.shape) == (bs, bs) and choice.shape[0] == out and choice.shape[1] >= bs
            and all(t.stride(1) == 1 for t in (w, u, choice)))


def block_columns(w: torch.Tensor, levels: torch.Tensor, u: torch.Tensor, choice: torch.Tensor,
                  num_threads: int | None = None) -> torch.Tensor:
    """Rounds the columns of one block: writes choice[:, :bs] (the level index per weight) and returns the
    (out, bs) errors, each divided by its U diagonal, that the reference loop collects as ``err1``.

    w: fp32 (out, bs) block of the weight (rows may be strided, columns contiguous), not modified; levels: fp32
    (bs, out, 2^k) contiguous; u: fp32 (bs, bs) the block of the upper Cholesky factor of H^-1; choice: int64
    (out, >= bs) view whose first bs columns receive the block's choices.
    """
    if not supports(w, levels, u, choice):
        raise ValueError("block_columns needs fp32 CPU w (out, bs), levels (bs, out, L) contiguous, u (bs, bs), "
                         "int64 choice (out, >= bs), all with contiguous rows, bs <= %d" % BS_MAX)
    lib = _library.load()
    out, bs = w.shape
    err = torch.empty(out, bs, dtype=torch.float32)
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.gq_block_columns(w.data_ptr(), w.stride(0), levels.data_ptr(), levels.shape[2], u.data_ptr(),
                              u.stride(0), choice.data_ptr(), choice.stride(0), err.data_ptr(), out, bs, nt)
    if rc != 0:
        raise RuntimeError(f"gq_block_columns failed (code {rc})")
    return err
