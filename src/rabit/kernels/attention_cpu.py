"""Native CPU kernel of causal self-attention's forward on bf16 or fp32 inputs (``rabit/csrc/attention_cpu.c``):
flash-attention order, AVX-512 BF16 dot products for bf16 (AVX2 + FMA on CPUs without them), AVX2 + FMA for fp32
(what CPUs without native bf16 run the job's passes in), OpenMP threads over (batch, head, block of 64 queries). For passes that need no gradient (perplexity windows, the block stage's forward passes), where torch's CPU
kernel was more than half of a 2048-token forward of the default model (docs/RESULTS.md sections 48-50).

``causal_attention_reference`` is its plain PyTorch twin (fp32 scores and softmax on the same inputs); the tests
compare the two, and each dtype's portable-C path with its SIMD ones, on random shapes.
``rabit.kernels.attention`` decides per call whether the kernel applies and otherwise calls transformers' SDPA.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "attention_cpu.c"
ISA_CODES = {"auto": 0, "scalar": 1, "avx512bf16": 2, "avx2": 3}
DTYPES = (torch.bfloat16, torch.float32)
# the paths of each input dtype, best first (AVX-512 BF16 is a bf16 instruction set; an AVX-512 F fp32 path was
# slower than the AVX2 one on Zen 5, docs/RESULTS.md section 50)
PATHS = {torch.bfloat16: ("avx512bf16", "avx2", "scalar"), torch.float32: ("avx2", "scalar")}
HEAD_DIM_MULTIPLE = 32
MAX_HEAD_DIM = 256


def _build():
    lib = native_build.build_library(_SRC, "libattention_cpu.so", native_build.EXP_FLAGS,
                                     "the rabit causal-attention CPU kernel")
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.att_causal_bf16.restype = i32
    lib.att_causal_bf16.argtypes = [vp, i64, i64, i64] * 4 + [i64] * 5 + [f32, i32, i32]
    lib.att_causal_f32.restype = i32
    lib.att_causal_f32.argtypes = lib.att_causal_bf16.argtypes
    lib.att_cpu_has.restype = i32
    lib.att_cpu_has.argtypes = [i32]
    return lib


_library = native_build.LazyLibrary(_build, "rabit causal-attention CPU kernel")


def is_available() -> bool:
    return _library.is_available()


def isa(dtype: torch.dtype = torch.bfloat16) -> str:
    """The best path this CPU runs for inputs of `dtype`: "avx512bf16" (bf16 only), "avx2" (AVX2 + FMA) or "scalar"
    (portable C, slower than torch's kernel)."""
    return available_isas(dtype)[0]


def available_isas(dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The paths this CPU runs for inputs of `dtype` (bf16 or fp32), best first ("scalar" always)."""
    lib = _library.load()
    return [name for name in PATHS[dtype] if lib.att_cpu_has(ISA_CODES[name])]


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether causal_attention takes these (batch, heads, positions, head_dim) tensors: all bf16 or all fp32 on the
    CPU, as many queries as keys, the key heads dividing the query heads, head_dim a multiple of 32 up to 256, unit
    stride along head_dim."""
    if query.dtype not in DTYPES or not all(
            type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == query.dtype and t.dim() == 4
            and t.stride(3) == 1 for t in (query, key, value)):
        return False
    b, hq, t, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[2] != t or key.shape[3] != d:
        return False
    hk = key.shape[1]
    return t > 0 and b > 0 and hk > 0 and hq % hk == 0 and d % HEAD_DIM_MULTIPLE == 0 and 0 < d <= MAX_HEAD_DIM


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                     isa: str = "auto", threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + causal mask) v for (batch, heads, T, head_dim) bf16 or fp32 tensors (``supports``);
    key and value may have fewer heads (grouped-query attention). Returns (batch, T, heads, head_dim) in the inputs'
    dtype, the layout transformers' attention functions return; `out` may give it (any strides with unit stride
    along head_dim). scale: default 1 / sqrt(head_dim). isa: "auto" or one of PATHS[dtype]."""
    if not supports(query, key, value):
        raise ValueError("expected bf16 or fp32 CPU tensors (batch, heads, T, head_dim) of one dtype, queries and "
                         f"keys of one length, head_dim a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}, got "
                         f"{tuple(query.shape)} {query.dtype}, {tuple(key.shape)} {key.dtype}, "
                         f"{tuple(value.shape)} {value.dtype}")
    if isa not in ISA_CODES:
        raise ValueError(f"isa must be one of {sorted(ISA_CODES)}, got {isa!r}")
    dtype = query.dtype
    if isa != "auto" and isa not in PATHS[dtype]:
        raise ValueError(f"isa {isa!r} has no version for {dtype} inputs; they run {list(PATHS[dtype])} (or auto)")
    b, hq, t, d = query.shape
    if out is None:
        out = torch.empty(b, t, hq, d, dtype=dtype)
    elif out.shape != (b, t, hq, d) or out.dtype != dtype or out.device.type != "cpu" or out.stride(3) != 1:
        raise ValueError(f"out: expected a {dtype} CPU tensor of shape {(b, t, hq, d)} with unit stride along "
                         "head_dim")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nt = torch.get_num_threads() if threads is None else threads
    args = []
    for x in (query, key, value):
        args += [x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)]
    args += [out.data_ptr(), out.stride(0), out.stride(2), out.stride(1)]
    lib = _library.load()
    entry = lib.att_causal_f32 if dtype == torch.float32 else lib.att_causal_bf16
    rc = entry(*args, b, hq, key.shape[1], t, d, scale, ISA_CODES[isa], max(1, int(nt)))
    if rc == -3:
        raise RuntimeError(f"this CPU cannot run the {isa} path (it runs {available_isas(dtype)})")
    if rc != 0:
        raise RuntimeError(f"the attention kernel failed (code {rc}{': out of memory' if rc == -1 else ''})")
    return out


def causal_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """The plain PyTorch twin of causal_attention: fp32 scores, softmax and products on the same inputs, the result
    rounded to the inputs' dtype, (batch, T, heads, head_dim)."""
    hq, hk = query.shape[1], key.shape[1]
    k = key.float().repeat_interleave(hq // hk, dim=1)
    v = value.float().repeat_interleave(hq // hk, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(query.float(), k, v, is_causal=True, scale=scale)
    return o.transpose(1, 2).to(query.dtype)
