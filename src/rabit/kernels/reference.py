"""Reference RaBiT linear: unpack the sign planes to +-1 and use dense matmuls. Obviously correct, slow."""
from __future__ import annotations

import torch

from ..sign_bits import unpack_signs


def rabit_linear_reference(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                           bias: torch.Tensor | None = None,
                           compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = sum_i g_i * ((h_i * x) @ B_i^T) + bias, computed in ``compute_dtype``, returned in x.dtype.

    x: (..., in); packed: tiled16x32 uint8 (k, out_pad/16, in_pad/32, 16, 4); g: (k, out); h: (k, in); bias: (out,).
    """
    k, out, inf = g.shape[0], g.shape[-1], h.shape[-1]
    signs = unpack_signs(packed, out, inf, dtype=compute_dtype)            # (k, out, in) of +-1
    xf = x.reshape(-1, inf).to(compute_dtype)
    y = torch.zeros(xf.shape[0], out, dtype=compute_dtype, device=x.device)
    for i in range(k):
        y += ((xf * h[i].to(compute_dtype)) @ signs[i].T) * g[i].to(compute_dtype)
    if bias is not None:
        y += bias.to(compute_dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


# the "cpu_int8" kernel's table quantization (Q8_BLOCK, Q8_MAX in csrc/rabit_cpu.c)
LUT8_BLOCK = 64    # inputs per table scale
LUT8_MAX = 127     # largest |entry| (int8)


def rabit_linear_lut8_reference(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                                bias: torch.Tensor | None = None,
                                compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """What the "cpu_int8" backend computes for each input row, in plain PyTorch.

    Per path i and group of 4 inputs q: a = h_i * x (fp32); the 16 table entries T[m] = (+-a0 +-a1) + (+-a2 +-a3)
    (fp32, bit j of m: the sign of a_j); per block of LUT8_BLOCK inputs s_b = max|T| / LUT8_MAX and
    Tq = round(T * LUT8_MAX / max|T|) in [-LUT8_MAX, LUT8_MAX]. Row r looks up the entry of its 4 signs:
    y_r = sum_i g_i[r] * sum_b s_b * (sum of Tq over the groups of block b) + bias. The integer sums are exact, so the
    native kernel differs from this only by its fp32 rounding of the last two sums.
    """
    k, out, inf = g.shape[0], g.shape[-1], h.shape[-1]
    in_pad = max(32, -(-inf // 32) * 32)
    ng = in_pad // 4
    signs = torch.ones(k, out, in_pad)
    signs[:, :, :inf] = unpack_signs(packed, out, inf, dtype=torch.float32)
    s4 = signs.view(k, out, ng, 4)
    xf = x.reshape(-1, inf).float()
    rows = []
    for xr in xf:
        yr = torch.zeros(out, dtype=compute_dtype)
        for i in range(k):
            a = torch.zeros(in_pad)
            a[:inf] = h[i].float() * xr
            a4 = a.view(ng, 4)
            t = (s4[i, :, :, 0] * a4[:, 0] + s4[i, :, :, 1] * a4[:, 1]) + (s4[i, :, :, 2] * a4[:, 2]
                                                                          + s4[i, :, :, 3] * a4[:, 3])   # (out, ng)
            top = (a4[:, 0].abs() + a4[:, 1].abs()) + (a4[:, 2].abs() + a4[:, 3].abs())   # max_m |T[m]| per group
            gpb = LUT8_BLOCK // 4
            for q0 in range(0, ng, gpb):
                m = top[q0:q0 + gpb].max()
                inv = torch.tensor(float(LUT8_MAX), dtype=torch.float32) / m if m > 0 else torch.zeros(())
                tq = torch.round(t[:, q0:q0 + gpb] * inv).clamp(-LUT8_MAX, LUT8_MAX).to(torch.int64)
                scale = (m / LUT8_MAX).to(compute_dtype)
                yr += g[i].to(compute_dtype) * (scale * tq.sum(1).to(compute_dtype))
        rows.append(yr + (bias.to(compute_dtype) if bias is not None else 0))
    y = torch.stack(rows) if rows else torch.zeros(0, out, dtype=compute_dtype)
    return y.to(x.dtype if compute_dtype == torch.float32 else compute_dtype).reshape(*x.shape[:-1], out)


def dense_weight_reference(packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = sum_i g_i[:, None] * B_i * h_i[None, :] as a dense (out, in) tensor."""
    k, out, inf = g.shape[0], g.shape[-1], h.shape[-1]
    signs = unpack_signs(packed, out, inf, dtype=dtype)
    w = torch.zeros(out, inf, dtype=dtype, device=packed.device)
    for i in range(k):
        w += g[i].to(dtype)[:, None] * signs[i] * h[i].to(dtype)[None, :]
    return w


def groupwise_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                               group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a group-quantized W (``rabit.embedquant`` layout), dequantized in full; in x.dtype."""
    from ..embedquant import dequantize_groupwise   # embedquant calls the kernels: import at use

    w = dequantize_groupwise(codes, scales, bits, group_size, torch.float32)
    y = torch.nn.functional.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
