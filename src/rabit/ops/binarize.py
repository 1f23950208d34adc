"""Sign with sign(0) = +1 and the straight-through estimators used by the RaBiT layer."""
from __future__ import annotations

import torch


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sign in {-1, +1} with sign(0) = +1, in x's dtype.

    torch.sign maps 0 to 0, which would drop a weight from every path; +1 keeps B_i strictly binary so that
    it packs into one bit.
    """
    return (x >= 0).to(x.dtype).mul_(2).sub_(1)


def ste_mask(latent: torch.Tensor, bound: torch.Tensor | None, clip: float) -> torch.Tensor | None:
    """Gradient mask of the clipped STE: 1 where |latent| <= clip * bound, else 0.

    `bound` is the largest magnitude the binary paths can represent at each position (sum_i g_i h_i^T):
    beyond it, moving the latent further cannot change the quantized value, so its gradient is dropped.
    Returns None for the identity STE (bound is None).
    """
    if bound is None:
        return None
    return (latent.abs() <= clip * bound).to(latent.dtype)


class _SignSTE(torch.autograd.Function):
    """sign(x) forward; backward passes the gradient through, optionally masked (|x| <= clip)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float | None):
        if clip is not None:
            ctx.save_for_backward(x)
        ctx.clip = clip
        return binarize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.clip is None:
            return grad, None
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(x: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """sign(x) in {-1,+1} whose gradient is the straight-through estimate (identity, or clipped at |x|<=clip)."""
    return _SignSTE.apply(x, clip)


def straight_through(value: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return `value` in the forward pass while routing d(loss)/d(value) to `latent` (times `mask`).

    value + (latent - latent.detach()) equals value numerically, and its gradient w.r.t. latent is the identity.
    `value` keeps its own graph, so scales inside it still receive their ordinary gradients.
    """
    bridge = latent - latent.detach()
    if mask is not None:
        bridge = bridge * mask
    return value + bridge
