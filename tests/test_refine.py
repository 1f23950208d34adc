"""Output-aware refinement of binary paths (rabit.ops.refine), alone, on random matrices."""
import pytest
import torch

from rabit.ops.refine import (DAMP_CLIP, coupled_latent, damp_scale, damped, gptq_signs, mismatches, output_error,
                              refine_paths, refit_column_scales, refit_row_scales, refit_scales)
from rabit.ops.svid import coupled_signs, iterative_residual_svid, path_matrix, reconstruct


def problem(out=24, n=20, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * (torch.rand(n, generator=g) + 0.2)
    # correlated, unevenly scaled inputs: where output-aware fitting differs from weight fitting
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=g)
    x = torch.randn(tokens, n, generator=g) @ mix * (torch.rand(n, generator=g) * 3 + 0.1)
    return w, x.T @ x


@pytest.mark.parametrize("shape", [(24, 20), (7, 33), (33, 5)])
def test_gptq_signs_with_identity_metric_round_to_nearest(shape):
    # With H = I there is no error to feed forward: each weight takes its nearest expressible value.
    w, _ = problem(*shape)
    paths = iterative_residual_svid(w, 2, 2)
    g, h = [p[0] for p in paths], [p[2] for p in paths]
    signs = gptq_signs(w, g, h, torch.eye(w.shape[1]), damp=0.0)
    a, b = path_matrix(g[0], torch.ones_like(w), h[0]), path_matrix(g[1], torch.ones_like(w), h[1])
    levels = torch.stack([s1 * a + s2 * b for s1 in (-1, 1) for s2 in (-1, 1)])
    nearest = (levels - w).abs().min(0).values
    chosen = (signs[0] * a + signs[1] * b - w).abs()
    assert torch.allclose(chosen, nearest, atol=1e-6)
    assert all(set(s.unique().tolist()) <= {-1.0, 1.0} for s in signs)


def test_gptq_signs_lower_the_output_error_against_rounding():
    w, H = problem(48, 40)
    paths = iterative_residual_svid(w, 2, 4)
    g, h = [p[0] for p in paths], [p[2] for p in paths]
    nearest = gptq_signs(w, g, h, torch.eye(40), damp=0.0)
    fed = gptq_signs(w, g, h, H)
    err = lambda signs: output_error(w, [(gi, B, hi) for gi, B, hi in zip(g, signs, h)], H)  # noqa: E731
    assert err(fed) < 0.9 * err(nearest)


def test_act_order_is_gptq_on_the_columns_sorted_by_input_energy():
    # act order = the natural-order rounding of the same problem with its columns sorted by decreasing diag H,
    # mapped back; with H = I (no feedback) the order cannot matter at all
    w, H = problem(24, 20)
    paths = iterative_residual_svid(w, 2, 2)
    g, h = [p[0] for p in paths], [p[2] for p in paths]
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    sorted_signs = gptq_signs(w[:, perm], g, [hi[perm] for hi in h], H[perm][:, perm])
    act = gptq_signs(w, g, h, H, act_order=True)
    natural = gptq_signs(w, g, h, H)
    for a, s in zip(act, sorted_signs):
        assert torch.equal(a[:, perm], s)
    assert any(not torch.equal(a, n) for a, n in zip(act, natural))
    eye = torch.eye(20)
    assert all(torch.equal(a, n) for a, n in zip(gptq_signs(w, g, h, eye, damp=0.0, act_order=True),
                                                 gptq_signs(w, g, h, eye, damp=0.0)))


def test_act_order_lowers_the_output_error_where_input_energy_is_uneven():
    # a few input channels with massive activations (as in LLMs): rounding them first, while every other
    # column can still absorb their error, beats rounding them wherever they happen to sit
    total = {False: 0.0, True: 0.0}
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        n = 64
        w = torch.randn(32, n, generator=gen)
        x = torch.randn(512, n, generator=gen) * (torch.rand(n, generator=gen) + 0.1)
        x[:, torch.randperm(n, generator=gen)[:4]] *= 20
        H = x.T @ x
        paths = iterative_residual_svid(w, 2, 2)
        g, h = [p[0] for p in paths], [p[2] for p in paths]
        for order in total:
            signs = gptq_signs(w, g, h, H, act_order=order)
            total[order] += output_error(w, [(gi, B, hi) for gi, B, hi in zip(g, signs, h)], H)
    assert total[True] < 0.97 * total[False]


