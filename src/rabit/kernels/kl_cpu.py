"""Native CPU kernel of the distillation KL over the vocabulary (``rabit/csrc/kl_cpu.c``): for a chunk of student
and teacher logits, each row's KL(softmax(t/T) || softmax(s/T)) and the gradient softmax(s/T) - softmax(t/T) over T,
in three passes over a row instead of the reference's ~10 passes over the chunk (``rabit.train.losses``,
``_kl_chunk_reference``, which it is tested against and which the loss falls back to on other devices or without a
compiler). OpenMP threads over rows; each row's KL is returned and summed here in a fixed order, so the thread count
changes no bit.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "kl_cpu.c"


def _build():
    lib = native_build.build_library(_SRC, "libkl_cpu.so", native_build.EXP_FLAGS, "the rabit distillation-KL CPU kernel")
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.kl_rows.restype = i32
    lib.kl_rows.argtypes = [vp, i64, vp, i64, i64, i64, f32, vp, i64, vp, i32]
    return lib


_library = native_build.LazyLibrary(_build, "rabit distillation-KL CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def supports(s: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether kl_rows takes these logits: 2-D fp32 CPU tensors of one shape, rows contiguous."""
    return (type(s) is torch.Tensor and type(t) is torch.Tensor and s.device.type == "cpu" and t.device.type == "cpu"
            and s.dtype == torch.float32 and t.dtype == torch.float32 and s.dim() == 2 and s.shape == t.shape
            and s.shape[1] > 0 and s.stride(1) == 1 and t.stride(1) == 1)


def kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool,
            threads: int | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over rows of KL(softmax(t/T) || softmax(s/T)) as a 0-d fp32 tensor, d(sum)/d s or None) for (rows, vocab)
    fp32 logits (``supports``); the same quantities as rabit.train.losses._kl_chunk_reference, to fp32 rounding.
    threads: OpenMP threads over rows (None: torch's thread count).
    out: where the gradient goes (fp32, s's shape, rows contiguous; any row stride), e.g. rows of a larger buffer or
    one buffer reused over a loop's chunks: a fresh 50 MB tensor costs ~20 ms of page faults on first touch."""
    if not supports(s, t):
        raise ValueError(f"expected two fp32 CPU tensors of one (rows, vocab) shape with contiguous rows, got "
                         f"{s.dtype} {tuple(s.shape)} and {t.dtype} {tuple(t.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, v = s.shape
    grad = None
    if want_grad:
        grad = torch.empty(rows, v) if out is None else out
        if not supports(s, grad) or grad.stride(0) < v:
            raise ValueError(f"out: expected an fp32 CPU tensor of shape {tuple(s.shape)} with contiguous rows, got "
                             f"{grad.dtype} {tuple(grad.shape)} with strides {grad.stride()}")
    per_row = torch.empty(rows)
    nt = torch.get_num_threads() if threads is None else threads
    rc = _library.load().kl_rows(s.data_ptr(), s.stride(0), t.data_ptr(), t.stride(0), rows, v, 1.0 / temperature,
                                 grad.data_ptr() if grad is not None else None, grad.stride(0) if grad is not None else v,
                                 per_row.data_ptr(), max(1, int(nt)))
    if rc != 0:
        raise RuntimeError(f"kl_rows failed (code {rc})")
    return per_row.sum(dtype=torch.float64).float(), grad
