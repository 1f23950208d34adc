"""The native distillation-KL kernel (rabit.kernels.kl_cpu) against its PyTorch reference
(rabit.train.losses._kl_chunk_reference), and the losses that call it against the same losses on the reference."""
import pytest
import torch

from rabit.kernels import kl_cpu
from rabit.train import losses
from rabit.train.fused_head import fused_head_kl

pytestmark = pytest.mark.skipif(not kl_cpu.is_available(), reason="no C compiler for the native kernel")


def logits(rows, vocab, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=gen) * scale
    t = s + torch.randn(rows, vocab, generator=gen) * scale   # a teacher near the student, as in distillation
    return s, t


def assert_matches_reference(s, t, temperature, threads):
    kl, grad = kl_cpu.kl_rows(s, t, temperature, True, threads=threads)
    kl_ref, grad_ref = losses._kl_chunk_reference(s, t, temperature, True)
    assert kl.dtype == torch.float32 and kl.dim() == 0
    torch.testing.assert_close(kl, kl_ref, rtol=2e-5, atol=1e-5 * s.shape[0])
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=2e-7)
    return kl, grad


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 7), (3, 33), (17, 1000), (5, 4099), (2, 49152)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_kl_rows_match_the_reference(rows, vocab, temperature):
    s, t = logits(rows, vocab, seed=rows * 7919 + vocab)
    assert_matches_reference(s, t, temperature, threads=2)


def test_the_thread_count_changes_no_bit():
    s, t = logits(13, 3001, seed=1)
    runs = [kl_cpu.kl_rows(s, t, 1.0, True, threads=n) for n in (1, 2, 3)]
    for kl, grad in runs[1:]:
        assert torch.equal(kl, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_loss_alone_is_the_same_loss():
    s, t = logits(6, 517, seed=2)
    kl, grad = kl_cpu.kl_rows(s, t, 1.0, False)
    assert grad is None
    assert torch.equal(kl, kl_cpu.kl_rows(s, t, 1.0, True)[0])


def test_equal_logits_give_zero_and_no_gradient():
    s, _ = logits(4, 1000, seed=3)
    kl, grad = kl_cpu.kl_rows(s, s.clone(), 1.0, True)
    assert abs(kl.item()) < 1e-5
    assert grad.abs().max().item() < 1e-7


def test_large_and_infinite_logits():
    s, t = logits(4, 257, seed=4)
    s[0] += 1e4                       # far from 0: the maxima keep every exp in range
    t[0] += 3e4
    t[1, :100] = float("-inf")        # masked teacher tokens: probability 0, no KL term (xlogy), as the reference
    s[1, :50] = float("-inf")         # ...even where the student is masked too
    kl, grad = assert_matches_reference(s, t, 1.0, threads=2)
    assert torch.isfinite(kl) and torch.isfinite(grad).all()
    assert (grad[1, :50] == 0).all()  # softmax(s) - softmax(t) with both 0 there
    s[2, 3] = float("-inf")           # the student rules out a token the teacher allows: infinite KL
    assert kl_cpu.kl_rows(s, t, 1.0, False)[0].item() == float("inf")


def test_strided_rows_and_an_output_buffer():
    big_s, big_t = logits(10, 600, seed=5)
    s, t = big_s[::2, 10:510], big_t[1::2, 50:550]   # rows of wider tensors: row strides 1200 and 1200
    out = torch.full((5, 700), 7.0)
    kl, grad = kl_cpu.kl_rows(s, t, 1.3, True, out=out[:, 100:600])
    assert grad.data_ptr() == out[:, 100:600].data_ptr()
    kl_ref, grad_ref = losses._kl_chunk_reference(s, t, 1.3, True)
    torch.testing.assert_close(kl, kl_ref, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 100:600], grad_ref, rtol=1e-4, atol=2e-7)
    assert (out[:, :100] == 7).all() and (out[:, 600:] == 7).all()   # nothing written outside the rows


def test_bad_arguments_are_refused():
    s, t = logits(3, 10, seed=6)
    with pytest.raises(ValueError, match="shape"):
        kl_cpu.kl_rows(s, t[:, :9], 1.0, True)
    with pytest.raises(ValueError, match="fp32"):
        kl_cpu.kl_rows(s.double(), t.double(), 1.0, True)
    with pytest.raises(ValueError, match="temperature"):
        kl_cpu.kl_rows(s, t, 0.0, True)
    with pytest.raises(ValueError, match="out"):
        kl_cpu.kl_rows(s, t, 1.0, True, out=torch.empty(3, 11))
    with pytest.raises(ValueError, match="out"):
        kl_cpu.kl_rows(s, t, 1.0, True, out=torch.empty(10, 3).t())   # columns, not rows, contiguous


def _without_native(monkeypatch):
    monkeypatch.setattr(kl_cpu, "is_available", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_divergence_with_the_kernel_matches_the_reference_path(monkeypatch, dtype):
    s, t = logits(2 * 37, 3001, seed=7)
    s, t = s.reshape(2, 37, 3001).to(dtype), t.reshape(2, 37, 3001).to(dtype)
    calls = []
    real = kl_cpu.kl_rows
    monkeypatch.setattr(kl_cpu, "kl_rows", lambda *a, **k: calls.append(1) or real(*a, **k))

    def loss_and_grad():
        x = s.clone().requires_grad_()
        loss = losses.kl_divergence(x, t, temperature=1.5, chunk_tokens=16)
        loss.backward()
        return loss.detach(), x.grad

    loss, grad = loss_and_grad()
    assert len(calls) == 5                    # 74 rows in chunks of 16: the kernel ran every chunk
    _without_native(monkeypatch)
    loss_ref, grad_ref = loss_and_grad()
    assert len(calls) == 5
    torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=1e-8)


def test_fused_head_kl_with_the_kernel_matches_the_reference_path(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    head_s, head_t = torch.nn.Linear(24, 1001, bias=False), torch.nn.Linear(24, 1001, bias=False)
    with torch.no_grad():
        head_t.weight.copy_(head_s.weight + 0.1 * torch.randn(1001, 24, generator=gen))
    h_s, h_t = torch.randn(3, 41, 24, generator=gen), torch.randn(3, 41, 24, generator=gen)

    def loss_and_grads():
        head_s.zero_grad()
        x = h_s.clone().requires_grad_()
        loss = fused_head_kl(x, head_s, h_t, head_t, temperature=1.0, chunk_tokens=32)
        loss.backward()
        return loss.detach(), x.grad, head_s.weight.grad.clone()

    native = loss_and_grads()
    _without_native(monkeypatch)
    reference = loss_and_grads()
    for a, b in zip(native, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
