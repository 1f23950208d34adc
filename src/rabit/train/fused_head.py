"""Distillation KL straight from the last hidden states: the output head and the KL computed chunk by chunk.

The plain path asks both models for their logits: (batch, tokens, vocab) for the teacher and for the student,
plus the gradient buffer of the student's, and the head's backward reads a (tokens, vocab) gradient. With Gemma 3's
262k vocabulary a 512-token sequence has 134M logits per model: 0.5 GB each in fp32. Here each model runs only its
decoder body (embeddings, blocks, final norm); for each chunk of tokens the two heads produce that chunk's logits,
the KL and its gradient are computed (rabit.train.losses._kl_chunk), and the gradient is pushed through the
student's head at once (to the hidden states, and to the head's weight if it trains). What is kept for the backward
pass is a (tokens, hidden) gradient: vocabulary-sized tensors exist for one chunk at a time.

Used for the families whose causal-LM forward is exactly ``head(body(ids).last_hidden_state)`` followed by the
optional final soft-capping (see FUSED_FAMILIES), with a plain bias-free nn.Linear head, and not under FSDP (the
root's parameters are gathered by its own forward); anything else takes the plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import _kl_chunk

FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Elements of one chunk's (tokens, vocab) logits: bounds the fp32 temporaries of _kl_chunk (a few per element).
CHUNK_ELEMENTS = 1 << 24


def head_parts(model: nn.Module):
    """(body, head nn.Linear, final soft-cap or None) when `model`'s logits are head(body(...)[0]), else None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in FUSED_FAMILIES:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return None
    except ImportError:
        pass
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    body = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    if body is None or type(head) is not nn.Linear or head.bias is not None:
        return None
    return body, head, getattr(cfg, "final_logit_softcapping", None)


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class _ChunkBuffers:
    """Buffers of the chunk loop on a CPU: the two heads' outputs in the matmul dtype, their fp32 copies (what the
    KL reads), the KL's fp32 gradient and its cast back to the matmul dtype. Values are those of
    F.linear(...).float() and g.to(dtype): only where they are written changes. From `casts`' scratch tensors when
    given (kept for the whole run: one chunk per step, as the job's 256-token steps have, reuses nothing within a
    call), else made for this call."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, want_grad: bool, casts=None):
        def make(name, dt):
            return (casts.scratch("fused_head." + name, (rows, vocab), dt) if casts is not None
                    else torch.empty(rows, vocab, dtype=dt))

        self.dtype = dtype
        wide = dtype == torch.float32
        self.low = [make(f"low{i}", dtype) for i in range(2)]
        self.wide = self.low if wide else [make(f"wide{i}", torch.float32) for i in range(2)]
        self.kl_grad = make("kl_grad", torch.float32) if want_grad else None
        self.grad = make("grad", dtype) if want_grad and not wide else None

    def logits(self, h: torch.Tensor, w: torch.Tensor, which: int) -> torch.Tensor:
        """F.linear(h, w).float() for h and w in the buffers' dtype (the caller casts both to it)."""
        m = h.shape[0]
        low = torch.mm(h, w.t(), out=self.low[which][:m])
        return low if low.dtype == torch.float32 else self.wide[which][:m].copy_(low)

    def cast(self, g: torch.Tensor) -> torch.Tensor:
        """g.to(dtype) for the KL's fp32 gradient g (itself when dtype is fp32)."""
        return g if self.grad is None else self.grad[:g.shape[0]].copy_(g)


