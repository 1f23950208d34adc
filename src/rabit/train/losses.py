"""Distillation losses: KL(teacher || student) on next-token distributions plus gamma x hidden-state MSE.

The KL term is a fused autograd function: it walks the tokens in chunks, and for each chunk computes the
loss and, at once, its gradient with respect to the student logits (softmax(s/T) - softmax(t/T)) * T / n.
Only that gradient is kept for the backward pass, in the logits' dtype (bf16 under autocast), instead of
the fp32 log-softmax and teacher probabilities that autograd would save, and the softmaxes are computed
once per chunk. With a 49k vocabulary a 512-token sequence has 25M logits, so this saves ~200 MB and a
few element-wise passes per step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..kernels.attention import fast_attention
from .frozen_casts import cast_linear_weights


def _kl_chunk(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool,
              out: torch.Tensor | None = None):
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)), and d(sum)/d s (unscaled, fp32), for one chunk: the native
    kernel (rabit.kernels.kl_cpu) for 2-D CPU logits, else the PyTorch reference. out: an fp32 tensor of the chunk's
    shape to hold the gradient (the native kernel writes it there; the reference's result is copied in)."""
    s = s.detach().float()
    t = t.detach().float()
    if s.dim() == 2 and s.device.type == "cpu":
        from ..kernels import kl_cpu

        if kl_cpu.supports(s, t) and (out is None or kl_cpu.supports(s, out)) and kl_cpu.is_available():
            return kl_cpu.kl_rows(s, t, temperature, want_grad, out=out)
    kl, grad = _kl_chunk_reference(s, t, temperature, want_grad)
    return kl, (out.copy_(grad) if out is not None and grad is not None else grad)


def _kl_chunk_reference(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool):
    """_kl_chunk in plain PyTorch: the ground truth of the native kernel, and its fallback."""
    s = s.float()
    t = t.float()
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    pt = log_pt.exp()
    # xlogy-style: where pt == 0 the term is 0 (log_pt = -inf there would otherwise give nan).
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum()
    grad = None
    if want_grad:
        grad = log_ps.exp_().sub_(pt)  # softmax(s/T) - softmax(t/T), reusing log_ps' memory
        if temperature != 1.0:
            grad = grad.div_(temperature)
    return kl, grad


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int):
        v = student.shape[-1]
        s2 = student.reshape(-1, v)
        t2 = teacher.detach().reshape(-1, v)
        n = s2.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(s2) if want_grad else None
        # the gradient rows are _kl_chunk's output, except where the native kernel (CPU) would need an fp32 copy
        # of non-fp32 rows (bf16 under autocast): there one fp32 chunk buffer, copied into the rows
        via_buf = grad is not None and grad.dtype != torch.float32 and student.device.type == "cpu"
        buf = torch.empty(min(chunk, n), v) if via_buf else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, n, chunk):
            dst = None if grad is None else buf[:min(chunk, n - a)] if via_buf else grad[a:a + chunk]
            kl, g = _kl_chunk(s2[a:a + chunk], t2[a:a + chunk], temperature, want_grad, out=dst)
            total += kl
            if via_buf:
                grad[a:a + chunk].copy_(g)
        # Mean over tokens, times T^2 (Hinton et al.) so that gradient magnitudes do not depend on T.
        scale = temperature * temperature / max(n, 1)
        if want_grad:
            ctx.save_for_backward(grad)
            ctx.scale = scale
            ctx.shape = student.shape
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = grad.float().mul_(grad_out * ctx.scale).to(grad.dtype)
        return g.reshape(ctx.shape), None, None, None


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  chunk_tokens: int = 256) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), p = softmax(logits / T), times T^2.

    Both logits are (..., vocab); the teacher's never receive gradients. Computed in fp32 in chunks of
    `chunk_tokens` rows whatever the input dtype. Zero (up to rounding) when the logits are equal.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedKL.apply(student_logits, teacher_logits, float(temperature), int(chunk_tokens))


