"""Packing of RaBiT sign planes B_i in {-1,+1} into bits.

Layout ("tiled16x32", used by every kernel backend)
----------------------------------------------------
For k sign planes of shape (out, in) the packed tensor is ``uint8`` of shape

    (k, out_pad // 16, in_pad // 32, 16, 4)     out_pad = ceil(out/16)*16, in_pad = max(32, ceil(in/32)*32)

i.e. one little-endian 32-bit word per (path, row, 32 consecutive inputs), with the words of the 16 rows of a
row tile contiguous (64 bytes):

    bit i of the word packed[p, t, c, r, :]  (byte i // 8, bit i % 8)  =  B[p, 16*t + r, 32*c + i] > 0

A kernel loads 64 bytes and has the signs of 16 rows x 32 inputs, one row per 32-bit lane: this is what the CPU
lookup-table kernel wants (``vpermps`` reads the low 4 bits of each 32-bit lane, nibble n = inputs 4n..4n+3) and
what the Triton kernels read (``packed.view(torch.int32)``, shape (k, out_pad/16, in_pad/32, 16)).

Padding bits (rows >= out or columns >= in) are set to 1 (= +1); kernels treat padded x entries as 0 and
never write padded rows, so they do not matter for the result.

The plain row-major bit packing (``pack_bits`` / ``unpack_bits``, ``(..., n) -> (..., ceil(n/8))``, bit j of
byte c = element 8c + j) is also exposed; ``tile_rows`` / ``untile_rows`` convert between the two.
"""
from __future__ import annotations

import torch

ROW_TILE = 16   # rows per tile
IN_ALIGN = 32   # the input dimension is padded to a multiple of this (bits)
LAYOUT = "tiled16x32"



def _bit_weights(device) -> torch.Tensor:
    """[1, 2, 4, ..., 128] as uint8, made per call (not a module constant, so that the reference stays traceable
    by torch.compile and fake tensors)."""
    return torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)


def padded_out(out_features: int) -> int:
    return -(-out_features // ROW_TILE) * ROW_TILE


def padded_in(in_features: int) -> int:
    return max(IN_ALIGN, -(-in_features // IN_ALIGN) * IN_ALIGN)


def packed_shape(num_paths: int, out_features: int, in_features: int) -> tuple[int, int, int, int, int]:
    return (num_paths, padded_out(out_features) // ROW_TILE, padded_in(in_features) // 32, ROW_TILE, 4)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (..., n) -> uint8 (..., ceil(n/8)); bit j of byte c is bits[..., 8c + j]. Missing tail bits are 1."""
    bits = bits.to(torch.bool)
    n = bits.shape[-1]
    n8 = -(-n // 8) * 8
    if n8 != n:
        pad = torch.ones(*bits.shape[:-1], n8 - n, dtype=torch.bool, device=bits.device)
        bits = torch.cat([bits, pad], dim=-1)
    b = bits.reshape(*bits.shape[:-1], n8 // 8, 8).to(torch.uint8)
    return (b * _bit_weights(b.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., m) -> bool (..., n) (inverse of ``pack_bits``)."""
    w = _bit_weights(packed.device)
    bits = (packed.unsqueeze(-1) & w) != 0
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n]


def tile_rows(rowmajor: torch.Tensor) -> torch.Tensor:
    """Row-major bytes (k, out_pad, in_pad/8) -> tiled (k, out_pad/16, in_pad/32, 16, 4)."""
    k, rows, nb = rowmajor.shape
    if rows % ROW_TILE or nb % 4:
        raise ValueError(f"cannot tile {tuple(rowmajor.shape)}: rows must be a multiple of 16, bytes of 4")
    return rowmajor.reshape(k, rows // ROW_TILE, ROW_TILE, nb // 4, 4).transpose(2, 3).contiguous()


def untile_rows(tiled: torch.Tensor) -> torch.Tensor:
    """Tiled (k, out_pad/16, in_pad/32, 16, 4) -> row-major bytes (k, out_pad, in_pad/8)."""
    k, t, c, r, four = tiled.shape
    return tiled.transpose(2, 3).reshape(k, t * r, c * four)


def pack_signs(signs) -> torch.Tensor:
    """Pack sign planes into the tiled16x32 layout.

    signs: a tensor (out, in) or (k, out, in), or a list of k (out, in) tensors; an entry > 0 is +1,
    anything else (including 0) is -1.  Returns a contiguous uint8 tensor ``packed_shape(k, out, in)``
    on the same device.
    """
    if isinstance(signs, (list, tuple)):
        signs = torch.stack([torch.as_tensor(s) for s in signs])
    if signs.dim() == 2:
        signs = signs.unsqueeze(0)
    if signs.dim() != 3:
        raise ValueError(f"expected (out, in) or (k, out, in) signs, got shape {tuple(signs.shape)}")
    k, out, inf = signs.shape
    if out < 1 or inf < 1:
        raise ValueError("empty sign plane")
    bits = signs > 0
    op, ip = padded_out(out), padded_in(inf)
    if op != out or ip != inf:
        full = torch.ones(k, op, ip, dtype=torch.bool, device=bits.device)
        full[:, :out, :inf] = bits
        bits = full
    return tile_rows(pack_bits(bits))


def unpack_signs(packed: torch.Tensor, out_features: int, in_features: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """tiled16x32 packed -> (k, out, in) tensor of +-1 in ``dtype``."""
    if packed.dim() != 5 or packed.shape[-2:] != (ROW_TILE, 4):
        raise ValueError(f"not a tiled16x32 packed tensor: shape {tuple(packed.shape)}")
    bits = unpack_bits(untile_rows(packed), in_features)[:, :out_features]
    one = torch.ones((), dtype=dtype, device=packed.device)
    return torch.where(bits, one, -one)


def check_packed(packed: torch.Tensor, out_features: int, in_features: int) -> int:
    """Validate a packed tensor against the layer shape; returns k."""
    if packed.dtype != torch.uint8 or packed.dim() != 5:
        raise ValueError(f"packed signs must be a 5-d uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    k = packed.shape[0]
    if tuple(packed.shape) != packed_shape(k, out_features, in_features):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not match out={out_features}, "
                         f"in={in_features}: expected {packed_shape(k, out_features, in_features)}")
    return k


def packed_nbytes(num_paths: int, out_features: int, in_features: int) -> int:
    k, t, c, r, four = packed_shape(num_paths, out_features, in_features)
    return k * t * c * r * four