def test_row_and_column_refits_are_least_squares_optima():
    w, H = problem(16, 12)
    paths = iterative_residual_svid(w, 2, 2)
    Hd = damped(H)
    g = refit_row_scales(w, paths, Hd)
    h = refit_column_scales(w, paths, Hd)
    base = output_error(w, paths, Hd)
    with_g = [(gi, B, hh) for gi, (_, B, hh) in zip(g, paths)]
    with_h = [(gg, B, hi) for hi, (gg, B, _) in zip(h, paths)]
    assert output_error(w, with_g, Hd) <= base + 1e-3 * base
    assert output_error(w, with_h, Hd) <= base + 1e-3 * base
    # optimality: no small perturbation of the refit scales does better
    for trial in range(5):
        gen = torch.Generator().manual_seed(trial)
        eps = [1e-2 * torch.randn(gi.shape, generator=gen) * gi for gi in g]
        moved = [(gi + e, B, hh) for gi, e, (_, B, hh) in zip(g, eps, paths)]
        assert output_error(w, moved, Hd) >= output_error(w, with_g, Hd) * (1 - 1e-5)


@pytest.mark.parametrize("n,k", [(12, 2), (1030, 2), (700, 3)])   # joint solve; Gauss-Seidel (k * n > 2048)
def test_column_refit_with_the_callers_products_equals_the_plain_refit(n, k):
    # refine_paths hands the column refit w @ H and the row refit's (B_i * h_i) @ H: the same solution
    w, H = problem(9, n, tokens=2 * n)
    paths = iterative_residual_svid(w, k, 1)
    Hd = damped(H)
    products = []
    g = refit_row_scales(w, paths, Hd, products)
    assert len(products) == k
    with_g = [(gi, B, hh) for gi, (_, B, hh) in zip(g, paths)]
    plain = refit_column_scales(w, with_g, Hd)
    reused = refit_column_scales(w, with_g, Hd, WH=w @ Hd, products=products)
    for a, b in zip(plain, reused):
        assert torch.allclose(a, b, rtol=2e-3, atol=1e-6 * float(b.abs().max()))


def test_joint_and_per_path_column_refits_agree_at_their_fixed_point(monkeypatch):
    import rabit.ops.refine as refine

    w, H = problem(16, 10)
    paths = iterative_residual_svid(w, 2, 2)
    Hd = damped(H)
    joint = refit_column_scales(w, paths, Hd)
    monkeypatch.setattr(refine, "JOINT_SOLVE_LIMIT", 0)
    cur = paths
    for _ in range(200):  # Gauss-Seidel converges to the joint optimum
        hs = refit_column_scales(w, cur, Hd)
        cur = [(g, B, h) for h, (g, B, _) in zip(hs, cur)]
    e_joint = output_error(w, [(g, B, h) for h, (g, B, _) in zip(joint, paths)], Hd)
    assert output_error(w, cur, Hd) == pytest.approx(e_joint, rel=1e-3)


