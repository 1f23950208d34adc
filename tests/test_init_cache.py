"""The init cache: paths saved from one run rebuild exactly the student a fresh initialization gives, in
every mode, and a stale or damaged cache file is ignored rather than loaded, with a notice."""
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


def _recorded(teacher, cfg, path, key, **kw):
    recorder = init_cache.PathRecorder()
    student = make_student(teacher, cfg, on_init=recorder, **kw)
    recorder.save(path, key)
    return student


@pytest.mark.parametrize("mode", ["coupled", "independent", "frozen"])
def test_cached_paths_rebuild_the_same_student(tmp_path, mode):
    # seed 1: on this model a coupled layer's re-derived signs differ from the decomposition at a few weights,
    # so a cache holding the coupled student's own paths would not rebuild an independent or frozen one.
    teacher = make_tiny_llama(seed=1)
    # The cache is written by a coupled run and read by a run in `mode`: the paths do not depend on the mode.
    key = init_cache.init_key("fp", RaBiTConfig(mode=mode), {"calib": "a"})
    path = init_cache.cache_path(tmp_path, key)
    source = _recorded(teacher, RaBiTConfig(mode="coupled"), path, key, calibration=_calib())
    independent = make_student(teacher, RaBiTConfig(mode="independent"), calibration=_calib())
    assert any(not torch.equal(a.paths()[i][1], b.paths()[i][1])
               for a, b in zip(rabit_layers(source).values(), rabit_layers(independent).values()) for i in range(2))

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


def test_signs_round_trip_through_the_project_bit_packer():
    B = torch.where(torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    packed = init_cache._pack_signs(B)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 2)
    assert torch.equal(init_cache._unpack_signs(packed, 13), B)
    assert int(init_cache._pack_signs(torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, -1]]))) == 1   # bit 0 = input 0


def test_stale_or_damaged_cache_is_ignored(tmp_path, capsys):
    teacher = make_tiny_llama()
    cfg = RaBiTConfig(precondition=False)
    key = init_cache.init_key("fp", cfg, None)
    path = init_cache.cache_path(tmp_path, key)
    _recorded(teacher, cfg, path, key)
    linears = find_linear_layers(teacher, cfg)

    empty = make_student(teacher, cfg, initialize=False)
    before = {k: v.clone() for k, v in empty.state_dict().items()}
    capsys.readouterr()

    def notice():
        err = capsys.readouterr().err
        assert err.count("\n") <= 1
        return err

    other_key = init_cache.init_key("another model", cfg, None)
    assert not init_cache.load_paths(path, rabit_layers(empty), linears, other_key)
    assert "cannot be used (it was written for other settings); initializing from scratch" in notice()
    assert not init_cache.load_paths(tmp_path / "missing.safetensors", rabit_layers(empty), linears, key)
    assert notice() == ""   # a plain miss is not worth a word
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert not init_cache.load_paths(path, rabit_layers(empty), linears, key)
    assert f"the init cache {path} cannot be used (" in notice()
    for k, v in empty.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # A file for a model with other layers does not cover this one's.
    _recorded(make_tiny_llama(layers=1), cfg, path, key)
    assert not init_cache.load_paths(path, rabit_layers(empty), linears, key)
    assert "(it holds other layers)" in notice()


def test_model_fingerprint_is_hashed_once_per_job_and_anew_outside_it(monkeypatch):
    """A job asks for the teacher's fingerprint several times: inside `remembered_fingerprints` (the job) a model is
    hashed once; outside, every call hashes, so a model changed between jobs (even through .data) gets a new key."""
    import hashlib

    from rabit.cli import quantize as q

    calls = {"n": 0}
    real = hashlib.sha256

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(q.hashlib, "sha256", counting)
    model, twin = make_tiny_llama(seed=3), make_tiny_llama(seed=3)
    with q.remembered_fingerprints():
        first = q._model_fingerprint(model)
        assert q._model_fingerprint(model) == first and calls["n"] == 1
        assert q._model_fingerprint(twin) == first and calls["n"] == 2      # another object: hashed, same bytes
        with q.remembered_fingerprints():                                   # nested: the same memo
            assert q._model_fingerprint(model) == first and calls["n"] == 2
    model.model.norm.weight.data.mul_(1.5)
    changed = q._model_fingerprint(model)
    assert changed != first and calls["n"] == 3
    assert q._model_fingerprint(model) == changed and calls["n"] == 4       # outside a job: no memo
