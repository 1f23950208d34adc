"""Native CPU kernel for the group-quantized linear (``rabit/csrc/groupwise_cpu.c``): the output head of a model
whose embedding is quantized with ``--embed-bits``, for decoding-sized inputs. It reads the int8 / packed 4-bit
codes once per call instead of dequantizing the (vocabulary x hidden) table, which is what made a quantized head
slower than a 16-bit one (docs/RESULTS.md section 12). AVX2 and scalar paths, chosen at run time; OpenMP threads.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "groupwise_cpu.c"
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}


def _build():
    lib = native_build.build_library(_SRC, "libgroupwise_cpu.so", native_build.BASE_FLAGS,
                                     "the rabit group-quantized CPU kernel")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.gq_linear.restype = i32
    lib.gq_linear.argtypes = [vp, i64, i64, vp, i32, i64, i64, i64, vp, vp, vp, i64, i32, i32]
    lib.gq_cpu_isa.restype = i32
    return lib


_library = native_build.LazyLibrary(_build, "rabit group-quantized CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def build_error() -> str | None:
    return None if is_available() else _library.error


def isa() -> str:
    return ISA_NAMES[_library.load().gq_cpu_isa()]


def groupwise_linear_cpu(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                         bias: torch.Tensor | None = None, num_threads: int | None = None,
                         isa: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias for W in ``rabit.embedquant.quantize_groupwise``'s layout (codes, fp16 scales).

    x: (..., cols) in any float dtype (computed in fp32); the result has x's dtype and shape (..., rows).
    """
    lib = _library.load()
    rows = codes.shape[0]
    cols = codes.shape[1] * (2 if bits == 4 else 1)
    if bits not in (4, 8) or codes.dtype != (torch.uint8 if bits == 4 else torch.int8):
        raise ValueError(f"codes {codes.dtype} do not match bits={bits}")
    if x.shape[-1] != cols or cols % group_size or tuple(scales.shape) != (rows, cols // group_size):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, codes {tuple(codes.shape)}, scales "
                         f"{tuple(scales.shape)}, group {group_size}")
    if scales.dtype != torch.float16:
        raise TypeError(f"scales must be float16, got {scales.dtype}")
    for t in (x, codes, scales) + ((bias,) if bias is not None else ()):
        if t.device.type != "cpu":
            raise ValueError("the group-quantized CPU kernel needs CPU tensors")
    xf = x.reshape(-1, cols).to(torch.float32)
    if bits == 4:   # the kernel reads the even columns, then the odd ones (the two nibbles of a byte)
        xf = torch.cat([xf[:, 0::2], xf[:, 1::2]], dim=1)
    xf = xf.contiguous()
    codes, scales = codes.contiguous(), scales.contiguous()
    bf = bias.to(torch.float32).contiguous() if bias is not None else None
    nb = xf.shape[0]
    y = torch.empty(nb, rows, dtype=torch.float32)
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.gq_linear(xf.data_ptr(), nb, cols, codes.data_ptr(), bits, rows, cols, group_size, scales.data_ptr(),
                       bf.data_ptr() if bf is not None else None, y.data_ptr(), rows, nt, ISA_CODES[isa])
    if rc != 0:
        raise RuntimeError(f"gq_linear failed (code {rc})")
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)
