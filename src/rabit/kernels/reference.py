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
