"""I/O channel-importance preconditioning: pure functions on tensors.

The quantization error that matters is the layer's output error on real inputs, weighted by how much each
output matters to the loss. With input importance s_in (per input channel, from activation magnitudes) and
output importance s_out (per output channel, from output-gradient magnitudes), we decompose
W' = diag(s_out^a_out) W diag(s_in^a_in) instead of W, then map the scales back:
g = g' / s_out^a_out, h = h' / s_in^a_in (the sign planes are unchanged by positive diagonal scalings).
"""
from __future__ import annotations

from typing import Callable

import torch

from .svid import BinaryPath


def importance_weights(stat: torch.Tensor, alpha: float, eps: float = 1e-8) -> torch.Tensor:
    """stat^alpha, normalized to geometric mean 1 so that preconditioning does not change the overall scale.

    Channels whose statistic is zero (never active in calibration) get the smallest non-zero weight instead
    of 0, so that the mapping back (division) stays finite.
    """
    stat = stat.to(torch.float32)
    positive = stat[stat > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0)
    s = stat.clamp_min(max(float(floor), eps)) ** alpha
    return s / torch.exp(torch.log(s).mean())


def precondition_weight(w: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    return s_out[:, None] * w * s_in[None, :]


def unprecondition_paths(paths: list[BinaryPath], s_out: torch.Tensor, s_in: torch.Tensor) -> list[BinaryPath]:
    return [(g / s_out, B, h / s_in) for g, B, h in paths]


def preconditioned_decompose(
    w: torch.Tensor,
    decompose_fn: Callable[[torch.Tensor], list[BinaryPath]],
    in_stat: torch.Tensor | None,
    out_stat: torch.Tensor | None,
    alpha_in: float,
    alpha_out: float,
) -> list[BinaryPath]:
    """Decompose w in the space weighted by channel importance, then map the scales back."""
    w = w.to(torch.float32)
    s_in = importance_weights(in_stat, alpha_in) if in_stat is not None else w.new_ones(w.shape[1])
    s_out = importance_weights(out_stat, alpha_out) if out_stat is not None else w.new_ones(w.shape[0])
    paths = decompose_fn(precondition_weight(w, s_out, s_in))
    return unprecondition_paths(paths, s_out, s_in)
