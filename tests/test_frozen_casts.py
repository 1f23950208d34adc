"""Frozen weights' bf16 casts made once (rabit.train.frozen_casts): the same values as autocast's own casts, made
again when the source changes, never for a training tensor, and the module given back exactly as it was."""
import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from rabit.train.frozen_casts import FrozenCasts, cast_linear_weights
from rabit.train.losses import batch_distillation_loss

BF16 = torch.bfloat16


def test_a_cast_is_kept_until_its_source_changes():
    casts = FrozenCasts()
    w = torch.randn(7, 5)
    first = casts.get(w, BF16)
    assert first.dtype == BF16 and torch.equal(first, w.to(BF16))
    assert casts.get(w, BF16) is first and len(casts) == 1
    w.add_(1.0)                                  # in place: the version counter moves
    second = casts.get(w, BF16)
    assert second is not first and torch.equal(second, w.to(BF16))
    assert not torch.equal(second, first)
    w.data = torch.randn(7, 5)                   # another storage behind the same tensor
    assert torch.equal(casts.get(w, BF16), w.to(BF16))


def test_an_optimizer_step_makes_a_fresh_cast():
    casts = FrozenCasts()
    p = nn.Parameter(torch.randn(4, 3))
    a = casts.get(p, BF16)
    assert not a.requires_grad and casts.get(p, BF16) is a
    p.grad = torch.ones(4, 3)
    torch.optim.SGD([p], lr=0.5).step()
    b = casts.get(p, BF16)
    assert b is not a and torch.equal(b, p.detach().to(BF16)) and not torch.equal(a, b)
    x = torch.randn(3)                            # already in the dtype: itself, nothing kept
    assert casts.get(x, torch.float32).data_ptr() == x.data_ptr() and len(casts) == 1


def test_an_entry_goes_with_its_source():
    casts = FrozenCasts()
    w = torch.randn(6, 6)
    casts.get(w, BF16)
    assert len(casts) == 1
    del w
    assert len(casts) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_cached_linear_weights_give_autocasts_logits_bit_for_bit(tied):
    model = make_tiny_llama(vocab_size=80, intermediate=48, seed=1, tied=tied)   # requires_grad on: no grad mode
    before = [(n, p) for n, p in model.named_parameters()]
    ids = torch.randint(0, 80, (2, 13), generator=torch.Generator().manual_seed(0))
    casts = FrozenCasts()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        ref = model(input_ids=ids).logits
        for _ in range(2):                       # the second pass reuses the casts
            with cast_linear_weights(model, casts, BF16):
                assert model.model.layers[0].mlp.up_proj.weight.dtype == BF16
                out = model(input_ids=ids).logits
            assert torch.equal(out, ref)
    # 7 linear layers a block; the head too unless it is the input embedding's weight
    assert len(casts) == 2 * 7 + (0 if tied else 1)
    assert model.lm_head.weight.dtype == torch.float32
    after = [(n, p) for n, p in model.named_parameters()]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(after, before))
    assert all(type(p) is nn.Parameter for _, p in after)


def test_the_module_is_restored_when_the_forward_fails():
    model = make_tiny_llama(vocab_size=80)
    params = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with cast_linear_weights(model, FrozenCasts(), BF16):
            raise RuntimeError("boom")
    assert dict(model.named_parameters()) == params
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if type(m) is nn.Linear)


def test_with_grad_mode_on_linear_layers_that_train_keep_their_own_weights():
    model = make_tiny_llama(vocab_size=80)
    model.lm_head.weight.requires_grad_(True)
    for p in model.model.parameters():
        p.requires_grad_(False)
    casts = FrozenCasts()
    with cast_linear_weights(model, casts, BF16):
        assert type(model.lm_head.weight) is nn.Parameter
        assert model.model.layers[1].self_attn.q_proj.weight.dtype == BF16
    assert len(casts) == 2 * 7
    with torch.no_grad(), cast_linear_weights(model, casts, BF16):
        assert model.lm_head.weight.dtype == BF16


@pytest.mark.parametrize("fused", [False, True])
def test_distillation_loss_and_gradients_unchanged_under_autocast(fused):
    from rabit import RaBiTConfig, quantize_

    teacher = make_tiny_llama(vocab_size=120)   # requires_grad on, as loaded: it runs without grad
    student = quantize_(copy.deepcopy(teacher), RaBiTConfig(precondition=False, init="svid", isvid_rounds=0)).train()
    student.lm_head.weight.requires_grad_(False)         # a frozen head, as the scale-only phase has it
    batch = torch.randint(0, 120, (2, 17), generator=torch.Generator().manual_seed(5))
    casts = FrozenCasts()
    results = []
    for kwargs in ({}, {"casts": casts}, {"casts": casts}):
        student.zero_grad()
        loss = batch_distillation_loss(teacher, student, batch, 0.0, 1.0, kl_chunk=7, autocast=True,
                                       fused_head=fused, **kwargs)
        loss.total.backward()
        results.append((loss.total.detach(), {n: p.grad.clone() for n, p in student.named_parameters()
                                              if p.grad is not None}))
    (ref, ref_grads), *cached = results
    assert ref.item() > 1e-4 and len(ref_grads) > 10
    for total, grads in cached:
        assert torch.equal(total, ref)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), name
    # the teacher's 14 linear layers and its head; the student's frozen head as well where the KL is fused
    assert len(casts) == 15 + (1 if fused else 0)
