"""The coupled RaBiT linear map as one autograd function (the fast twin of the layer's autograd composition).

The plain composition (RaBiTLinear._weight_with_ste) builds sum_i g_i B_i h_i from float sign planes and
lets autograd record every product: each forward makes and keeps several dense out x in temporaries per path
(float signs, g_i B_i, the path matrix, the straight-through bridge), and the backward walks them again. Here
the weight, the sign planes (as bool) and the clipped-STE mask are made once, without a graph
(`coupled_weight`), and the backward computes the gradients in closed form from d loss / d W:

    d latent = dW (times the STE mask),   d g_i = (dW * B_i) @ h_i,   d h_i = g_i @ (dW * B_i).

The forward value is bitwise the composition's; the scale gradients differ by summation order only. On CPU both
the derivation and the scale gradients of all k paths are one native pass each over out x in
(rabit.kernels.coupled_cpu, no per-path temporaries); `coupled_weight_reference` and `scale_grads_reference`
are the PyTorch formulas they are tested against and fall back to (other devices, dtypes, layouts, no compiler).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import coupled_cpu


@torch.no_grad()
def coupled_weight(latent: torch.Tensor, g: list[torch.Tensor], h: list[torch.Tensor],
                   clip: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """(W, positives, mask) of the coupled derivation B_1 = sign(latent), B_2 = sign(latent - g_1 B_1 h_1), ...

    W = sum_i g_i B_i h_i (fp32, the same floats as summing path_matrix(g_i, B_i, h_i)); positives[i] is the
    bool plane B_i == +1 (sign(0) = +1, as binarize); mask (bool) is |latent| <= clip * sum_i |g_i| |h_i|^T
    for the clipped STE, None when clip is None. The native kernel when it takes the inputs (bitwise the same
    result), else coupled_weight_reference.
    """
    if coupled_cpu.supports_derive(latent, g, h) and coupled_cpu.is_available():
        weight, positives, mask, finite = coupled_cpu.derive_cpu(latent, g, h, clip)
        if not finite:   # as the reference: a non-finite latent must show in the weight
            weight = weight + (latent - latent)
        return weight, positives, mask
    return coupled_weight_reference(latent, g, h, clip)


@torch.no_grad()
def coupled_weight_reference(latent: torch.Tensor, g: list[torch.Tensor], h: list[torch.Tensor],
                             clip: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """coupled_weight in plain PyTorch (any device): several dense out x in temporaries per path."""
    residual = latent
    weight = None
    positives = []
    for i, (gi, hi) in enumerate(zip(g, h)):
        pos = residual >= 0
        positives.append(pos)
        outer = gi[:, None] * hi[None, :]
        term = torch.where(pos, outer, outer.neg())  # == (g_i * B_i) * h_i exactly: B_i = +-1 only flips signs
        del outer
        if i + 1 < len(g):
            residual = residual - term
        weight = term if weight is None else weight.add_(term)
    if not torch.isfinite(latent).all():
        # The composition's straight-through bridge (latent - latent) made these weights NaN: a non-finite
        # latent must show in the loss (the trainer stops on it), not be silently binarized to +-1.
        weight = weight + (latent - latent)
    mask = None
    if clip is not None:
        bound = None
        for gi, hi in zip(g, h):
            b = gi.abs()[:, None] * hi.abs()[None, :]
            bound = b if bound is None else bound.add_(b)
        mask = latent.abs() <= bound.mul_(clip)
    return weight, positives, mask


def signed(grad: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """grad * B with B = +1 where `positive`, else -1."""
    return torch.where(positive, grad, grad.neg())


def scale_grads_reference(grad_w: torch.Tensor, positives, g, h) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([d g_i], [d h_i]) from d loss / d W: d g_i = (dW * B_i) @ h_i, d h_i = g_i @ (dW * B_i), B_i = +-1 from
    the bool planes `positives` (True = +1). Plain PyTorch, any device: one dense out x in temporary per path."""
    dg, dh = [], []
    for pos, gi, hi in zip(positives, g, h):
        p = signed(grad_w, pos)
        dg.append(p @ hi)
        dh.append(gi @ p)
    return dg, dh


def scale_grads(grad_w: torch.Tensor, positives, g, h) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """scale_grads_reference's values (to fp32 summation order), from one pass over grad_w for all paths when
    the native CPU kernel takes the inputs (CPU, an fp32 or bf16 grad_w, contiguous, the library built), else the
    reference on grad_w in fp32 (the kernel reads a bf16 grad_w as it is: the same sums as of its fp32 copy)."""
    if coupled_cpu.supports(grad_w, positives, g, h) and coupled_cpu.is_available():
        return coupled_cpu.scale_grads_cpu(grad_w, positives, g, h)
    return scale_grads_reference(grad_w.float(), positives, g, h)


class _CoupledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, positives, mask, compute_dtype, bias, latent, *scales):
        k = len(positives)
        xc = x.to(compute_dtype)
        wc = weight.to(compute_dtype)
        bc = None if bias is None else bias.to(compute_dtype)
        out = F.linear(xc, wc, bc)
        # the backward's d x = d out @ W in the compute dtype: keep the cast made here (d out has out's dtype, so
        # this is the tensor the backward would make again; under bf16 autocast it is also half the fp32 weight)
        ctx.save_for_backward(xc, wc, *scales)
        ctx.positives, ctx.mask, ctx.k = positives, mask, k
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc, *scales = ctx.saved_tensors
        k = ctx.k
        g, h = scales[:k], scales[k:]
        need = ctx.needs_input_grad
        grad_x = grad_bias = grad_latent = None
        grad_scales = [None] * (2 * k)
        go = grad_out.reshape(-1, grad_out.shape[-1])
        if need[0]:
            grad_x = (grad_out @ wc.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.has_bias and need[5]:
            grad_bias = go.float().sum(0)
        if need[6] or any(need[7:]):
            grad_w = go.T @ xc.reshape(-1, xc.shape[-1])
            # in the compute dtype: scale_grads takes it as it is; the latent's gradient is fp32
            if need[6]:
                grad_w = grad_w.float()
                grad_latent = grad_w if ctx.mask is None else grad_w * ctx.mask
            if any(need[7:]):
                dg, dh = scale_grads(grad_w, ctx.positives, g, h)
                grad_scales = [d if need[7 + j] else None for j, d in enumerate(dg + dh)]
        return (grad_x, None, None, None, None, grad_bias, grad_latent, *grad_scales)


def coupled_linear(x: torch.Tensor, latent: torch.Tensor, g: list[torch.Tensor], h: list[torch.Tensor],
                   bias: torch.Tensor | None, state: tuple | None = None, clip: float | None = None) -> torch.Tensor:
    """x @ W^T + bias with W the coupled weight of (latent, g, h), its gradients as RaBiT's STE defines them.

    `state` is coupled_weight(latent, g, h, clip), when the caller keeps it between calls. The matmul runs in
    the autocast dtype when autocast is on (as F.linear would), else in x's dtype.
    """
    if state is None:
        state = coupled_weight(latent.detach(), [t.detach() for t in g], [t.detach() for t in h], clip)
    weight, positives, mask = state
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return _CoupledLinear.apply(x, weight, positives, mask, dtype, bias, latent, *g, *h)
