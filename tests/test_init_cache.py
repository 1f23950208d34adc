"""The init cache: paths saved from one run rebuild exactly the student a fresh initialization gives, in
every mode, and a stale or damaged cache file is ignored rather than loaded."""
import pytest
import torch

from rabit import init_cache
from rabit.config import RaBiTConfig
from rabit.quantize import find_linear_layers, rabit_layers
from rabit.train.trainer import make_student

from conftest import make_tiny_llama


def _calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (4, 16), generator=g)


@pytest.mark.parametrize("mode", ["coupled", "independent", "frozen"])
def test_cached_paths_rebuild_the_same_student(tmp_path, mode):
    teacher = make_tiny_llama()
    # The cache is written by a coupled run and read by a run in `mode`: the paths do not depend on the mode.
    source = make_student(teacher, RaBiTConfig(mode="coupled"), calibration=_calib())
    key = init_cache.init_key("fp", RaBiTConfig(mode=mode), {"calib": "a"})
    path = init_cache.cache_path(tmp_path, key)
    init_cache.save_paths(path, rabit_layers(source), key)

    fresh = make_student(teacher, RaBiTConfig(mode=mode), calibration=_calib())
    loaded = make_student(teacher, RaBiTConfig(mode=mode), initialize=False)
    assert init_cache.load_paths(path, rabit_layers(loaded), find_linear_layers(teacher, RaBiTConfig()), key)
    a, b = fresh.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, fresh(x).logits, rtol=0, atol=0)


def test_key_depends_on_init_settings_not_mode():
    base = init_cache.init_key("fp", RaBiTConfig(), {"calib": "a"})
    assert init_cache.init_key("fp", RaBiTConfig(mode="independent", latent_init="reconstruction"),
                               {"calib": "a"}) == base
    for other in (init_cache.init_key("fp2", RaBiTConfig(), {"calib": "a"}),
                  init_cache.init_key("fp", RaBiTConfig(isvid_rounds=2), {"calib": "a"}),
                  init_cache.init_key("fp", RaBiTConfig(alpha_in=0.5), {"calib": "a"}),
                  init_cache.init_key("fp", RaBiTConfig(), {"calib": "b"})):
        assert other != base


def test_stale_or_damaged_cache_is_ignored(tmp_path):
    teacher = make_tiny_llama()
    cfg = RaBiTConfig(precondition=False)
    key = init_cache.init_key("fp", cfg, None)
    path = init_cache.cache_path(tmp_path, key)
    init_cache.save_paths(path, rabit_layers(make_student(teacher, cfg)), key)
    linears = find_linear_layers(teacher, cfg)

    empty = make_student(teacher, cfg, initialize=False)
    before = {k: v.clone() for k, v in empty.state_dict().items()}
    other_key = init_cache.init_key("another model", cfg, None)
    assert not init_cache.load_paths(path, rabit_layers(empty), linears, other_key)
    assert not init_cache.load_paths(tmp_path / "missing.safetensors", rabit_layers(empty), linears, key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert not init_cache.load_paths(path, rabit_layers(empty), linears, key)
    for k, v in empty.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # A file for a model with other layers does not cover this one's.
    small = make_student(make_tiny_llama(layers=1), cfg)
    init_cache.save_paths(path, rabit_layers(small), key)
    assert not init_cache.load_paths(path, rabit_layers(empty), linears, key)
