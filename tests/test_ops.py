"""The pure math: sign, STE, SVID variants, preconditioning."""
import pytest
import torch

from rabit.ops import (binarize, importance_weights, iterative_residual_svid, naive_residual_sign,
                       preconditioned_decompose, rank1_nonnegative, reconstruct, residual_svid, sign_ste,
                       straight_through, svid)
from rabit.ops.svid import coupled_signs, path_matrix


def test_binarize_zero_is_plus_one_and_values_binary():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert binarize(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_sign_ste_identity_and_clipped_gradients():
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    sign_ste(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]
    x.grad = None
    sign_ste(x, clip=1.0).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0]


def test_straight_through_value_and_gradient():
    latent = torch.randn(3, 4, requires_grad=True)
    value = torch.randn(3, 4)
    mask = (torch.rand(3, 4) > 0.5).float()
    out = straight_through(value, latent, mask)
    assert torch.equal(out, value)
    g = torch.randn(3, 4)
    out.backward(g)
    assert torch.equal(latent.grad, g * mask)


def test_rank1_matches_svd_on_nonnegative_matrix():
    torch.manual_seed(0)
    m = torch.rand(37, 53) * torch.rand(37, 1) * 3
    u, v = rank1_nonnegative(m, iters=50)
    U, S, Vh = torch.linalg.svd(m)
    best = S[0] * torch.outer(U[:, 0], Vh[0])
    assert (u >= 0).all() and (v >= 0).all()
    torch.testing.assert_close(torch.outer(u, v), best, rtol=1e-4, atol=1e-5)


def test_svid_is_sign_times_rank1_and_optimal_among_rank1_scalings():
    torch.manual_seed(1)
    w = torch.randn(24, 40)
    g, B, h = svid(w)
    assert torch.equal(B, binarize(w))
    assert (g >= 0).all() and (h >= 0).all()
    err = torch.linalg.matrix_norm(w - path_matrix(g, B, h))
    # Perturbing the scales can only make it worse.
    for _ in range(5):
        g2 = (g * (1 + 0.05 * torch.randn_like(g))).clamp_min(0)
        assert torch.linalg.matrix_norm(w - path_matrix(g2, B, h)) >= err - 1e-5
    # And it beats a scalar mean-abs scale.
    assert err < torch.linalg.matrix_norm(w - w.abs().mean() * B)


@pytest.mark.parametrize("shape", [(16, 16), (33, 7), (5, 129)])
def test_isvid_error_non_increasing_and_below_greedy(shape):
    torch.manual_seed(2)
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * torch.rand(1, shape[1]) * 4
    paths, errors = iterative_residual_svid(w, num_paths=2, rounds=6, return_errors=True)
    greedy = torch.linalg.matrix_norm(w - reconstruct(residual_svid(w, 2))).item()
    assert errors[0] == pytest.approx(greedy, rel=1e-6)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < greedy * 0.999
    assert torch.linalg.matrix_norm(w - reconstruct(paths)).item() == pytest.approx(errors[-1], rel=1e-5)


def test_residual_methods_order_on_structured_weight():
    torch.manual_seed(3)
    w = torch.randn(64, 96) * torch.rand(64, 1) * torch.rand(1, 96) * 3
    err = lambda p: torch.linalg.matrix_norm(w - reconstruct(p)).item()
    naive, greedy = err(naive_residual_sign(w, 2)), err(residual_svid(w, 2))
    isvid = err(iterative_residual_svid(w, 2, rounds=4))
    assert isvid < greedy < naive


def test_more_paths_reduce_error():
    torch.manual_seed(4)
    w = torch.randn(32, 48)
    errs = [torch.linalg.matrix_norm(w - reconstruct(residual_svid(w, k))).item() for k in (1, 2, 3, 4)]
    assert errs == sorted(errs, reverse=True)


def test_coupled_signs_follow_the_equations():
    torch.manual_seed(5)
    W = torch.randn(10, 12)
    g = [torch.rand(10), torch.rand(10) * 0.5]
    h = [torch.rand(12), torch.rand(12)]
    B = coupled_signs(W, g, h)
    B1 = torch.where(W >= 0, 1.0, -1.0)
    R1 = W - g[0][:, None] * B1 * h[0][None, :]
    B2 = torch.where(R1 >= 0, 1.0, -1.0)
    assert torch.equal(B[0], B1) and torch.equal(B[1], B2)


def test_importance_weights_normalized_and_safe_with_zeros():
    s = importance_weights(torch.tensor([0.0, 1.0, 4.0, 16.0]), alpha=0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.exp(torch.log(s).mean()).item() == pytest.approx(1.0, rel=1e-5)
    assert s[3] / s[2] == pytest.approx(2.0, rel=1e-5)


def test_preconditioned_decompose_maps_scales_back_exactly_for_one_path():
    torch.manual_seed(6)
    w = torch.randn(8, 6)
    s_in, s_out = torch.rand(6) + 0.1, torch.rand(8) + 0.1
    paths = preconditioned_decompose(w, lambda m: [svid(m)], s_in, s_out, 1.0, 1.0)
    # The weighted problem's optimum, mapped back, reproduces the preconditioned fit divided by the weights.
    a_in, a_out = importance_weights(s_in, 1.0), importance_weights(s_out, 1.0)
    g, B, h = svid(a_out[:, None] * w * a_in[None, :])
    torch.testing.assert_close(reconstruct(paths), path_matrix(g, B, h) / a_out[:, None] / a_in[None, :])


def test_preconditioning_lowers_weighted_output_error():
    """With anisotropic inputs, preconditioning by input RMS lowers the error on those inputs."""
    torch.manual_seed(7)
    w = torch.randn(48, 64)
    scale = torch.exp(torch.randn(64) * 1.5)
    x = torch.randn(512, 64) * scale
    rms = x.pow(2).mean(0).sqrt()
    plain = reconstruct(iterative_residual_svid(w, 2, rounds=3))
    pre = reconstruct(preconditioned_decompose(w, lambda m: iterative_residual_svid(m, 2, rounds=3),
                                               rms, None, 1.0, 0.0))
    err = lambda a: torch.linalg.matrix_norm(x @ (w - a).T).item()
    assert err(pre) < 0.95 * err(plain)


def test_svid_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        svid(torch.randn(2, 3, 4))
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        residual_svid(w, 2)
