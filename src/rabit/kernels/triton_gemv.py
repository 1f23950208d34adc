"""Triton kernels for RaBiT layers on GPU: a GEMV for decoding (few rows of x) and a tensor-core GEMM for prefill.

Both read the packed sign planes as int32 words (``packed.view(torch.int32)``, shape (k, out_pad/16, in_pad/32,
16): word [p, t, c, r] holds the signs of row 16t+r, inputs 32c..32c+31, bit i = input 32c+i; see
``rabit.sign_bits``).  triton is optional: importing this module never fails, ``is_available()`` tells.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (Triton's interpreter; used by the tests).
"""
from __future__ import annotations

import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # noqa: BLE001
    triton = None
    tl = None
    HAVE_TRITON = False

GEMV_MAX_ROWS = 8   # up to this many rows of x: GEMV kernel; above: GEMM kernel (tl.dot)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    return HAVE_TRITON and (torch.cuda.is_available() or interpreting())


if HAVE_TRITON:

    @triton.jit
    def _rabit_gemv_kernel(x_ptr, w_ptr, g_ptr, h_ptr, b_ptr, y_ptr,
                           M, N, K, T, CW, stride_xm, stride_ym,
                           NPATHS: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # y[m, n] = sum_p g[p, n] * sum_j sign_p[n, j] * h[p, j] * x[m, j] (+ bias[n]); no multiply by the signs
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        m_ok = ms < M
        tile = rows // 16
        rr = rows % 16
        bit = tl.arange(0, 32)
        BLOCK_K: tl.constexpr = BLOCK_W * 32
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(NPATHS):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for w0 in range(0, CW, BLOCK_W):
                ws = w0 + tl.arange(0, BLOCK_W)
                woff = ((p * T + tile[:, None]) * CW + ws[None, :]) * 16 + rr[:, None]
                words = tl.load(w_ptr + woff, mask=row_ok[:, None] & (ws[None, :] < CW), other=0)
                plus = ((words[:, :, None] >> bit[None, None, :]) & 1) != 0          # (BN, BW, 32)
                plus = tl.reshape(plus, (BLOCK_N, BLOCK_K))
                cols = w0 * 32 + tl.arange(0, BLOCK_K)
                col_ok = cols < K
                xv = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :],
                             mask=m_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                hv = tl.load(h_ptr + p * K + cols, mask=col_ok, other=0.0).to(tl.float32)
                xh = (xv * hv[None, :])[:, None, :]                                   # (BM, 1, BK)
                acc += tl.sum(tl.where(plus[None, :, :], xh, -xh), axis=2)
            gv = tl.load(g_ptr + p * N + rows, mask=row_ok, other=0.0).to(tl.float32)
            y += acc * gv[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _rabit_gemm_kernel(x_ptr, w_ptr, g_ptr, h_ptr, b_ptr, y_ptr,
                           M, N, K, T, CW, stride_xm, stride_ym,
                           NPATHS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # per path: acc = (x * h_p) @ sign_p^T on tensor cores (signs expanded to +-1 in x's dtype), y += g_p * acc.
        # DOT_F32: fp32 operands with IEEE precision (fp32 activations; also bf16 under the interpreter, whose
        # numpy-based tl.dot mishandles bf16).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = ms < M
        row_ok = rows < N
        tile = rows // 16
        rr = rows % 16
        bit = tl.arange(0, 32)
        BLOCK_K: tl.constexpr = BLOCK_W * 32
        dot_ty = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(NPATHS):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for w0 in range(0, CW, BLOCK_W):
                ws = w0 + tl.arange(0, BLOCK_W)
                woff = ((p * T + tile[:, None]) * CW + ws[None, :]) * 16 + rr[:, None]
                words = tl.load(w_ptr + woff, mask=row_ok[:, None] & (ws[None, :] < CW), other=0)
                b = ((words[:, :, None] >> bit[None, None, :]) & 1).to(tl.float32) * 2.0 - 1.0
                b = tl.reshape(b, (BLOCK_N, BLOCK_K)).to(dot_ty)                        # (BN, BK) of +-1
                cols = w0 * 32 + tl.arange(0, BLOCK_K)
                col_ok = cols < K
                xv = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :],
                             mask=m_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                hv = tl.load(h_ptr + p * K + cols, mask=col_ok, other=0.0).to(tl.float32)
                a = (xv * hv[None, :]).to(dot_ty)
                if DOT_F32:
                    acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(b), acc)
            gv = tl.load(g_ptr + p * N + rows, mask=row_ok, other=0.0).to(tl.float32)
            y += acc * gv[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & row_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rabit_linear_triton(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                        bias: torch.Tensor | None = None, mode: str = "auto") -> torch.Tensor:
    """x (..., in) -> (..., out) in x.dtype. mode: "auto" | "gemv" | "gemm"."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    k, nout, inf = g.shape[0], g.shape[-1], h.shape[-1]
    from ..sign_bits import packed_shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != packed_shape(k, nout, inf):
        raise ValueError(f"packed signs {packed.dtype} {tuple(packed.shape)} do not match k={k}, out={nout}, "
                         f"in={inf}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported activation dtype {x.dtype}")
    x2 = x.reshape(-1, inf)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    words = packed.contiguous().view(torch.int32)
    T, CW = words.shape[1], words.shape[2]
    g, h = g.contiguous(), h.contiguous()
    y = torch.empty(M, nout, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], nout)
    b = bias.contiguous() if bias is not None else g   # dummy pointer when there is no bias
    interp = interpreting()
    if mode == "gemv" or (mode == "auto" and M <= GEMV_MAX_ROWS):
        BM = min(_next_pow2(M), GEMV_MAX_ROWS)
        # 32 rows x 256 inputs per step: enough programs to fill an H100 for out >= 4096 (untuned: no GPU here)
        BN = 16 if interp else 32
        BW = 2 if interp else max(1, 8 // BM)
        grid = (triton.cdiv(nout, BN), triton.cdiv(M, BM))
        _rabit_gemv_kernel[grid](x2, words, g, h, b, y, M, nout, inf, T, CW, x2.stride(0), y.stride(0),
                                 NPATHS=k, HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_W=BW)
    else:
        BM = 16 if interp else 64
        BN = 16 if interp else 64
        BW = 1 if interp else 2
        grid = (triton.cdiv(M, BM), triton.cdiv(nout, BN))
        _rabit_gemm_kernel[grid](x2, words, g, h, b, y, M, nout, inf, T, CW, x2.stride(0), y.stride(0),
                                 NPATHS=k, HAS_BIAS=bias is not None, DOT_F32=x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16),
                                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_W=BW)
    return y.reshape(*x.shape[:-1], nout)


def compile_check(capability: int = 90, warp_size: int = 32) -> dict[str, int]:
    """Compile both kernels for a CUDA target without needing a GPU (Triton's bundled ptxas); returns the PTX size
    per variant.  Raises if a kernel does not lower."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, warp_size)
    base = {"x_ptr": "*fp32", "w_ptr": "*i32", "g_ptr": "*fp16", "h_ptr": "*fp16", "b_ptr": "*fp16",
            "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "T": "i32", "CW": "i32", "stride_xm": "i32",
            "stride_ym": "i32"}
    variants = [
        ("gemv_fp32", _rabit_gemv_kernel, {}, dict(NPATHS=2, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=64, BLOCK_W=8)),
        ("gemv_bf16_m4", _rabit_gemv_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16"},
         dict(NPATHS=3, HAS_BIAS=False, BLOCK_M=4, BLOCK_N=64, BLOCK_W=2)),
        ("gemm_bf16", _rabit_gemm_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16"},
         dict(NPATHS=2, HAS_BIAS=True, DOT_F32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_W=2)),
        ("gemm_fp32", _rabit_gemm_kernel, {}, dict(NPATHS=2, HAS_BIAS=False, DOT_F32=True, BLOCK_M=64,
                                                    BLOCK_N=64, BLOCK_W=2)),
    ]
    sizes = {}
    for name, kern, over, consts in variants:
        sig = dict(base, **over)
        sig.update({k: "constexpr" for k in consts})
        compiled = triton.compile(triton.compiler.ASTSource(fn=kern, signature=sig, constexprs=consts),
                                  target=target)
        sizes[name] = len(compiled.asm["ptx"])
    return sizes
