"""Native CPU kernel for a bf16-weight linear with fp32 inputs (``rabit/csrc/bf16_gemv_cpu.c``): the output head
of a packed model (its tied embedding is stored in bf16) for decoding-sized inputs. The weights widen to fp32
exactly and the products accumulate in fp32: x is not rounded to bf16. AVX-512, AVX2 and scalar paths, chosen at
run time; OpenMP threads. Tested against ``F.linear(x, w.float())`` (tests/test_bf16_gemv_kernel.py).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "bf16_gemv_cpu.c"
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}


def _build():
    lib = native_build.build_library(_SRC, "libbf16_gemv_cpu.so", native_build.BASE_FLAGS,
                                     "the rabit bf16 GEMV CPU kernel")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.bg_linear.restype = i32
    lib.bg_linear.argtypes = [vp, i64, i64, vp, i64, i64, vp, vp, i64, i32, i32]
    lib.bg_cpu_isa.restype = i32
    return lib


_library = native_build.LazyLibrary(_build, "rabit bf16 GEMV CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def isa() -> str:
    return ISA_NAMES[_library.load().bg_cpu_isa()]


def bf16_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    num_threads: int | None = None, isa: str = "auto") -> torch.Tensor:
    """y = x @ weight^T + bias for a bf16 (rows, cols) weight and fp32 x (..., cols); y is fp32 (..., rows)."""
    lib = _library.load()
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-d bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    rows, cols = weight.shape
    if x.shape[-1] != cols or (bias is not None and tuple(bias.shape) != (rows,)):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    for t in (x, weight) + ((bias,) if bias is not None else ()):
        if t.device.type != "cpu":
            raise ValueError("the bf16 GEMV CPU kernel needs CPU tensors")
    if isa not in ISA_CODES:
        raise ValueError(f"isa must be one of {sorted(ISA_CODES)}, got {isa!r}")
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.contiguous()
    bf = bias.to(torch.float32).contiguous() if bias is not None else None
    nb = x2.shape[0]
    y = torch.empty(nb, rows, dtype=torch.float32)
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.bg_linear(x2.data_ptr(), nb, x2.stride(0) if nb > 1 else cols, w.data_ptr(), rows, cols,
                       bf.data_ptr() if bf is not None else None, y.data_ptr(), rows, nt, ISA_CODES[isa])
    if rc != 0:
        raise RuntimeError(f"bg_linear failed (code {rc})")
    return y.reshape(*x.shape[:-1], rows)
