"""Coordinate descent on binary sign planes (rabit.ops.refine.sign_descent) and its native CPU kernel."""
import pytest
import torch

from rabit.kernels import sign_descent_cpu
from rabit.ops.refine import (_sign_descent_reference, damped, output_error, refine_paths, sign_descent)
from rabit.ops.svid import decompose, reconstruct

pytestmark = pytest.mark.usefixtures("single_thread")


def layer(out, n, k=2, seed=0, tokens=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    x = torch.randn(tokens or 4 * n, n, generator=g)
    x[:, : max(n // 8, 1)] *= 6.0             # a few inputs with most of the energy, as after a norm
    H = damped(x.T @ x, 0.1)
    return w, H, decompose(w, k, "isvid")


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 17), (64, 96)])
def test_descent_never_raises_the_error_and_only_moves_signs(shape, k):
    w, H, paths = layer(*shape, k=k)
    new, moves = sign_descent(w, paths, H, passes=3)
    before, after = output_error(w, paths, H), output_error(w, new, H)
    assert after <= before * (1 + 1e-6)
    for (g0, B0, h0), (g1, B1, h1) in zip(paths, new):
        assert torch.equal(g0.float(), g1) and torch.equal(h0.float(), h1)
        assert set(B1.unique().tolist()) <= {-1.0, 1.0}
    changed = sum(int((B0 != B1).any(dim=-1).sum()) for (_, B0, _), (_, B1, _) in zip(paths, new))
    assert (changed > 0) == (sum(moves) > 0)


def test_descent_lowers_the_error_of_gptq_rounding_and_reaches_a_local_minimum():
    w, H, paths = layer(48, 64)
    refined, _ = refine_paths(w, paths, H, rounds=2, damp=0.0)
    new, moves = sign_descent(w, refined, H, passes=50)
    assert output_error(w, new, H) < 0.99 * output_error(w, refined, H)
    assert moves[0] > 0 and moves[-1] == 0            # it stopped because no single move helps any more
    # at the minimum no single weight's move to another level lowers its row's error
    Q = reconstruct(new)
    E = w - Q
    G = E @ H
    g = torch.stack([p[0] for p in new]); h = torch.stack([p[2] for p in new]); B = torch.stack([p[1] for p in new])
    for r, c in [(0, 0), (5, 17), (47, 63), (20, 40)]:
        for flip in range(2):
            q_new = Q[r, c] - 2 * B[flip, r, c] * g[flip, r] * h[flip, c]
            a = Q[r, c] - q_new
            assert 2 * a * G[r, c] + a * a * H[c, c] >= -1e-4 * float((E[r] @ H @ E[r]).abs())


def test_the_refinement_with_descent_ends_lower():
    w, H, paths = layer(64, 48, tokens=400, seed=3)
    plain, _ = refine_paths(w, paths, H, rounds=3, damp=0.1, act_order=True)
    descended, _ = refine_paths(w, paths, H, rounds=3, damp=0.1, act_order=True, descent=4)
    assert output_error(w, descended, damped(H, 0.1)) < output_error(w, plain, damped(H, 0.1))


def test_more_descent_cycles_end_lower_and_errors_never_rise():
    w, H, paths = layer(64, 48, tokens=400, seed=4)
    Hd = damped(H, 0.1)
    one, e1 = refine_paths(w, paths, H, rounds=3, damp=0.1, act_order=True, descent=2)
    three, e3 = refine_paths(w, paths, H, rounds=3, damp=0.1, act_order=True, descent=2, descent_cycles=3)
    assert e3[: len(e1)] == e1                              # the first cycle is the one-cycle run's
    assert all(b <= a for a, b in zip(e3, e3[1:])) and len(e3) > len(e1)
    assert e3[len(e1)] < e1[-1]                             # the refitted scales open new moves
    assert output_error(w, three, Hd) == pytest.approx(e3[-1], rel=1e-5)
    assert output_error(w, three, Hd) < output_error(w, one, Hd)


@pytest.mark.skipif(not sign_descent_cpu.is_available(), reason="no C compiler for the native kernel")
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1), (3, 130), (129, 7), (50, 64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_pass_is_bitwise_the_reference(shape, k, threads):
    w, H, paths = layer(*shape, k=k, seed=sum(shape) + k)
    g = torch.stack([p[0].float() for p in paths]).contiguous()
    h = torch.stack([p[2].float() for p in paths]).contiguous()
    choice = torch.randint(0, 2 ** k, shape, generator=torch.Generator().manual_seed(1))
    G = ((w - reconstruct(paths)) @ H).contiguous()
    order = torch.randperm(shape[1], generator=torch.Generator().manual_seed(2))
    c_ref, G_ref = choice.clone(), G.clone()
    m_ref = _sign_descent_reference(g, h, H, order, c_ref, G_ref)
    c_nat, G_nat = choice.clone(), G.clone()
    m_nat = sign_descent_cpu.descent_pass(g, h, H, order, c_nat, G_nat, num_threads=threads)
    assert torch.equal(c_nat, c_ref) and torch.equal(G_nat, G_ref) and torch.equal(m_nat, m_ref)


@pytest.mark.skipif(not sign_descent_cpu.is_available(), reason="no C compiler for the native kernel")
def test_native_pass_refuses_bad_arguments():
    g, h, H = torch.ones(2, 4), torch.ones(2, 3), torch.eye(3)
    choice, G, order = torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3), torch.arange(3)
    sign_descent_cpu.descent_pass(g, h, H, order, choice, G)
    with pytest.raises(ValueError):
        sign_descent_cpu.descent_pass(g, h, H, order, choice.int(), G)
    with pytest.raises(ValueError):
        sign_descent_cpu.descent_pass(g, h, H, torch.tensor([0, 1, 3]), choice, G)
    with pytest.raises(ValueError):
        sign_descent_cpu.descent_pass(torch.ones(9, 4), torch.ones(9, 3), H, order, choice, G)
    with pytest.raises(ValueError):
        sign_descent_cpu.descent_pass(g, h, H, order, choice, G.t())
