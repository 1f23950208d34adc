"""Native fp32 ops of a batch-1 decoding step (``rabit/csrc/decode_ops_cpu.c``): the residual add + RMSNorm, one
token's attention (rotary embedding, KV-cache write, softmax attention over the cache) and the gated MLP's
silu(gate) * up. Each replaces a chain
of small PyTorch ops whose dispatch costs more than their arithmetic at batch 1. No argument checks beyond what
keeps the C side in bounds: the decoder (rabit.generate.StaticDecoder) builds the calls once per layer, and the
tests compare them with the PyTorch code they replace (tests/test_decode_ops.py).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "decode_ops_cpu.c"


def _build():
    lib = native_build.build_library(_SRC, "libdecode_ops_cpu.so", native_build.EXP_FLAGS, "the rabit decoding-step CPU ops")
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.dec_add_rms_norm.restype = i32
    lib.dec_add_rms_norm.argtypes = [vp, vp, vp, i64, f32, vp]
    lib.dec_attend_one.restype = i32
    lib.dec_attend_one.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, vp, vp, i64, i64, i64, f32, vp, i32]
    lib.dec_silu_mul.restype = i32
    lib.dec_silu_mul.argtypes = [vp, vp, vp, i64]
    return lib


_library = native_build.LazyLibrary(_build, "rabit decoding-step CPU ops")


def is_available() -> bool:
    return _library.is_available()


def _fp32_contiguous(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"expected contiguous fp32 CPU tensors, got {t.dtype} {tuple(t.shape)} on {t.device}")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x += residual (in place, when given), then RMSNorm(x) * weight over the last dimension of a 1-row x."""
    n = weight.numel()
    _fp32_contiguous(x, weight, *((residual,) if residual is not None else ()))
    if x.numel() != n or (residual is not None and residual.numel() != n):
        raise ValueError(f"one row of {n} values expected, got x {tuple(x.shape)}")
    y = torch.empty_like(x) if out is None else out
    rc = _library.load().dec_add_rms_norm(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                                          weight.data_ptr(), n, eps, y.data_ptr())
    if rc != 0:
        raise RuntimeError(f"dec_add_rms_norm failed (code {rc})")
    return y


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: int, lo: int, cos: torch.Tensor, sin_signed: torch.Tensor, scale: float,
               out: torch.Tensor | None = None, threads: int = 1) -> torch.Tensor:
    """One new token's attention: q (H, D), k and v (KV, D) before the rotary embedding; caches (KV, max_len, D),
    written at pos; cos / sin_signed: the rotary rows of pos (D,); attends to positions lo..pos. Returns (H, D).
    threads: OpenMP threads over the KV heads once the cache is long (~32K floats read); the result does not depend
    on it."""
    KV, max_len, D = k_cache.shape
    H = q.numel() // D
    _fp32_contiguous(q, k, v, k_cache, v_cache, cos, sin_signed)
    if (q.numel() != H * D or k.numel() != KV * D or v.numel() != KV * D or tuple(v_cache.shape) != (KV, max_len, D)
            or cos.numel() != D or sin_signed.numel() != D or H % KV or not 0 <= lo <= pos < max_len):
        raise ValueError(f"bad attention arguments: q {tuple(q.shape)}, k {tuple(k.shape)}, cache "
                         f"{tuple(k_cache.shape)}, pos {pos}, lo {lo}")
    o = torch.empty(H, D) if out is None else out
    rc = _library.load().dec_attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(),
                                        v_cache.data_ptr(), max_len, pos, lo, cos.data_ptr(), sin_signed.data_ptr(),
                                        H, KV, D, scale, o.data_ptr(), max(1, int(threads)))
    if rc != 0:
        raise RuntimeError(f"dec_attend_one failed (code {rc})")
    return o


def silu_mul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * b (the gated MLP's activation times its up projection) in one pass, for same-sized a and b."""
    _fp32_contiguous(a, b)
    if a.numel() != b.numel():
        raise ValueError(f"silu_mul needs same-sized inputs, got {tuple(a.shape)} and {tuple(b.shape)}")
    y = torch.empty_like(a) if out is None else out
    rc = _library.load().dec_silu_mul(a.data_ptr(), b.data_ptr(), y.data_ptr(), a.numel())
    if rc != 0:
        raise RuntimeError(f"dec_silu_mul failed (code {rc})")
    return y


# --------------------------------------------------------------------------- prepared calls of a decoding loop
# The same native calls with the arguments that do not change between steps bound once, and one output tensor per
# call site that every call returns (the next call overwrites it): a decoding step consumes each output before the
# same site runs again. Per call this saves the checks, the allocation and the tensor indexing (~2-4 us each; a
# 30-layer model makes 90 such calls a token, docs/RESULTS.md section 33). Inputs that are not what the decoder
# passes (fp32, contiguous, the right sizes) go through the checked functions above.

def add_rms_norm_fn(weight: torch.Tensor, eps: float):
    """(x, residual) -> add_rms_norm(x, residual, weight, eps), into one reused (1, 1, n) output."""
    _fp32_contiguous(weight)
    n, f32 = weight.numel(), torch.float32
    fn, wp = _library.load().dec_add_rms_norm, weight.data_ptr()
    out = torch.empty(1, 1, n)
    yp = out.data_ptr()

    def call(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if (x.dtype is not f32 or x.numel() != n or not x.is_contiguous()
                or residual is not None and (residual.dtype is not f32 or residual.numel() != n
                                             or not residual.is_contiguous())):
            return add_rms_norm(x, residual, weight, eps)
        if fn(x.data_ptr(), residual.data_ptr() if residual is not None else None, wp, n, eps, yp) != 0:
            raise RuntimeError("dec_add_rms_norm failed")
        return out

    return call


def attend_one_fn(k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                  scale: float, n_heads: int, threads: int = 1):
    """(q, k, v, pos, lo) -> attend_one(q, k, v, k_cache, v_cache, pos, lo, cos[pos], sin_signed[pos], scale,
    threads=threads), into one reused (H, D) output; cos and sin_signed are the layer's whole rotary tables
    (rows 0..max_len - 1, D values each)."""
    KV, max_len, D = k_cache.shape
    H, f32 = int(n_heads), torch.float32
    _fp32_contiguous(k_cache, v_cache, cos, sin_signed)
    if (tuple(v_cache.shape) != (KV, max_len, D) or H % KV or cos.dim() != 2 or cos.shape[0] < max_len
            or cos.shape[1] != D or sin_signed.shape != cos.shape):
        raise ValueError(f"bad attention tables: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, rotary "
                         f"{tuple(cos.shape)} / {tuple(sin_signed.shape)}, {H} heads")
    fn = _library.load().dec_attend_one
    kp, vp, cp, sp, row = k_cache.data_ptr(), v_cache.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), D * 4
    out = torch.empty(H, D)
    op, nt = out.data_ptr(), max(1, int(threads))

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, lo: int) -> torch.Tensor:
        if not 0 <= lo <= pos < max_len:
            raise ValueError(f"bad attention arguments: pos {pos}, lo {lo} for a cache of {max_len} positions")
        if (q.numel() != H * D or k.numel() != KV * D or v.numel() != KV * D
                or q.dtype is not f32 or k.dtype is not f32 or v.dtype is not f32
                or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())):
            return attend_one(q, k, v, k_cache, v_cache, pos, lo, cos[pos], sin_signed[pos], scale, threads=nt)
        if fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), kp, vp, max_len, pos, lo, cp + pos * row, sp + pos * row,
              H, KV, D, scale, op, nt) != 0:
            raise RuntimeError("dec_attend_one failed")
        return out

    return call
