"""quantize_ on tiny random Llama models: replacement, calibration statistics, preconditioning, errors."""
import pytest
import torch
from torch import nn

from rabit import RaBiTConfig, collect_channel_stats, find_linear_layers, quantize_, rabit_layers
from conftest import make_tiny_llama


def calib(vocab=96, n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def test_quantize_replaces_every_linear_but_excluded(tiny_llama):
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)]
    quantize_(tiny_llama, RaBiTConfig(), calibration=calib())
    q = rabit_layers(tiny_llama)
    assert set(q) == {n for n in names if n != "lm_head"}
    assert type(tiny_llama.lm_head) is nn.Linear
    assert len(q) == 2 * 7
    out = tiny_llama(calib(n=2)).logits
    assert torch.isfinite(out).all()


def test_channel_stats_match_manual_computation(tiny_llama):
    layers = find_linear_layers(tiny_llama, RaBiTConfig())
    ids = calib(n=4)
    stats = collect_channel_stats(tiny_llama, layers, ids, batch_size=2)
    # input RMS of q_proj of layer 0 computed by hand with a plain hook
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    h = layers[name].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, m.in_features)))
    with torch.no_grad():
        tiny_llama(ids)
    h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(stats[name].in_stat, x.pow(2).mean(0).sqrt(), rtol=1e-4, atol=1e-6)
    assert stats[name].tokens == ids.numel()
    assert stats[name].grad_tokens == ids.numel()
    assert (stats[name].out_stat > 0).all()
    # no parameter received a gradient
    assert all(p.grad is None for p in tiny_llama.parameters())


def _output_error(model_fp, model_q, ids):
    """Sum over quantized layers of ||y_fp - y_q||^2 on the FP model's own layer inputs."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.setdefault(n, []).append(i[0].detach()))
             for n, m in find_linear_layers(model_fp, RaBiTConfig()).items()]
    with torch.no_grad():
        model_fp(ids)
    for h in hooks:
        h.remove()
    total = 0.0
    qmods = dict(model_q.named_modules())
    fmods = dict(model_fp.named_modules())
    with torch.no_grad():
        for n, xs in inputs.items():
            x = torch.cat(xs)
            total += (fmods[n](x) - qmods[n](x)).pow(2).sum().item()
    return total


def test_preconditioned_init_lowers_output_error_on_calibration_activations():
    ids = calib(n=16, seq=48)
    fp = make_tiny_llama(hidden=64, intermediate=128)
    # Make activations anisotropic like real LLMs (a few large channels), which is what preconditioning uses.
    with torch.no_grad():
        fp.model.embed_tokens.weight[:, :4] *= 8
    errs = {}
    for pre in (False, True):
        m = make_tiny_llama(hidden=64, intermediate=128)
        m.load_state_dict(fp.state_dict())
        quantize_(m, RaBiTConfig(precondition=pre, alpha_in=0.5, alpha_out=0.0), calibration=ids)
        errs[pre] = _output_error(fp, m, ids)
    assert errs[True] < 0.9 * errs[False]


def test_init_methods_order_by_weight_error(tiny_llama):
    sd = tiny_llama.state_dict()
    errs = {}
    for init in ("naive", "svid", "isvid"):
        m = make_tiny_llama()
        m.load_state_dict(sd)
        quantize_(m, RaBiTConfig(init=init, precondition=False))
        errs[init] = sum(torch.linalg.matrix_norm(sd[n + ".weight"] - l.effective_weight()).item() ** 2
                         for n, l in rabit_layers(m).items())
    assert errs["isvid"] < errs["svid"] < errs["naive"]


@pytest.mark.parametrize("mode", ["coupled", "independent", "frozen"])
def test_modes_build_and_run(tiny_llama, mode):
    quantize_(tiny_llama, RaBiTConfig(mode=mode, precondition=False))
    out = tiny_llama(calib(n=2), labels=calib(n=2))
    out.loss.backward()
    layer = next(iter(rabit_layers(tiny_llama).values()))
    assert layer.mode == mode
    assert layer.scale_out[-1].grad is not None


def test_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        quantize_(tiny_llama, RaBiTConfig(precondition=True))
    with pytest.raises(ValueError, match="'nonexistent' matches no module"):
        quantize_(tiny_llama, RaBiTConfig(precondition=False, exclude=["lm_head", "nonexistent"]))
    with pytest.raises(ValueError, match="no linear layers"):
        quantize_(nn.Sequential(nn.Embedding(4, 4)), RaBiTConfig(precondition=False))
    with pytest.raises(ValueError, match="no linear layers"):
        quantize_(tiny_llama, RaBiTConfig(precondition=False, exclude=["."]))
    m = make_tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        quantize_(m, RaBiTConfig(precondition=False))


def test_no_output_importance_needs_no_backward_and_changes_nothing(monkeypatch):
    """alpha_out = 0 weighs every output channel alike: make_student then calibrates with forward passes only, and
    the student is the one the gradient statistics would have given."""
    import copy

    from rabit.quantize import collect_channel_stats as real_collect
    from rabit.train import make_student, trainer

    teacher, ids = make_tiny_llama(), calib()
    cfg = RaBiTConfig(alpha_out=0.0)
    with_grads = copy.deepcopy(teacher)
    stats = real_collect(with_grads, find_linear_layers(with_grads, cfg), ids, gradients=True)
    assert all(s.out_stat is not None for s in stats.values())
    quantize_(with_grads, cfg, calibration=ids, stats=stats)

    asked = []
    monkeypatch.setattr(trainer, "collect_channel_stats",
                        lambda *a, **k: asked.append(k.get("gradients", True)) or real_collect(*a, **k))
    student = make_student(teacher, cfg, calibration=ids)
    assert asked == [False]
    for (n, a), (_, b) in zip(student.state_dict().items(), with_grads.state_dict().items()):
        assert torch.equal(a, b), n
    make_student(teacher, RaBiTConfig(), calibration=ids)   # the default alpha_out (0.5) still takes gradients
    assert asked == [False, True]
