"""The KL computed from the last hidden states chunk by chunk equals the KL of the materialized logits, in value
and gradients (hidden states, head weight), soft-capping and odd chunk sizes included."""
import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from rabit.train import fused_head as fh
from rabit.train.losses import batch_distillation_loss, kl_divergence


@pytest.mark.parametrize("cap", [None, 2.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_kl_equals_kl_of_logits(cap, temperature, monkeypatch):
    monkeypatch.setattr(fh, "CHUNK_ELEMENTS", 7 * 50)   # chunks of 7 tokens: 37 is not a multiple
    torch.manual_seed(0)
    h_s = torch.randn(37, 16, requires_grad=True)
    h_t = torch.randn(37, 16)
    head_s, head_t = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False)

    def cap_fn(x):
        return x if cap is None else torch.tanh(x / cap) * cap

    ref = kl_divergence(cap_fn(head_s(h_s)), cap_fn(head_t(h_t)).detach(), temperature)
    ref.backward()
    ref_gh, ref_gw = h_s.grad.clone(), head_s.weight.grad.clone()
    h_s.grad = None
    head_s.weight.grad = None
    out = fh.fused_head_kl(h_s, head_s, h_t, head_t, temperature, chunk_tokens=256, cap_s=cap, cap_t=cap)
    (3 * out).backward()   # a non-unit upstream gradient
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_s.grad, 3 * ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_s.weight.grad, 3 * ref_gw, rtol=1e-4, atol=1e-6)
    assert ref.item() > 0.01


@pytest.mark.parametrize("cap", [None, 2.5])
def test_fused_kl_in_bf16_equals_kl_of_bf16_logits(cap, monkeypatch):
    """With dtype bf16 (autocast) the head matmuls run in bf16 and the KL in fp32: the chunk loop writes the logits,
    their fp32 copies and the gradient's bf16 cast into reused buffers, which must leave every value as the
    materialized bf16 logits give it (chunks of 7 of 37 tokens: the last chunk is short)."""
    monkeypatch.setattr(fh, "CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(1)
    h_s = torch.randn(37, 16, requires_grad=True)
    h_t = torch.randn(37, 16)
    head_s, head_t = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False)
    bf = torch.bfloat16

    def logits(h, head):
        return (h.to(bf) @ head.weight.detach().to(bf).t()).float()

    def capped(z):
        return z if cap is None else torch.tanh(z / cap) * cap

    z = logits(h_s.detach(), head_s).requires_grad_(True)
    ref = kl_divergence(capped(z), capped(logits(h_t, head_t)), 1.0)
    ref.backward()
    ds = z.grad.to(bf)                 # the gradient goes back through the bf16 head, as the fused loop does
    ref_gh = (ds @ head_s.weight.detach().to(bf)).float()
    ref_gw = (ds.t() @ h_s.detach().to(bf)).float()
    out = fh.fused_head_kl(h_s, head_s, h_t, head_t, 1.0, chunk_tokens=256, cap_s=cap, cap_t=cap, dtype=bf)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_s.grad, ref_gh, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(head_s.weight.grad, ref_gw, rtol=2e-2, atol=1e-4)
    assert ref.item() > 0.01


def _student(teacher):
    from rabit import RaBiTConfig, quantize_

    return quantize_(copy.deepcopy(teacher), RaBiTConfig(precondition=False, init="svid", isvid_rounds=0)).train()


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           final_logit_softcapping=5.0)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("gamma", [0.0, 3.0])
def test_batch_loss_fused_equals_plain(family, gamma):
    teacher = make_tiny_llama(vocab_size=300) if family == "llama" else _gemma3()
    student = _student(teacher)
    assert fh.head_parts(teacher) is not None and fh.head_parts(student) is not None
    batch = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for fused in (False, True):
        student.zero_grad()
        loss = batch_distillation_loss(teacher, student, batch, gamma, 1.0, kl_chunk=5, fused_head=fused)
        loss.total.backward()
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    plain, fused = losses
    torch.testing.assert_close(fused.kl, plain.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.mse, plain.mse, rtol=1e-5, atol=1e-7)
    assert plain.kl.item() > 1e-5 and grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6, msg=name)


def test_plain_path_where_the_head_is_not_a_plain_linear():
    from rabit import RaBiTConfig, quantize_
    from transformers import GPT2Config, GPT2LMHeadModel

    quantized_head = quantize_(make_tiny_llama(), RaBiTConfig(precondition=False, init="svid", isvid_rounds=0,
                                                              exclude=("embed",)))
    assert fh.head_parts(quantized_head) is None           # lm_head is a RaBiTLinear
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert fh.head_parts(gpt2) is None                     # not a family known to compute head(body(x))
    assert fh.head_parts(make_tiny_llama()) is not None


def test_fused_kl_with_run_scratch_equals_fresh_buffers(monkeypatch):
    """With a FrozenCasts the chunk buffers are kept between calls (the trainer's case): consecutive calls on
    different inputs give bitwise the values of calls that make their own buffers, and the second call reuses the
    first one's tensors."""
    from rabit.train.frozen_casts import FrozenCasts

    monkeypatch.setattr(fh, "CHUNK_ELEMENTS", 7 * 50)
    head_s, head_t = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False)
    head_t.requires_grad_(False)
    casts = FrozenCasts()
    seen = []
    for seed in (2, 3):
        torch.manual_seed(seed)
        h_s, h_t = torch.randn(37, 16, requires_grad=True), torch.randn(37, 16)
        results = []
        for c in (None, casts):
            h = h_s.detach().clone().requires_grad_(True)
            out = fh.fused_head_kl(h, head_s, h_t, head_t, 1.0, 256, dtype=torch.bfloat16, casts=c)
            out.backward()
            results.append((out.detach(), h.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
        seen.append(casts.scratch("fused_head.wide0", (7, 50), torch.float32).data_ptr())
    assert seen[0] == seen[1]
