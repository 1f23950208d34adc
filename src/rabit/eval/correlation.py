"""Pearson correlation, exact and streamed, over all entries of two tensors of the same shape."""
from __future__ import annotations

import math

import torch

__all__ = ["pearson", "PearsonAccumulator"]


class PearsonAccumulator:
    """Pearson correlation of two tensors' entries, accumulated batch by batch.

    Keeps float64 running means and co-moments, merged with Chan et al.'s pairwise update, so that
    large offsets and millions of entries do not lose precision. ``value`` is NaN when either side is
    constant (zero variance) or nothing was added.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_a = 0.0
        self.mean_b = 0.0
        self.m2_a = 0.0
        self.m2_b = 0.0
        self.c_ab = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> "PearsonAccumulator":
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        a = a.detach().reshape(-1).to(torch.float64)
        b = b.detach().reshape(-1).to(torch.float64)
        n_b = a.numel()
        if n_b == 0:
            return self
        ma, mb = a.mean(), b.mean()
        da, db = a - ma, b - mb
        m2a, m2b, cab = float((da * da).sum()), float((db * db).sum()), float((da * db).sum())
        ma, mb = float(ma), float(mb)
        n_a = self.n
        n = n_a + n_b
        delta_a, delta_b = ma - self.mean_a, mb - self.mean_b
        f = n_a * n_b / n
        self.m2_a += m2a + delta_a * delta_a * f
        self.m2_b += m2b + delta_b * delta_b * f
        self.c_ab += cab + delta_a * delta_b * f
        self.mean_a += delta_a * n_b / n
        self.mean_b += delta_b * n_b / n
        self.n = n
        return self

    @property
    def value(self) -> float:
        denom = math.sqrt(self.m2_a * self.m2_b)
        if self.n == 0 or denom == 0.0 or not math.isfinite(denom):
            return float("nan")
        return max(-1.0, min(1.0, self.c_ab / denom))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation over all entries of ``a`` and ``b`` (same shape); NaN if either is constant."""
    return PearsonAccumulator().add(a, b).value
