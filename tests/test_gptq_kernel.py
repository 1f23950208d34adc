"""The native GPTQ column loop (rabit.kernels.gptq_cpu) against its PyTorch reference (rabit.ops.refine), bitwise,
and gptq_signs / refine_paths with the kernel against the same calls on the reference loop."""
import pytest
import torch

from rabit.kernels import gptq_cpu
from rabit.ops import refine
from rabit.ops.svid import iterative_residual_svid

pytestmark = pytest.mark.skipif(not gptq_cpu.is_available(), reason="no C compiler for the native kernel")


def block_problem(out, bs, k, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, bs + 3, generator=gen)[:, 1:bs + 1]        # strided rows, as a block of a wider W
    g = torch.rand(out, k, generator=gen) + 0.1
    h = torch.rand(k, bs, generator=gen) + 0.1
    combos = refine._sign_combinations(k, w)
    levels = ((g[None] * h.T[:, None, :]) @ combos.T).contiguous()  # (bs, out, 2^k), as _gptq_columns makes it
    if ties:
        # weights exactly halfway between two levels, and levels that coincide: both pick the first minimum
        w = w.clone()
        w[:, 0] = 0.5 * (levels[0, :, 0] + levels[0, :, 1])
        levels[:, :, 1] = levels[:, :, 0]
    a = torch.randn(bs, bs, generator=gen)
    u = torch.linalg.cholesky(a @ a.T + bs * torch.eye(bs), upper=True).contiguous()
    return w, levels, u


@pytest.mark.parametrize("out,bs", [(1, 1), (7, 13), (33, 65), (130, 128), (5, 300)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_block_columns_match_the_reference_bitwise(out, bs, k, threads):
    w, levels, u = block_problem(out, bs, k, seed=out * 1000 + bs + k)
    choice_native = torch.full((out, bs + 2), -7, dtype=torch.long)
    choice_ref = choice_native.clone()
    before = w.clone()
    err = gptq_cpu.block_columns(w, levels, u, choice_native[:, 1:bs + 1], num_threads=threads)
    err_ref = refine._block_columns_reference(w, levels, u, choice_ref[:, 1:bs + 1])
    assert torch.equal(err, err_ref)
    assert torch.equal(choice_native, choice_ref)        # and nothing outside the view was written
    assert torch.equal(w, before)                        # w is read only
    assert int(choice_native[:, 1:bs + 1].max()) < 2 ** k and int(choice_native[:, 1:bs + 1].min()) >= 0


def test_ties_pick_the_first_level_as_argmin_does():
    w, levels, u = block_problem(40, 16, 2, seed=3, ties=True)
    c1, c2 = (torch.empty(40, 16, dtype=torch.long) for _ in range(2))
    assert torch.equal(gptq_cpu.block_columns(w, levels, u, c1), refine._block_columns_reference(w, levels, u, c2))
    assert torch.equal(c1, c2)
    assert not bool((c1 == 1).any())                     # level 1 duplicates level 0: never chosen


def test_rejects_what_it_cannot_take():
    w, levels, u = block_problem(8, 6, 2, seed=0)
    choice = torch.empty(8, 6, dtype=torch.long)
    with pytest.raises(ValueError):
        gptq_cpu.block_columns(w.double(), levels, u, choice)
    with pytest.raises(ValueError):
        gptq_cpu.block_columns(w, levels[:, :4], u, choice)         # levels for other rows
    with pytest.raises(ValueError):
        gptq_cpu.block_columns(w, levels, u.T, choice)             # columns not contiguous
    with pytest.raises(ValueError):
        gptq_cpu.block_columns(w, levels, u, choice.int())


def _problem(out, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=gen) * (torch.rand(n, generator=gen) + 0.2)
    x = torch.randn(4 * n, n, generator=gen) * (torch.rand(n, generator=gen) * 3 + 0.1)
    return w, x.T @ x


@pytest.mark.parametrize("out,n,block", [(24, 20, 128), (37, 150, 64), (9, 301, 128)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_signs_native_equal_reference(monkeypatch, single_thread, out, n, block, act_order):
    # one thread: the products around the loop then run the same way in both calls
    w, H = _problem(out, n, seed=n)
    paths = iterative_residual_svid(w, 2, 2)
    g, h = [p[0] for p in paths], [p[2] for p in paths]
    native = refine.gptq_signs(w, g, h, H, block, 0.1, act_order)
    monkeypatch.setattr(refine, "_native_columns", lambda *a: False)
    ref = refine.gptq_signs(w, g, h, H, block, 0.1, act_order)
    assert all(torch.equal(a, b) for a, b in zip(native, ref))


def test_non_finite_weights_take_the_reference(monkeypatch):
    w, H = _problem(12, 30, seed=1)
    paths = iterative_residual_svid(w, 2, 2)
    g, h = [p[0] for p in paths], [p[2] for p in paths]
    w[3, 4] = float("nan")
    calls = []
    monkeypatch.setattr(gptq_cpu, "block_columns", lambda *a, **k: calls.append(1))
    refine.gptq_signs(w, g, h, H)
    assert not calls


def test_refine_paths_reuses_one_factor_and_matches_the_reference(monkeypatch, single_thread):
    w, H = _problem(40, 96, seed=5)
    paths = iterative_residual_svid(w, 2, 4)
    factors = []
    real = refine.gptq_factor
    monkeypatch.setattr(refine, "gptq_factor", lambda *a, **k: factors.append(1) or real(*a, **k))
    new, errors = refine.refine_paths(w, paths, H, rounds=3, damp=0.1, act_order=True)
    assert len(factors) == 1 and len(errors) >= 2
    monkeypatch.setattr(refine, "_native_columns", lambda *a: False)
    ref, ref_errors = refine.refine_paths(w, paths, H, rounds=3, damp=0.1, act_order=True)
    assert errors == ref_errors
    assert all(torch.equal(a, b) for p, q in zip(new, ref) for a, b in zip(p, q))
