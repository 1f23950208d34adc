"""The fused coupled linear (ops/coupled.py) against the layer's autograd composition, and fp32 Muon."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rabit import RaBiTConfig, RaBiTLinear
from rabit.ops import coupled_signs, reconstruct, ste_mask
from rabit.ops.coupled import coupled_linear, coupled_weight
from rabit.train.optim import Muon, newton_schulz


def make_layer(k=2, out=13, inp=21, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=True)
    layer = RaBiTLinear.from_linear(lin, RaBiTConfig(num_paths=k, mode="coupled", precondition=False, **kw))
    with torch.no_grad():  # scales away from the init, one of them negative, so nothing is trivially consistent
        for p in list(layer.scale_out) + list(layer.scale_in):
            p.mul_(torch.rand_like(p) + 0.5)
        layer.scale_in[0][0] = -layer.scale_in[0][0]
        layer.latent[0, :3] = 0.0  # sign(0) = +1
    return layer


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("clip", [None, 0.7])
def test_coupled_weight_is_the_composition_bitwise(k, clip):
    layer = make_layer(k)
    W = layer.latent.detach()
    g = [p.detach() for p in layer.scale_out]
    h = [p.detach() for p in layer.scale_in]
    weight, positives, mask = coupled_weight(W, g, h, clip)
    signs = coupled_signs(W, g, h)
    assert torch.equal(weight, reconstruct(list(zip(g, signs, h))))
    for pos, B in zip(positives, signs):
        assert pos.dtype == torch.bool and torch.equal(pos, B > 0)
    if clip is None:
        assert mask is None
    else:
        bound = sum(gi.abs()[:, None] * hi.abs()[None, :] for gi, hi in zip(g, h))
        assert torch.equal(mask.float(), ste_mask(W, bound, clip))
        assert 0 < mask.float().mean() < 1


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_coupled_linear_matches_composition_value_and_gradients(k, ste):
    kw = {"ste": ste, "ste_clip": 0.7} if ste == "clipped" else {}
    fused, plain = make_layer(k, **kw), make_layer(k, **kw)
    x = torch.randn(2, 5, 21)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = fused(x1)  # forward() takes the fused op in training
    y2 = F.linear(x2, plain._weight_with_ste(), plain.bias)
    assert torch.equal(y1, y2)
    target = torch.randn_like(y1)
    ((y1 - target) ** 2).sum().backward()
    ((y2 - target) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    pairs = [(fused.latent, plain.latent), (fused.bias, plain.bias)]
    pairs += list(zip(fused.scale_parameters(), plain.scale_parameters()))
    for a, b in pairs:
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_non_finite_latent_shows_in_the_output():
    layer = make_layer(2)
    with torch.no_grad():
        layer.latent[0, 0] = float("inf")
    y = layer(torch.randn(3, 21))
    assert not torch.isfinite(y[:, 0]).any() and torch.isfinite(y[:, 1:]).all()


def test_layer_keeps_the_derivation_until_a_parameter_changes():
    layer = make_layer(2)
    x = torch.randn(4, 21)
    layer(x).sum().backward()
    state = layer._coupled_state()
    layer(x).sum().backward()  # a second micro-batch reuses it
    assert layer._coupled_state() is state
    with torch.no_grad():
        layer.latent.add_(torch.randn_like(layer.latent))  # an optimizer step
    fresh = layer._coupled_state()
    assert fresh is not state
    assert torch.equal(fresh[0], reconstruct(layer.paths()))
    assert not torch.equal(fresh[0], state[0])


def test_coupled_linear_under_autocast_computes_in_bf16():
    layer = make_layer(2)
    x = torch.randn(3, 21, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = coupled_linear(x, layer.latent, list(layer.scale_out), list(layer.scale_in), layer.bias)
        ref = F.linear(x, layer._weight_with_ste(), layer.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.latent.grad.dtype == torch.float32


def test_newton_schulz_bf16_is_torch_muons_and_fp32_agrees():
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    coeffs = (3.4445, -4.7750, 2.0315)
    for shape in [(48, 20), (20, 48), (33, 33)]:
        g = torch.randn(*shape)
        ref = _zeropower_via_newtonschulz(g, coeffs, 5, 1e-7)
        assert torch.equal(newton_schulz(g, coeffs, 5, 1e-7, torch.bfloat16), ref)
        fp32 = newton_schulz(g, coeffs, 5, 1e-7, torch.float32)
        assert fp32.dtype == torch.float32
        assert ((fp32 - ref.float()).norm() / fp32.norm()) < 0.03
        s = torch.linalg.svdvals(fp32)
        assert s.min() > 0.5 and s.max() < 1.3  # orthogonalized: singular values near 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_muon_step_matches_torch_muon(dtype):
    torch.manual_seed(0)
    p1 = nn.Parameter(torch.randn(24, 40))
    p2 = nn.Parameter(p1.detach().clone())
    kw = dict(lr=0.02, weight_decay=0.01, momentum=0.9, nesterov=True, adjust_lr_fn="match_rms_adamw")
    ours, theirs = Muon([p1], ns_dtype=dtype, **kw), torch.optim.Muon([p2], **kw)
    for _ in range(3):
        grad = torch.randn(24, 40)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        if dtype == torch.bfloat16:
            assert torch.equal(p1, p2)
    assert torch.equal(ours.state[p1]["momentum_buffer"], theirs.state[p2]["momentum_buffer"])
    if dtype == torch.float32:
        assert 0 < (p1 - p2).abs().max() < 1e-3  # differs from bf16 by rounding only