def test_refine_paths_never_increases_the_output_error_and_beats_isvid():
    w, H = problem(64, 48, tokens=512)
    paths = iterative_residual_svid(w, 2, 8)
    refined, errors = refine_paths(w, paths, H, rounds=3)
    assert all(b <= a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.8 * errors[0]
    assert output_error(w, refined, damped(H)) == pytest.approx(errors[-1], rel=1e-4)
    for g, B, h in refined:
        assert (g > 0).all() and (h > 0).all()
        assert set(B.unique().tolist()) <= {-1.0, 1.0}


def test_scale_refit_keeps_a_perfect_fit():
    g = torch.Generator().manual_seed(3)
    paths = [(torch.rand(9, generator=g) + 0.5, torch.randint(0, 2, (9, 7), generator=g).float() * 2 - 1,
              torch.rand(7, generator=g) + 0.5) for _ in range(2)]
    w = reconstruct(paths)
    _, H = problem(9, 7)
    refit = refit_scales(w, paths, damped(H))
    assert torch.allclose(reconstruct(refit), w, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coupled_latent_derives_the_paths_signs_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    out, n = 31, 17
    # arbitrary sign planes, including B_2 = -B_1 where the second path is the larger one
    paths = [(torch.rand(out, generator=g) + 0.1, torch.randint(0, 2, (out, n), generator=g).float() * 2 - 1,
              torch.rand(n, generator=g) + 0.1) for _ in range(2)]
    w = torch.randn(out, n, generator=g)
    assert mismatches(reconstruct(paths), paths) > 0  # the reconstruction alone does not always suffice
    latent = coupled_latent(paths, preferred=w)
    assert mismatches(latent, paths) == 0
    derived = coupled_signs(latent, [p[0] for p in paths], [p[2] for p in paths])
    assert all(torch.equal(d, p[1]) for d, p in zip(derived, paths))
    # where the preferred latent already derives the signs, it is kept
    keep = torch.stack([d == p[1] for d, p in zip(coupled_signs(w, [p[0] for p in paths], [p[2] for p in paths]),
                                                    paths)]).all(0)
    assert torch.equal(latent[keep], w[keep])


def test_centered_sums_and_fitted_bias_solve_the_fit_with_a_bias():
    from rabit.ops.refine import centered_sums, fitted_bias, output_target

    gen = torch.Generator().manual_seed(7)
    n, d, out = 400, 6, 5
    x = torch.randn(n, d, generator=gen) + 3.0 * torch.randn(d, generator=gen)   # inputs with a large mean
    w, b0 = torch.randn(out, d, generator=gen), torch.randn(out, generator=gen)
    t = x @ w.T + b0                                                             # affine targets
    H, T = x.T @ x, t.T @ x
    Hc, Tc = centered_sums(H, x.sum(0), n, T, t.sum(0))
    xc, tc = x - x.mean(0), t - t.mean(0)
    torch.testing.assert_close(Hc, xc.T @ xc, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(Tc, tc.T @ xc, rtol=1e-4, atol=1e-3)
    assert centered_sums(H, x.sum(0), n)[1] is None
    # the centered least-squares weight and its fitted bias recover the affine map exactly
    wt = output_target(torch.zeros_like(w), Hc, Tc, damp=0.0)
    torch.testing.assert_close(wt, w, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fitted_bias(wt, x.sum(0), t.sum(0), n), b0, rtol=1e-3, atol=1e-3)
    # for any fixed Q the fitted bias is the best one: every other bias leaves a larger error
    q = torch.sign(w) * w.abs().mean()
    best = fitted_bias(q, x.sum(0), t.sum(0), n)
    loss = lambda b: float((x @ q.T + b - t).pow(2).sum())   # noqa: E731
    for _ in range(5):
        assert loss(best) < loss(best + 0.05 * torch.randn(out, generator=gen))
    with pytest.raises(ValueError, match="s_t"):
        centered_sums(H, x.sum(0), n, T)


def massive_channel_problem(out=32, n=48, tokens=512, seed=0):
    """(w, x): correlated inputs of similar energy per channel, but channel 0 carries a massive activation on
    tokens 0 and 1 (as a decoder's down_proj input where its attention-sink activation is made), which gives that
    channel ~10^5 times the energy of the others."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * (torch.rand(n, generator=g) + 0.2)
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=g)
    x = torch.randn(tokens, n, generator=g) @ mix * (torch.rand(n, generator=g) * 0.5 + 0.75)
    x[:2, 0] = 1e4
    return w, x


def test_clipped_damping_reference_ignores_massive_channels():
    _, H = problem(24, 20)
    d = H.diagonal()
    assert float(d.max() / d.median()) < DAMP_CLIP   # no channel stands out: the two references agree
    assert torch.equal(damp_scale(H, "clipped"), damp_scale(H, "mean"))
    torch.testing.assert_close(damped(H, 0.1, "clipped"), H + 0.1 * d.mean() * torch.eye(20))
    _, x = massive_channel_problem()
    M = x.T @ x
    d = M.diagonal()
    ordinary = float(d[1:].mean())
    assert float(damp_scale(M, "mean")) > 1000 * ordinary      # one channel sets the mean alone
    clipped = float(damp_scale(M, "clipped"))
    assert ordinary <= clipped <= ordinary + DAMP_CLIP * float(d.median()) / len(d)
    torch.testing.assert_close(damped(M, 0.1, "clipped"), M + 0.1 * clipped * torch.eye(len(d)))
    with pytest.raises(ValueError, match="reference"):
        damp_scale(M, "median")


def test_refinement_with_a_massive_channel_stays_output_aware_only_with_the_clipped_reference():
    # damped relative to the mean, the ridge swamps every ordinary channel's energy and the fit becomes a weight
    # fit; relative to the clipped mean it stays output-aware: a lower output error on the tokens without the
    # massive activation (all but two)
    w, x = massive_channel_problem()
    start = iterative_residual_svid(w, 2, 4)
    errors = {}
    for ref in ("mean", "clipped"):
        paths, _ = refine_paths(w, start, x.T @ x, rounds=3, damp=0.1, act_order=True, descent=2, damp_reference=ref)
        errors[ref] = output_error(w, paths, x[2:].T @ x[2:])
    assert errors["clipped"] < 0.9 * errors["mean"], errors