class _FusedHeadKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, temperature: float, chunk: int, cap_s, cap_t, dtype, casts):
        n = h_s.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the teacher's head and a frozen student head: cast once (a training head changes every step)
        ws = casts.get(w_s, dtype) if casts is not None and not w_s.requires_grad else w_s.detach().to(dtype)
        wt = casts.get(w_t, dtype) if casts is not None else w_t.detach().to(dtype)
        grad_h = torch.empty_like(h_s) if want_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        # On a CPU each chunk's head outputs, their fp32 copies, the KL's gradient (the native KL writes into it)
        # and its cast go to buffers made once (per call, or per run with `casts`): a fresh (chunk, vocab) tensor
        # costs its page faults each time (a 256 x 49,152 bf16 -> fp32 cast: ~17 ms into a new tensor, ~1 ms into
        # a used one). Elsewhere the reference's own results are used as they are.
        bufs = (_ChunkBuffers(min(chunk, n), ws.shape[0], dtype, want_h or want_w, casts)
                if h_s.device.type == "cpu" else None)
        gbuf = None if bufs is None else bufs.kl_grad
        for a in range(0, n, chunk):
            hs = h_s[a:a + chunk].detach().to(dtype)
            ht = h_t[a:a + chunk].detach().to(dtype)
            if bufs is None:
                s, t = F.linear(hs, ws).float(), F.linear(ht, wt).float()
            else:
                s, t = bufs.logits(hs, ws, 0), bufs.logits(ht, wt, 1)
            s, t = _softcap(s, cap_s), _softcap(t, cap_t)
            kl, g = _kl_chunk(s, t, temperature, want_h or want_w,    # g = d kl / d s, fp32 (chunk, vocab)
                              out=None if gbuf is None else gbuf[:s.shape[0]])
            total += kl
            if g is None:
                continue
            if cap_s is not None:   # s = cap * tanh(z / cap): ds/dz = 1 - (s / cap)^2
                g.mul_(1 - (s / cap_s).square())
            g = g.to(dtype) if bufs is None else bufs.cast(g)
            if want_h:
                grad_h[a:a + chunk] = (g @ ws).to(h_s.dtype)
            if want_w:
                grad_w += (g.t() @ hs).float()
        scale = temperature * temperature / max(n, 1)
        ctx.scale = scale
        ctx.save_for_backward(grad_h if want_h else torch.empty(0), grad_w if want_w else torch.empty(0))
        ctx.wants = (want_h, want_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        k = grad_out * ctx.scale
        gh = (grad_h.float() * k).to(ctx.dtypes[0]) if ctx.wants[0] else None
        gw = (grad_w * k).to(ctx.dtypes[1]) if ctx.wants[1] else None
        return gh, gw, None, None, None, None, None, None, None, None


def fused_head_kl(h_s: torch.Tensor, head_s: nn.Linear, h_t: torch.Tensor, head_t: nn.Linear,
                  temperature: float = 1.0, chunk_tokens: int = 256, cap_s: float | None = None,
                  cap_t: float | None = None, dtype: torch.dtype | None = None, casts=None) -> torch.Tensor:
    """Mean over tokens of KL(softmax(head_t(h_t)/T) || softmax(head_s(h_s)/T)) * T^2, as
    rabit.train.losses.kl_divergence on the two models' logits, without materializing them.

    h_s, h_t: (..., hidden) last hidden states; gradients flow to h_s and to head_s.weight (if it trains).
    dtype: of the head matmuls (bf16 under autocast, as the plain head would run); the KL is in fp32. Chunks
    hold at most chunk_tokens tokens and CHUNK_ELEMENTS logits. casts: a rabit.train.frozen_casts.FrozenCasts that
    keeps the heads' casts to dtype between calls while they do not change (the same values as casting anew).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hid = h_s.shape[-1]
    if h_t.shape != h_s.shape:
        raise ValueError(f"student hidden states {tuple(h_s.shape)} and teacher's {tuple(h_t.shape)} differ")
    if head_s.weight.shape != head_t.weight.shape:
        raise ValueError("student and teacher heads differ in shape")
    chunk = max(1, min(int(chunk_tokens), CHUNK_ELEMENTS // head_s.weight.shape[0]))
    dtype = dtype or h_s.dtype
    return _FusedHeadKL.apply(h_s.reshape(-1, hid), head_s.weight, h_t.reshape(-1, hid), head_t.weight,
                              float(temperature), chunk, cap_s, cap_t, dtype, casts)


__all__ = ["fused_head_kl", "head_parts", "FUSED_FAMILIES"]
