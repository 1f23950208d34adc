"""Triton kernels for RaBiT layers on GPU: a split-K GEMV for decoding (few rows of x) and a tensor-core GEMM for
prefill.

Both read the packed sign planes as int32 words (``packed.view(torch.int32)``, shape (k, out_pad/16, in_pad/32,
16): word [p, t, c, r] holds the signs of row 16t+r, inputs 32c..32c+31, bit i = input 32c+i; see
``rabit.sign_bits``).  The GEMV splits the input words into SPLIT_K slices on a grid (row blocks, slices,
row-groups of x), so that a batch-1 layer fills the GPU; the slices' float32 partial sums are added by one
reduction (``gemv_launch_params`` documents the heuristic and how to force parameters).  triton is optional:
importing this module never fails, ``is_available()`` tells.  With ``TRITON_INTERPRET=1`` the kernels also run
on CPU tensors (Triton's interpreter; used by the tests).
"""
from __future__ import annotations

import functools
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
    def _gemv_block(w_rows, x_rows, h_path, w0, w_hi, K, tile_ok, m_ok, BLOCK_W: tl.constexpr):
        # the GEMV's loads for words [w0, w0 + BLOCK_W) of one path (nothing past w_hi): the words of its rows
        # (BN, BW) (per tile, 16 rows x BLOCK_W words are 64*BLOCK_W contiguous bytes), x (BM, BK) and h (BK,)
        ws = w0 + tl.arange(0, BLOCK_W)
        words = tl.load(w_rows[:, None] + ws[None, :] * 16, mask=tile_ok[:, None] & (ws[None, :] < w_hi), other=0)
        cols = w0 * 32 + tl.arange(0, BLOCK_W * 32)
        col_ok = (cols < K) & (cols < w_hi * 32)
        xv = tl.load(x_rows[:, None] + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        hv = tl.load(h_path + cols, mask=col_ok, other=0.0)
        return words, xv, hv

    @triton.jit
    def _rabit_gemv_kernel(x_ptr, w_ptr, g_ptr, h_ptr, b_ptr, out_ptr,
                           M, N, K, T, CW, WPS, stride_xm, stride_os, stride_om,
                           NPATHS: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                           SIGN_XOR: tl.constexpr = False):
        # Split-K: program (pid_n, pid_k, pid_m) computes rows pid_n*BLOCK_N.. (whole 16-row tiles) for rows
        # pid_m*BLOCK_M.. of x over input words [pid_k*WPS, pid_k*WPS + WPS) and stores that partial sum at
        # out + pid_k*stride_os (a float32 partial buffer, or y itself when there is one split).
        # sum_j s_j v_j = 2 sum_{bit j = 1} v_j - sum_j v_j, v = x*h: the bit expansion only selects (no sign
        # multiply) and the slice total of v is shared by all BLOCK_N rows.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        m_ok = ms < M
        tile = rows // 16
        tile_ok = tile < T   # padded rows of a tile exist in the words: only tiles past the end are masked
        w_rows = w_ptr + tile * (CW * 16) + rows % 16   # word 0 of each row in path 0
        x_rows = x_ptr + ms * stride_xm
        w_lo = pid_k * WPS
        w_hi = tl.minimum(w_lo + WPS, CW)
        bitmask = 1 << tl.arange(0, 32)   # bit test with one and (no shift per element)
        to_sign = 31 - tl.arange(0, 32)   # SIGN_XOR: shift that moves bit i to the float's sign bit
        BLOCK_K: tl.constexpr = BLOCK_W * 32
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(NPATHS):
            # accumulated elementwise and reduced once per path: a reduction per step would cost more shuffles
            # than the selects and adds it sums
            pos = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)   # sum of v over the set bits
            tot = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)            # sum of v over the slice
            w_path = w_rows + p * T * CW * 16
            words, xv, hv = _gemv_block(w_path, x_rows, h_ptr + p * K, w_lo, w_hi, K, tile_ok, m_ok, BLOCK_W)
            for w0 in range(w_lo, w_hi, BLOCK_W):
                # the next block is requested before this one is used, so a program always has loads in
                # flight (Triton's pipeliner leaves these register-consumed loads alone)
                words_n, xv_n, hv_n = _gemv_block(w_path, x_rows, h_ptr + p * K, w0 + BLOCK_W, w_hi, K, tile_ok,
                                                  m_ok, BLOCK_W)
                v = xv.to(tl.float32) * hv.to(tl.float32)[None, :]                    # (BM, BK)
                if SIGN_XOR:
                    # s_j v_j by flipping v_j's sign bit where bit j is 0: shift, and, xor, add per element
                    # (one op fewer than the select below; the hardware can fuse and+xor into one LOP3)
                    flip = ((~words)[:, :, None] << to_sign[None, None, :]) & -2147483648   # (BN, BW, 32)
                    flip = tl.reshape(flip, (BLOCK_N, BLOCK_K))
                    sv = v.to(tl.int32, bitcast=True)[:, None, :] ^ flip[None, :, :]
                    pos += sv.to(tl.float32, bitcast=True)
                else:
                    plus = (words[:, :, None] & bitmask[None, None, :]) != 0          # (BN, BW, 32)
                    plus = tl.reshape(plus, (BLOCK_N, BLOCK_K))
                    tot += v
                    pos += tl.where(plus[None, :, :], v[:, None, :], 0.0)
                words, xv, hv = words_n, xv_n, hv_n
            gv = tl.load(g_ptr + p * N + rows, mask=row_ok, other=0.0).to(tl.float32)
            if SIGN_XOR:   # pos already holds sum_j s_j v_j
                y += tl.sum(pos, axis=2) * gv[None, :]
            else:
                y += (2.0 * tl.sum(pos, axis=2) - tl.sum(tot, axis=1)[:, None]) * gv[None, :]
        if HAS_BIAS:   # added once, by the first split
            y += tl.load(b_ptr + rows, mask=row_ok & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + pid_k * stride_os + ms[:, None] * stride_om + rows[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _rabit_gemv_lut_kernel(lut_ptr, w_ptr, g_ptr, b_ptr, out_ptr,
                               N, T, CW, WPS, stride_lm, stride_lp, stride_os, stride_om,
                               NPATHS: tl.constexpr, HAS_BIAS: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # Lookup-table GEMV: lut[m, p, q, n] = sum_{i<4} (bit i of n ? +1 : -1) * x[m, 4q+i] * h[p, 4q+i] (built
        # once per call by gemv_lut), so each 4-bit nibble of a sign word is one table load and one add instead of
        # four selects and adds. Program (pid_n, pid_k, pid_m): rows pid_n*BLOCK_N.., words [pid_k*WPS, +WPS) of
        # row pid_m of x. Tensors are (groups, rows) with the rows last, so that the lanes of a warp read the
        # same group's 64-byte table for different rows (one cache line per warp-wide gather).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tile = rows // 16
        tile_ok = tile < T
        w_rows = w_ptr + tile * (CW * 16) + rows % 16
        w_lo = pid_k * WPS
        w_hi = tl.minimum(w_lo + WPS, CW)
        shifts = 4 * tl.arange(0, 8)
        BLOCK_G: tl.constexpr = BLOCK_W * 8
        y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in tl.static_range(NPATHS):
            acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
            w_path = w_rows + p * T * CW * 16
            lut = lut_ptr + m * stride_lm + p * stride_lp
            for w0 in range(w_lo, w_hi, BLOCK_W):
                ws = w0 + tl.arange(0, BLOCK_W)
                w_ok = ws < w_hi
                words = tl.load(w_path[None, :] + ws[:, None] * 16, mask=w_ok[:, None] & tile_ok[None, :], other=0)
                nib = (words[:, None, :] >> shifts[None, :, None]) & 15                    # (BW, 8, BN)
                nib = tl.reshape(nib, (BLOCK_G, BLOCK_N))
                grp = tl.reshape(ws[:, None] * 8 + tl.arange(0, 8)[None, :], (BLOCK_G,))   # nibble groups
                g_ok = tl.reshape(w_ok[:, None] & (tl.arange(0, 8)[None, :] < 8), (BLOCK_G,))
                acc += tl.load(lut + grp[:, None] * 16 + nib, mask=g_ok[:, None], other=0.0)
            gv = tl.load(g_ptr + p * N + rows, mask=row_ok, other=0.0).to(tl.float32)
            y += tl.sum(acc, axis=0) * gv
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok & (pid_k == 0), other=0.0).to(tl.float32)
        tl.store(out_ptr + pid_k * stride_os + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# GEMV launch heuristic (split-K). A batch-1 GEMV reads each weight bit once, so it is bound by how many loads are
# in flight: with only cdiv(out, BLOCK_N) programs (64 for 4096 outputs) most SMs of a 132-SM GPU idle, and each
# program's serial walk over the whole input exposes the load latency. Splitting the input words into SPLIT_K
# slices aims at GEMV_PROGRAMS_PER_SM resident programs of 4 warps per SM (latency hidden by the other programs
# and by the kernel's one-block prefetch), while each program still reads GEMV_MIN_PROGRAM_BYTES of words or more
# (below that the partial sums' traffic and the launch cost more than the parallelism gains).
GEMV_PROGRAMS_PER_SM = 4
GEMV_MIN_PROGRAM_BYTES = 4096
GEMV_DEFAULT_SMS = 132   # H100 / H200 SXM; used on CPU (interpreter, compile_check)
# (BLOCK_N, BLOCK_W) per BLOCK_M, all with 4 warps and BLOCK_M*BLOCK_N*BLOCK_W*32 = 4096 selected-v accumulators
# (32 fp32 registers per thread), picked from ptxas' register counts for sm_90 with Triton 3.6 (the device's
# version), 2-3 paths, fp16, bf16 and fp32 x: 72-115 registers, no spills, no shuffles inside the loop, so 4-5
# programs fit an SM's 64K registers. Some neighbouring choices need 150-200 (e.g. (32, 2) at 2 rows: 166), and 64
# accumulators per thread 128-166. One row: (32, 4) with SIGN_XOR was within 3% of the best of 68-310 timed configs
# at each of 4096^2, 11008x4096, 4096x11008 and 8192^2 on an H200 (benchmarks/gemv_tune.py, RESULTS section 23),
# where (64, 2) without it was 3-15% slower; every config there ran at 6-10% of copy bandwidth, i.e. the kernel is
# bound by its per-element work, not by the launch parameters. Other row counts are not timed yet.
GEMV_BLOCKS = {1: (32, 4), 2: (16, 4), 4: (32, 1), 8: (16, 1)}
GEMV_NUM_WARPS = 4
# num_stages is passed for the record only: Triton's pipeliner leaves these register-consumed loads alone (the
# PTX is the same for 1, 2 and 3), hence the explicit one-block prefetch in the kernel
GEMV_NUM_STAGES = 2
# SIGN_XOR: the signed sum by flipping v's sign bit (shift, and, xor, add per element) instead of select-and-add
# with a slice total (and, compare, select, add): 1.03-1.05x (median over pairs of otherwise equal configs, H200).
GEMV_SIGN_XOR = True
# LUT: the lookup-table kernel (_rabit_gemv_lut_kernel; about 5 instructions per 4 weights instead of ~10 per
# weight at the measured rate of the others). Off until a GPU has timed it: benchmarks/gemv_tune.py sweeps it.
GEMV_LUT = False
GEMV_CONFIG_KEYS = ("SPLIT_K", "BLOCK_M", "BLOCK_N", "BLOCK_W", "num_warps", "num_stages", "SIGN_XOR", "LUT")


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; GEMV_DEFAULT_SMS elsewhere (interpreter, compile_check)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return GEMV_DEFAULT_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=4096)
def gemv_launch_params(m: int, n: int, words: int, paths: int, sms: int = GEMV_DEFAULT_SMS,
                       overrides: tuple = ()) -> dict:
    """Launch parameters of the split-K GEMV for m rows of x, n outputs, `words` 32-input words per row (in_pad/32)
    and `paths` sign planes on a GPU with `sms` multiprocessors.

    Heuristic: BLOCK_M = next_pow2(m) (at most GEMV_MAX_ROWS; more rows get more programs along grid axis 2);
    BLOCK_N and BLOCK_W from GEMV_BLOCKS, capped by the layer's size; SPLIT_K = enough slices for
    GEMV_PROGRAMS_PER_SM * sms programs, but no more than leaves each program GEMV_MIN_PROGRAM_BYTES of words.
    For 4096 x 4096, 2 paths, one row of x, 132 SMs: 128 row blocks x 5 slices of 28 words = 640 programs reading
    7 KiB each.

    `overrides`: (key, value) pairs from GEMV_CONFIG_KEYS that replace the heuristic's choice (for tuning).
    SPLIT_K is then normalized: every slice holds WPS words, a multiple of BLOCK_W, and no slice is empty (so a
    SPLIT_K above the number of word blocks gives one block per slice). Returns SPLIT_K, WPS (words per slice),
    BLOCK_M, BLOCK_N, BLOCK_W, num_warps, num_stages.
    """
    forced = dict(overrides)
    bad = [k for k in forced if k not in GEMV_CONFIG_KEYS]
    if bad:
        raise ValueError(f"unknown GEMV config key(s) {bad}; expected some of {GEMV_CONFIG_KEYS}")
    bm = forced.get("BLOCK_M", min(_next_pow2(m), GEMV_MAX_ROWS))
    bn, bw = GEMV_BLOCKS.get(bm, GEMV_BLOCKS[GEMV_MAX_ROWS])
    bn = forced.get("BLOCK_N", max(16, min(bn, _next_pow2(n))))
    bw = forced.get("BLOCK_W", min(bw, _next_pow2(words)))
    warps = forced.get("num_warps", GEMV_NUM_WARPS)
    for key, val in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_W", bw), ("num_warps", warps)):
        if not _is_pow2(val):
            raise ValueError(f"{key} must be a power of two, got {val!r}")
    if bn < 16:
        raise ValueError(f"BLOCK_N must cover whole 16-row tiles, got {bn}")
    if "SPLIT_K" in forced:
        split = forced["SPLIT_K"]
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"SPLIT_K must be a positive int, got {split!r}")
    else:
        others = _cdiv(n, bn) * _cdiv(m, bm)   # programs along the other grid axes
        min_words = _cdiv(GEMV_MIN_PROGRAM_BYTES, bn * paths * 4)
        split = max(1, min(_cdiv(GEMV_PROGRAMS_PER_SM * sms, others), words // min_words))
    wps = _cdiv(_cdiv(words, split), bw) * bw
    return {"SPLIT_K": _cdiv(words, wps), "WPS": wps, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_W": bw,
            "num_warps": warps, "num_stages": forced.get("num_stages", GEMV_NUM_STAGES),
            "SIGN_XOR": bool(forced.get("SIGN_XOR", GEMV_SIGN_XOR)), "LUT": bool(forced.get("LUT", GEMV_LUT))}


@functools.lru_cache(maxsize=None)
def _nibble_signs(device: torch.device) -> torch.Tensor:
    """(16, 4) float32: row n holds +1 where bit i of n is set, else -1."""
    n = torch.arange(16)[:, None]
    return torch.where((n >> torch.arange(4)[None, :]) & 1 == 1, 1.0, -1.0).to(device)


def gemv_lut(x2: torch.Tensor, h: torch.Tensor, words: int) -> torch.Tensor:
    """The LUT kernel's tables: (M, k, words*8, 16) float32, entry [m, p, q, n] = sum_i s_i(n) x[m, 4q+i] h[p, 4q+i]
    with s_i(n) = +1 where bit i of n is set, else -1 (inputs past x's end count as 0)."""
    M, K = x2.shape
    v = x2.float()[:, None, :] * h.float()[None]                            # (M, k, K)
    v = torch.nn.functional.pad(v, (0, words * 32 - K)).view(M, h.shape[0], words * 8, 4)
    return v @ _nibble_signs(x2.device).t()


def rabit_linear_triton(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                        bias: torch.Tensor | None = None, mode: str = "auto", *,
                        gemv_config: dict | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) in x.dtype. mode: "auto" | "gemv" | "gemm".

    gemv_config: for tuning, GEMV launch parameters that replace the heuristic's (keys from GEMV_CONFIG_KEYS,
    e.g. ``{"SPLIT_K": 8, "BLOCK_N": 32, "num_warps": 8}``); see ``gemv_launch_params``.
    """
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
    if M == 0:
        return torch.empty(*x.shape[:-1], nout, dtype=x.dtype, device=x.device)
    b = bias.contiguous() if bias is not None else g   # dummy pointer when there is no bias
    interp = interpreting()
    if mode == "gemv" or (mode == "auto" and M <= GEMV_MAX_ROWS):
        cfg = gemv_launch_params(M, nout, CW, k, sm_count(x.device), tuple(sorted((gemv_config or {}).items())))
        split, BM, BN = cfg["SPLIT_K"], cfg["BLOCK_M"], cfg["BLOCK_N"]
        # one slice: store y directly; several: float32 partials (no atomics, so the result is deterministic),
        # summed by one reduction
        out = torch.empty(split, M, nout, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
        if cfg["LUT"]:   # one row of x per program along grid axis 2
            lut = gemv_lut(x2, h, CW)
            _rabit_gemv_lut_kernel[(triton.cdiv(nout, BN), split, M)](
                lut, words, g, b, out, nout, T, CW, cfg["WPS"], lut.stride(0), lut.stride(1), out.stride(0),
                out.stride(1), NPATHS=k, HAS_BIAS=bias is not None, BLOCK_N=BN, BLOCK_W=cfg["BLOCK_W"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            y = out[0] if split == 1 else out.sum(0).to(x.dtype)
            return y.reshape(*x.shape[:-1], nout)
        grid = (triton.cdiv(nout, BN), split, triton.cdiv(M, BM))
        _rabit_gemv_kernel[grid](x2, words, g, h, b, out, M, nout, inf, T, CW, cfg["WPS"], x2.stride(0),
                                 out.stride(0), out.stride(1), NPATHS=k, HAS_BIAS=bias is not None,
                                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_W=cfg["BLOCK_W"], SIGN_XOR=cfg["SIGN_XOR"],
                                 num_warps=cfg["num_warps"],
                                 num_stages=cfg["num_stages"])
        y = out[0] if split == 1 else out.sum(0).to(x.dtype)
        return y.reshape(*x.shape[:-1], nout)
    y = torch.empty(M, nout, dtype=x.dtype, device=x.device)
    BM = 16 if interp else 64
    BN = 16 if interp else 64
    BW = 1 if interp else 2
    grid = (triton.cdiv(M, BM), triton.cdiv(nout, BN))
    _rabit_gemm_kernel[grid](x2, words, g, h, b, y, M, nout, inf, T, CW, x2.stride(0), y.stride(0),
                             NPATHS=k, HAS_BIAS=bias is not None,
                             DOT_F32=x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16),
                             BLOCK_M=BM, BLOCK_N=BN, BLOCK_W=BW)
    return y.reshape(*x.shape[:-1], nout)


def compile_check(capability: int = 90, warp_size: int = 32) -> dict[str, int]:
    """Compile both kernels for a CUDA target without needing a GPU (Triton's bundled ptxas); returns the PTX size
    per variant.  Raises if a kernel does not lower.  The GEMV variants use the heuristic's parameters for 1, 4
    and 8 rows of x (4096 x 4096, 2-3 paths), storing float32 partials or, with one slice, y itself."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, warp_size)
    scalars = {"x_ptr": "*fp32", "w_ptr": "*i32", "g_ptr": "*fp16", "h_ptr": "*fp16", "b_ptr": "*fp16",
               "M": "i32", "N": "i32", "K": "i32", "T": "i32", "CW": "i32", "stride_xm": "i32"}
    gemv_sig = dict(scalars, out_ptr="*fp32", WPS="i32", stride_os="i32", stride_om="i32")
    gemm_sig = dict(scalars, y_ptr="*fp32", stride_ym="i32")

    def gemv(rows: int, paths: int, bias: bool, over: dict, forced: tuple = ()):
        cfg = gemv_launch_params(rows, 4096, 128, paths, overrides=forced)
        consts = dict(NPATHS=paths, HAS_BIAS=bias, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_W=cfg["BLOCK_W"], SIGN_XOR=cfg["SIGN_XOR"])
        return _rabit_gemv_kernel, dict(gemv_sig, **over), consts, dict(num_warps=cfg["num_warps"],
                                                                         num_stages=cfg["num_stages"])

    variants = {
        "gemv_fp32_m1": gemv(1, 2, True, {}),
        "gemv_fp16_m1_direct": gemv(1, 2, False, {"x_ptr": "*fp16", "out_ptr": "*fp16"}, (("SPLIT_K", 1),)),
        "gemv_bf16_m4": gemv(4, 3, False, {"x_ptr": "*bf16"}),
        "gemv_fp16_m8": gemv(8, 2, True, {"x_ptr": "*fp16"}),
        "gemv_fp16_m1_select": gemv(1, 2, False, {"x_ptr": "*fp16"}, (("SIGN_XOR", False),)),
        "gemv_lut_fp16_m1": (_rabit_gemv_lut_kernel,
                             {"lut_ptr": "*fp32", "w_ptr": "*i32", "g_ptr": "*fp16", "b_ptr": "*fp16",
                              "out_ptr": "*fp32", **{a: "i32" for a in ("N", "T", "CW", "WPS", "stride_lm",
                                                                        "stride_lp", "stride_os", "stride_om")}},
                             dict(NPATHS=2, HAS_BIAS=True, BLOCK_N=32, BLOCK_W=4), dict(num_warps=4)),
        "gemm_bf16": (_rabit_gemm_kernel, dict(gemm_sig, x_ptr="*bf16", y_ptr="*bf16"),
                      dict(NPATHS=2, HAS_BIAS=True, DOT_F32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_W=2), {}),
        "gemm_fp32": (_rabit_gemm_kernel, gemm_sig,
                      dict(NPATHS=2, HAS_BIAS=False, DOT_F32=True, BLOCK_M=64, BLOCK_N=64, BLOCK_W=2), {}),
    }
    sizes = {}
    for name, (kern, sig, consts, options) in variants.items():
        sig = dict(sig, **{k: "constexpr" for k in consts})
        compiled = triton.compile(triton.compiler.ASTSource(fn=kern, signature=sig, constexprs=consts),
                                  target=target, options=options)
        sizes[name] = len(compiled.asm["ptx"])
    return sizes
