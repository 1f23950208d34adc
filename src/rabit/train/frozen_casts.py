"""Low-precision copies of frozen weights, made once instead of once per forward pass.

Under bf16 autocast every ``F.linear`` casts its fp32 weight to bf16 on each call. For a weight that does not
train (the teacher's linear layers, an output head that stays frozen) that is the same cast every step: on the
default model and a 2-core CPU with native bf16, the teacher's casts and the two heads' were ~10 % of a
frozen-latent distillation step (docs/RESULTS.md section 38). ``FrozenCasts`` keeps each cast while the weight
is unchanged, and ``cast_linear_weights`` runs a module with its linear layers' cached casts in place of their
weights: the matmuls get the very tensors autocast would have made, so every result is bitwise the same.

A cached copy is made again when its source changes in place (its version counter moves) or is replaced (another
tensor or storage). A write through ``.data`` moves no version counter, so the cache is for weights that do not
train (the teacher's, whatever their requires_grad flag says; a student's frozen head).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn


class FrozenCasts:
    """Casts of frozen tensors to another dtype, reused while the source is unchanged; and the scratch tensors a
    run's steps reuse (``scratch``)."""

    def __init__(self):
        self._cache: dict[int, tuple] = {}
        self._scratch: dict[str, torch.Tensor] = {}

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor kept under `name` for one run's repeated temporaries (the distillation head's
        per-chunk logits): the same tensor again while shape and dtype match. On a CPU a fresh tensor of tens of MB
        costs its page faults on every step (a 256 x 49,152 fp32 buffer: ~15 ms, ~1 ms to refill a used one). The
        caller must be done with what it wrote before it asks for the same name again."""
        buf = self._scratch.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = self._scratch[name] = torch.empty(shape, dtype=dtype)
        return buf

    def get(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t.detach().to(dtype), from the cache when an earlier call cast this same, unchanged tensor."""
        if t.dtype == dtype:
            return t.detach()
        stamp = (t._version, t.data_ptr(), tuple(t.shape), t.dtype, dtype)
        hit = self._cache.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == stamp:
            return hit[2]
        cast = t.detach().to(dtype)
        key = id(t)
        # the entry goes when its source does: an id can be reused by a later tensor
        ref = weakref.ref(t, lambda _r, key=key, cache=self._cache: cache.pop(key, None))
        self._cache[key] = (ref, stamp, cast)
        return cast

    def __len__(self) -> int:
        return len(self._cache)


@contextlib.contextmanager
def cast_linear_weights(module: nn.Module, casts: FrozenCasts, dtype: torch.dtype):
    """Inside the block, every plain nn.Linear under `module` computes with casts.get(weight, dtype) (and its bias
    cast likewise) in place of its own parameters; they are restored on exit. For use under autocast to `dtype`,
    where F.linear would make the same cast itself, on a module whose linear layers do not train (a teacher).

    Left alone: a weight shared with a module that is not an nn.Linear (a tied input embedding would otherwise see
    the cast too), and, while grad mode is on, a parameter that requires grad (a detached cast would lose its
    gradient)."""
    shared = set()   # parameters of modules other than nn.Linear (a tied embedding's weight)
    for m in module.modules():
        if type(m) is not nn.Linear:
            shared.update(id(p) for _, p in m.named_parameters(recurse=False))
    grad = torch.is_grad_enabled()
    plan = []
    for m in module.modules():
        if type(m) is not nn.Linear:
            continue
        params = [p for p in (m.weight, m.bias) if p is not None]
        # plain tensors only: a sharded or otherwise wrapped parameter is its owner's business
        if any((p.requires_grad and grad) or id(p) in shared or type(p) not in (torch.Tensor, nn.Parameter)
               for p in params):
            continue
        # every cast is made before any module is touched: a failure leaves the module as it was
        plan.append((m, m.weight, m.bias, casts.get(m.weight, dtype),
                     None if m.bias is None else casts.get(m.bias, dtype)))
    swapped = []
    try:
        for m, w, b, wc, bc in plan:
            swapped.append((m, w, b))
            # the parameters are taken out of the module first: a plain tensor attribute may not replace one
            del m.weight
            m.weight = wc
            if b is not None:
                del m.bias
                m.bias = bc
        yield module
    finally:
        for m, w, b in reversed(swapped):
            for name, p in (("weight", w), ("bias", b)):
                if p is None:
                    continue
                if name in m._parameters:   # not swapped yet (a failure between the two)
                    continue
                m.__dict__.pop(name, None)
                m.register_parameter(name, p)
