"""RaBiTLinear: the coupled derivation, gradients, modes, freezing and optimizer memory."""
import pytest
import torch
from torch import nn

from rabit import RaBiTConfig, RaBiTLinear
from rabit.ops import binarize


def make_layer(mode="coupled", k=2, out=12, inp=20, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=True)
    cfg = RaBiTConfig(num_paths=k, mode=mode, precondition=False, **kw)
    return lin, RaBiTLinear.from_linear(lin, cfg)


def test_coupled_forward_equals_equations_exactly():
    lin, layer = make_layer("coupled", k=3)
    with torch.no_grad():  # make scales distinct from the init so the test is not trivially consistent
        for p in layer.scale_out:
            p.mul_(torch.rand_like(p) + 0.5)
    W = layer.latent.detach()
    g = [p.detach() for p in layer.scale_out]
    h = [p.detach() for p in layer.scale_in]
    B1 = torch.where(W >= 0, 1.0, -1.0)
    R1 = W - g[0][:, None] * B1 * h[0][None, :]
    B2 = torch.where(R1 >= 0, 1.0, -1.0)
    R2 = R1 - g[1][:, None] * B2 * h[1][None, :]
    B3 = torch.where(R2 >= 0, 1.0, -1.0)
    expected = sum(gi[:, None] * Bi * hi[None, :] for gi, Bi, hi in zip(g, (B1, B2, B3), h))
    assert torch.equal(layer._weight_with_ste().detach(), expected)
    with torch.no_grad():
        assert torch.equal(layer.effective_weight(), expected)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, rtol=0, atol=0)
    for (gi, Bi, hi), B in zip(layer.paths(), (B1, B2, B3)):
        assert torch.equal(Bi, B)
        assert set(Bi.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("mode", ["coupled", "independent"])
def test_gradients_reach_latent_and_every_scale(mode):
    _, layer = make_layer(mode)
    x = torch.randn(7, 20)
    layer(x).pow(2).sum().backward()
    for p in layer.latent_parameters() + layer.scale_parameters() + [layer.bias]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_coupled_ste_gradient_is_effective_weight_gradient():
    _, layer = make_layer("coupled")
    x = torch.randn(7, 20)
    w_eff = layer._weight_with_ste()
    w_leaf = w_eff.detach().requires_grad_(True)
    (x @ w_leaf.T).pow(2).sum().backward()
    (x @ w_eff.T).pow(2).sum().backward()
    torch.testing.assert_close(layer.latent.grad, w_leaf.grad)
    # scales: ordinary gradient with B constant: dL/dg_i = sum_j G_ij B_ij h_ij
    B = layer.paths()
    for i, (g, Bi, h) in enumerate(B):
        torch.testing.assert_close(layer.scale_out[i].grad, (w_leaf.grad * Bi * h[None, :]).sum(1))
        torch.testing.assert_close(layer.scale_in[i].grad, (w_leaf.grad * Bi * g[:, None]).sum(0))


def test_clipped_ste_zeroes_gradient_beyond_representable_range():
    _, layer = make_layer("coupled", ste="clipped", ste_clip=1.0)
    with torch.no_grad():
        layer.latent[0, 0] = 1e3  # far beyond sum_i g_i h_i
    layer(torch.randn(3, 20)).sum().backward()
    assert layer.latent.grad[0, 0] == 0
    assert layer.latent.grad.abs().sum() > 0


def test_independent_paths_use_their_own_latents():
    _, layer = make_layer("independent")
    for (g, B, h), lat in zip(layer.paths(), layer.latents):
        assert torch.equal(B, binarize(lat.detach()))


def test_latents_start_consistent_with_init():
    lin, ind = make_layer("independent", init="isvid")
    _, cpl = make_layer("coupled", init="isvid", latent_init="reconstruction")
    with torch.no_grad():
        # Independent latents reproduce the init exactly; both layers start from the same approximation
        # wherever path 1 dominates path 2 (the reconstruction's sign is then B_1).
        assert torch.allclose(ind.effective_weight(), cpl.effective_weight(), atol=1e-6) or \
            (ind.effective_weight() - cpl.effective_weight()).abs().gt(1e-6).float().mean() < 0.2


def test_frozen_mode_freezes_all_but_last_path():
    _, layer = make_layer("frozen", k=3)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"latents.2", "scale_out.2", "scale_in.2", "bias"}
    before = [p.clone() for p in layer.paths()[0]]
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(4, 20)).pow(2).sum().backward()
    opt.step()
    for a, b in zip(before, layer.paths()[0]):
        assert torch.equal(a, b)


