"""PackedRaBiTLinear: the inference form of a RaBiT layer (bit-packed sign planes + half-precision scales)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import sign_bits
from .kernels import dense_weight, rabit_linear


class PackedRaBiTLinear(nn.Module):
    """y = sum_i g_i * (B_i @ (h_i * x)) + bias with B_i in {-1,+1} stored as bits.

    Buffers (all saved in the state dict):
      packed (uint8, ``sign_bits.packed_shape(k, out, in)``, layout ``sign_bits.LAYOUT``): the k sign planes;
      g (k, out) and h (k, in) in ``scale_dtype`` (default fp16); bias (out,) in ``scale_dtype`` or None.
    ``backend`` ("auto", "reference", "cpu", "cpu_int8", "triton") is passed to ``rabit.kernels.rabit_linear`` (the
    operator ``torch.ops.rabit.packed_linear``).
    The output has the dtype of the input (fp32/bf16/fp16 activations).
    """

    def __init__(self, in_features: int, out_features: int, num_paths: int = 2, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, device=None, backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_paths = in_features, out_features, num_paths
        self.backend = backend
        shape = sign_bits.packed_shape(num_paths, out_features, in_features)
        self.register_buffer("packed", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("g", torch.zeros(num_paths, out_features, dtype=scale_dtype, device=device))
        self.register_buffer("h", torch.zeros(num_paths, in_features, dtype=scale_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device))
        else:
            self.register_buffer("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_paths(cls, paths: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                   backend: str = "auto") -> PackedRaBiTLinear:
        """paths: k tuples (g (out,), B (out, in) with entries > 0 meaning +1, h (in,)); dtype: scale dtype."""
        if len(paths) == 0:
            raise ValueError("need at least one path")
        out_f, in_f = paths[0][1].shape
        for g, B, h in paths:
            if tuple(B.shape) != (out_f, in_f) or g.numel() != out_f or h.numel() != in_f:
                raise ValueError(f"inconsistent path shapes: g {tuple(g.shape)}, B {tuple(B.shape)}, "
                                 f"h {tuple(h.shape)}")
        device = paths[0][1].device
        m = cls(in_f, out_f, num_paths=len(paths), bias=bias is not None, scale_dtype=dtype, device=device,
                backend=backend)
        with torch.no_grad():
            m.packed.copy_(sign_bits.pack_signs(torch.stack([B.detach() for _, B, _ in paths])))
            m.g.copy_(torch.stack([g.detach().reshape(-1) for g, _, _ in paths]))
            m.h.copy_(torch.stack([h.detach().reshape(-1) for _, _, h in paths]))
            if bias is not None:
                m.bias.copy_(bias.detach().reshape(-1))
        return m

    @classmethod
    def from_rabit(cls, layer: nn.Module, dtype: torch.dtype = torch.float16,
                   backend: str = "auto") -> PackedRaBiTLinear:
        """From a ``rabit.layer.RaBiTLinear`` (anything with ``paths()`` and ``bias``)."""
        with torch.no_grad():
            return cls.from_paths(layer.paths(), getattr(layer, "bias", None), dtype=dtype, backend=backend)

    # ------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers   # not self.packed etc.: nn.Module.__getattr__ costs ~1 us each, per call
        return rabit_linear(x, b["packed"], b["g"], b["h"], b["bias"], backend=self.backend)

    def unpacked_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight sum_i g_i[:, None] * B_i * h_i[None, :] (for checks)."""
        return dense_weight(self.packed, self.g, self.h, dtype=dtype)

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The sign planes as a (k, out, in) tensor of +-1."""
        return sign_bits.unpack_signs(self.packed, self.out_features, self.in_features, dtype=dtype)

    def bits_per_weight(self, include_padding: bool = False) -> float:
        """Stored bits per weight: sign bits plus the g and h scales (bias not counted).

        Without padding: k + 16 * k * (out + in) / (out * in) for fp16 scales (2.0156 for 4096x4096, k=2).
        """
        n = self.out_features * self.in_features
        sign_bits = (self.packed.numel() * 8 if include_padding else self.num_paths * n)
        scale_bits = (self.g.numel() * self.g.element_size() + self.h.numel() * self.h.element_size()) * 8
        return (sign_bits + scale_bits) / n

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_paths={self.num_paths}, "
                f"bias={self.bias is not None}, scale_dtype={self.g.dtype}, backend={self.backend!r}")