def kl_divergence_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """Plain autograd version of kl_divergence (for tests and comparisons)."""
    v = student_logits.shape[-1]
    log_ps = torch.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.detach().float().reshape(-1, v) / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_ps, log_pt, log_target=True, reduction="sum")
    return kl * temperature ** 2 / log_ps.shape[0]


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the mean squared difference of the block outputs (computed in fp32)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states vs {len(teacher_hidden)} teacher ones")
    if not student_hidden:
        raise ValueError("no hidden states to compare")
    total = None
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise ValueError(f"hidden state shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        term = (s.float() - t.detach().float()).pow(2).mean()
        total = term if total is None else total + term
    return total / len(student_hidden)


HIDDEN_LOSSES = ("mse", "relative")


def hidden_relative_error(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                          eps: float = 1e-6) -> torch.Tensor:
    """Mean over blocks and tokens of ||s - t||^2 / ||t||^2 (each token's hidden vector, in fp32).

    Why: in many LMs a few tokens (the first of a sequence, attention sinks) carry hidden states hundreds of
    times larger than the rest, and the residual stream grows with depth; a plain MSE is then dominated by
    those tokens and the last blocks, and swings by 10x from batch to batch. The relative error weighs every
    token and every block equally and is invariant to the scale of the hidden states.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states vs {len(teacher_hidden)} teacher ones")
    if not student_hidden:
        raise ValueError("no hidden states to compare")
    total = None
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise ValueError(f"hidden state shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        t = t.detach().float()
        err = (s.float() - t).pow(2).sum(-1)
        term = (err / t.pow(2).sum(-1).clamp_min(eps)).mean()
        total = term if total is None else total + term
    return total / len(student_hidden)


@dataclass
class DistillLoss:
    total: torch.Tensor
    kl: torch.Tensor
    mse: torch.Tensor  # unweighted; total = kl + gamma * mse


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      student_hidden: Sequence[torch.Tensor] | None, teacher_hidden: Sequence[torch.Tensor] | None,
                      gamma: float = 100.0, temperature: float = 1.0, chunk_tokens: int = 256,
                      hidden_loss: str = "mse") -> DistillLoss:
    """KL(teacher || student) + gamma * D(hidden states after each decoder block).

    D is the mean squared error (hidden_loss="mse", the paper's) or the per-token relative squared error
    (hidden_loss="relative", see hidden_relative_error). It is computed (and reported, as `mse`) whenever
    both hidden-state lists are given; with gamma == 0 they may be None, and mse is then a zero tensor.
    """
    return _with_hidden_term(kl_divergence(student_logits, teacher_logits, temperature, chunk_tokens),
                             student_hidden, teacher_hidden, gamma, hidden_loss)


def _with_hidden_term(kl: torch.Tensor, student_hidden, teacher_hidden, gamma: float,
                      hidden_loss: str) -> DistillLoss:
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if hidden_loss not in HIDDEN_LOSSES:
        raise ValueError(f"unknown hidden_loss {hidden_loss!r}; choose one of {', '.join(HIDDEN_LOSSES)}")
    if student_hidden is not None and teacher_hidden is not None:
        fn = hidden_mse if hidden_loss == "mse" else hidden_relative_error
        mse = fn(student_hidden, teacher_hidden)
    elif gamma > 0:
        raise ValueError("gamma > 0 needs the student's and the teacher's hidden states")
    else:
        mse = torch.zeros((), device=kl.device)
    total = kl + gamma * mse if gamma > 0 else kl
    return DistillLoss(total, kl, mse)


# ------------------------------------------------------------------------------------ block outputs
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (model.model.layers for Llama-like models)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
        except Exception:  # noqa: BLE001 - some models raise instead of returning None
            dec = None
        layers = getattr(dec, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


class BlockOutputs(contextlib.AbstractContextManager):
    """Records the output hidden state of every decoder block during one forward pass.

    with BlockOutputs(model) as rec: model(...); rec.outputs -> list of tensors, one per block.
    Only the first output of each block during the `with` is kept (gradient checkpointing re-runs blocks
    in the backward pass, after the `with` has ended, and those re-runs are ignored).
    """

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = []
        self._active = False

    def __enter__(self):
        self.outputs = [None] * len(self.layers)
        self._active = True
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i):
        def hook(module, inputs, output):
            if self._active and self.outputs[i] is None:
                self.outputs[i] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def __exit__(self, *exc):
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def hidden(self) -> list[torch.Tensor]:
        missing = [i for i, o in enumerate(self.outputs) if o is None]
        if missing:
            raise RuntimeError(f"decoder blocks {missing} produced no output during the forward pass")
        return list(self.outputs)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def batch_distillation_loss(teacher: nn.Module, student: nn.Module, batch: torch.Tensor, gamma: float,
                            temperature: float, kl_chunk: int, autocast: bool = False,
                            need_grad: bool = True, hidden_loss: str = "mse", fused_head: bool = True,
                            casts=None) -> DistillLoss:
    """Run teacher (without gradients) and student on one batch of token ids and return the distillation loss;
    the per-block hidden states are recorded only when gamma > 0. fused_head: where both models allow it
    (rabit.train.fused_head.head_parts), compute the KL from the last hidden states chunk by chunk instead of
    materializing both models' full logits (same loss and gradients, far less memory for large vocabularies).
    casts: a rabit.train.frozen_casts.FrozenCasts; under autocast the teacher's linear layers and the frozen heads
    then reuse their bf16 casts from step to step instead of casting every call (bitwise the same loss)."""
    want_hidden = gamma > 0

    def run(model, forward, grad: bool, cached: bool = False):
        # fast_attention: the passes without gradient (the teacher's; the student's in evaluation) run causal
        # attention on the native kernel where it applies, ~13 % of the default model's 256-token teacher forward
        with torch.set_grad_enabled(grad), autocast_context(batch.device, autocast), fast_attention():
            rec = BlockOutputs(model) if want_hidden else contextlib.nullcontext()
            swap = (cast_linear_weights(forward, casts, torch.bfloat16) if cached and autocast and casts is not None
                    else contextlib.nullcontext())
            with rec, swap:
                out = forward(input_ids=batch, use_cache=False)
            return out, (rec.hidden() if want_hidden else None)

    parts_t = parts_s = None
    if fused_head:
        from .fused_head import fused_head_kl, head_parts

        parts_t, parts_s = head_parts(teacher), head_parts(student)
    if parts_t is not None and parts_s is not None:
        (body_t, head_t, cap_t), (body_s, head_s, cap_s) = parts_t, parts_s
        out_t, t_hidden = run(teacher, body_t, False, cached=True)
        out_s, s_hidden = run(student, body_s, need_grad)
        with torch.set_grad_enabled(need_grad):
            kl = fused_head_kl(out_s.last_hidden_state, head_s, out_t.last_hidden_state, head_t, temperature,
                               kl_chunk, cap_s, cap_t, dtype=torch.bfloat16 if autocast else None,
                               casts=casts if autocast else None)
            return _with_hidden_term(kl, s_hidden, t_hidden, gamma, hidden_loss)
    out_t, t_hidden = run(teacher, teacher, False, cached=True)
    out_s, s_hidden = run(student, student, need_grad)
    with torch.set_grad_enabled(need_grad):
        return distillation_loss(out_s.logits, out_t.logits, s_hidden, t_hidden, gamma, temperature, kl_chunk,
                                 hidden_loss)