def test_one_path_is_onebit_layer():
    lin, layer = make_layer("coupled", k=1, init="svid")
    (g, B, h), = layer.paths()
    assert torch.equal(B, binarize(lin.weight.detach()))
    assert layer.effective_weight().shape == lin.weight.shape


def test_coupled_training_recovers_a_representable_weight():
    """The target layer is exactly a 2-path binary matrix; the student starts from a noisy copy of it.

    Coupled training (STE into the shared latent, Adam) must find it again: sign flips are learned, not only
    scales; with the latent frozen, the scales alone cannot get there.
    """
    torch.manual_seed(0)
    out, inp = 32, 48
    B1, B2 = binarize(torch.randn(out, inp)), binarize(torch.randn(out, inp))
    g, h = torch.rand(out) + 0.5, torch.rand(inp) + 0.5
    w_true = g[:, None] * (B1 + 0.4 * B2) * h[None, :]
    x = torch.randn(512, inp)
    target = x @ w_true.T
    finals = {}
    for latent_lr in (0.0, 1e-2):
        lin = nn.Linear(inp, out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w_true + 0.5 * torch.randn(out, inp))
        layer = RaBiTLinear.from_linear(lin, RaBiTConfig(mode="coupled", precondition=False))
        opt = torch.optim.Adam([{"params": layer.scale_parameters(), "lr": 1e-2},
                                {"params": layer.latent_parameters(), "lr": latent_lr}])
        for _ in range(300):
            loss = (layer(x) - target).pow(2).mean()
            first = loss.item() if _ == 0 else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals[latent_lr] = loss.item()
    assert finals[0.0] > 0.3 * first          # scales alone stay far from the target
    assert finals[1e-2] < 0.01 * first        # learning the signs reaches it


def _state_bytes(opt, params):
    ids = {id(p) for p in params}
    return sum(t.numel() * t.element_size() for p, st in opt.state.items() if id(p) in ids
               for t in st.values() if torch.is_tensor(t) and t.ndim > 0)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_coupled_optimizer_state_is_half_of_independent(optim):
    sizes = {}
    for mode in ("coupled", "independent"):
        _, layer = make_layer(mode, out=64, inp=96)
        latents = layer.latent_parameters()
        opt = torch.optim.AdamW(latents, lr=1e-3) if optim == "adamw" else torch.optim.Muon(latents, lr=1e-3)
        layer(torch.randn(4, 96)).sum().backward()
        opt.step()
        sizes[mode] = _state_bytes(opt, latents)
    assert sizes["coupled"] > 0
    assert sizes["independent"] == 2 * sizes["coupled"]


def test_inference_cache_invalidated_by_parameter_update():
    _, layer = make_layer("coupled")
    with torch.no_grad():
        w1 = layer.effective_weight().clone()
        assert layer.effective_weight() is layer.effective_weight()
        layer.scale_out[0].mul_(2)
        w2 = layer.effective_weight()
    assert not torch.equal(w1, w2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_paths"):
        RaBiTConfig(num_paths=0)
    with pytest.raises(ValueError, match="unknown mode"):
        RaBiTConfig(mode="shared")
    with pytest.raises(ValueError, match="unknown init"):
        RaBiTConfig(init="gptq")
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf.*'blk'|'blk'.*NaN or Inf"):
        RaBiTLinear.from_linear(lin, RaBiTConfig(precondition=False), name="blk")
    conv_like = nn.Linear(4, 3)
    conv_like.weight = nn.Parameter(torch.randn(3, 4, 1))
    with pytest.raises(ValueError, match="2-D"):
        RaBiTLinear.from_linear(conv_like, RaBiTConfig(precondition=False))
