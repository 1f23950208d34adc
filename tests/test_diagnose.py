"""rabit diagnose: per-layer path correlations (paper Table 1) on constructed and tiny models, and the CLI."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from rabit.config import RaBiTConfig
from rabit.diagnose import layer_paths, path_correlations, plot_correlations, summarize
from rabit.layer import RaBiTLinear
from rabit.quantize import quantize_


class Toy(nn.Module):
    """An 'LM' with one linear layer after an embedding, called like a Hugging Face model."""

    def __init__(self, layer: nn.Module, vocab: int = 50, dim: int = 24):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = layer

    def forward(self, input_ids, use_cache=False):
        return self.proj(self.embed(input_ids))


def _independent_layer(dim=24, out=16):
    layer = RaBiTLinear(dim, out, config=RaBiTConfig(mode="independent", precondition=False))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in list(layer.latents) + list(layer.scale_out) + list(layer.scale_in):
            p.copy_(torch.randn_like(p))
    return layer


def test_constructed_minus_one_and_plus_one():
    # Path 2 = -path 1 exactly and a zero teacher: Corr(y1, y2) = -1, Corr(yt - y1, y2) = Corr(-y1, -y1) = +1.
    layer = _independent_layer()
    with torch.no_grad():
        layer.latents[1].copy_(layer.latents[0])
        layer.scale_in[1].copy_(layer.scale_in[0])
        layer.scale_out[1].copy_(-layer.scale_out[0])
    student = Toy(layer)
    teacher = Toy(nn.Linear(24, 16, bias=False))
    nn.init.zeros_(teacher.proj.weight)
    calib = torch.randint(0, 50, (3, 20))
    res = path_correlations(student, teacher, calib, batch_size=2)
    r = res["proj"]
    assert r["corr_paths"] == pytest.approx(-1.0, abs=1e-9)
    assert r["corr_residual"] == pytest.approx(1.0, abs=1e-9)
    assert r["tokens"] == 60 and r["num_paths"] == 2


def test_constructed_exact_teacher():
    # Teacher = path 1 + path 2 exactly: the residual y_t - y_1 is y_2 (corr +1) and the total error is 0.
    layer = _independent_layer()
    student = Toy(layer)
    teacher = Toy(nn.Linear(24, 16, bias=False))
    with torch.no_grad():
        teacher.proj.weight.copy_(sum(g[:, None] * B * h[None, :] for g, B, h in layer.paths()))
    r = path_correlations(student, teacher, torch.randint(0, 50, (2, 16)))["proj"]
    assert r["corr_residual"] == pytest.approx(1.0, abs=1e-6)
    assert r["rel_err_all"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < r["rel_err_1"] < 10


@pytest.fixture(scope="module")
def tiny_pair():
    teacher = make_tiny_llama()
    calib = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    student = quantize_(copy.deepcopy(teacher), RaBiTConfig(), calibration=calib)
    return teacher, student, calib


def test_tiny_llama_rabit_layers(tiny_pair):
    teacher, student, calib = tiny_pair
    res = path_correlations(student, teacher, calib, batch_size=2)
    names = [n for n, m in student.named_modules() if isinstance(m, RaBiTLinear)]
    assert list(res) == names and len(names) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for r in res.values():
        assert -1 <= r["corr_paths"] <= 1 and -1 <= r["corr_residual"] <= 1
        assert r["rel_err_all"] < r["rel_err_1"]  # the second path reduces the error
        assert r["corr_residual"] > 0.2  # ISVID: path 2 is fit to what path 1 leaves
        assert r["tokens"] == 4 * 24
    s = summarize(res)
    assert s["layers"] == 14 and s["corr_residual_min"] <= s["corr_residual_mean"] <= s["corr_residual_max"]
    # restricting to some layers, and errors
    one = path_correlations(student, teacher, calib, layers=[names[0]])
    assert list(one) == [names[0]]
    assert one[names[0]]["corr_paths"] == pytest.approx(res[names[0]]["corr_paths"], abs=1e-9)
    with pytest.raises(ValueError, match="no quantized"):
        path_correlations(teacher, teacher, calib)
    with pytest.raises(ValueError, match="not quantized layers"):
        path_correlations(student, teacher, calib, layers=["model.nope"])
    other = make_tiny_llama(hidden=64, heads=4, kv_heads=2, intermediate=64)
    with pytest.raises(ValueError, match="weight shape"):
        path_correlations(student, other, calib)


def test_packed_layers_match(tiny_pair):
    from rabit.packed_layer import PackedRaBiTLinear

    teacher, student, calib = tiny_pair
    ref = path_correlations(student, teacher, calib)
    packed = copy.deepcopy(student)
    for name, m in list(packed.named_modules()):
        if isinstance(m, RaBiTLinear):
            parent, _, child = name.rpartition(".")
            new = PackedRaBiTLinear.from_rabit(m, dtype=torch.float32, backend="reference")
            setattr(packed.get_submodule(parent), child, new)
    for name, m in student.named_modules():
        if isinstance(m, RaBiTLinear):
            for (g, B, h), (g2, B2, h2) in zip(layer_paths(m), layer_paths(packed.get_submodule(name))):
                assert torch.equal(B, B2) and torch.allclose(g, g2) and torch.allclose(h, h2)
    res = path_correlations(packed, teacher, calib)
    assert list(res) == list(ref)
    for n in ref:
        assert res[n]["corr_paths"] == pytest.approx(ref[n]["corr_paths"], abs=1e-3)
        assert res[n]["corr_residual"] == pytest.approx(ref[n]["corr_residual"], abs=1e-3)


def test_plot(tmp_path, tiny_pair):
    teacher, student, calib = tiny_pair
    res = path_correlations(student, teacher, calib)
    png = tmp_path / "c.png"
    plot_correlations(res, png, title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from rabit.data import CORPORA_DIR
    from rabit.testing import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-fp")
    make_tiny_llama(vocab_size=512).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = folder.parent / "calib.txt"
    text.write_text((CORPORA_DIR / "austen" / "emma.txt").read_text(encoding="utf-8")[:8000])
    return folder, text


def test_cli_diagnose_ptq(tiny_folder, tmp_path, monkeypatch, capsys):
    from rabit.cli import main

    folder, text = tiny_folder
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "d.json"
    rc = main(["diagnose", str(folder), "--ptq", "--calib-source", str(text), "--calib-samples", "4",
               "--calib-len", "32", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["layers"]) == 14 and doc["ptq"] and doc["teacher"] == str(folder)
    for r in doc["layers"].values():
        assert math.isfinite(r["corr_paths"]) and math.isfinite(r["corr_residual"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "Corr(y1, y2)" in capsys.readouterr().out


def test_cli_diagnose_bad_input(tiny_folder, tmp_path, capsys):
    from rabit.cli import main

    folder, _ = tiny_folder
    assert main(["diagnose", str(folder), "--json", str(tmp_path / "x.json")]) == 2
    assert "not a quantized rabit folder" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["diagnose", str(folder), "--ptq", "--calib-samples", "0"]) == 2
    assert not (tmp_path / "x.json").exists()


def test_cli_diagnose_saved_rabit_folder(tiny_folder, tmp_path, monkeypatch):
    from rabit import serialization
    from rabit.cli import main
    from rabit.models import load_model

    folder, text = tiny_folder
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(folder))
    q = quantize_(model, RaBiTConfig(precondition=False))
    saved = tmp_path / "q"
    serialization.save_quantized(q, saved, tokenizer=tok)
    out = tmp_path / "d.json"
    rc = main(["diagnose", str(saved), "--teacher", str(folder), "--calib-source", str(text),
               "--calib-samples", "2", "--calib-len", "32", "--json", str(out)])
    assert rc == 0
    assert len(json.loads(out.read_text())["layers"]) == 14


def test_cli_diagnose_rotates_the_teacher_as_the_student_was(tiny_folder, tmp_path, monkeypatch, capsys):
    """A student made from a rotated model is compared with the teacher rotated the same way (its folder records
    how), not with the plain teacher, whose layers see other inputs: with the wrong teacher every layer's error
    would be about that of unrelated weights."""
    from rabit import serialization
    from rabit.cli import main
    from rabit.models import load_model
    from rabit.rotation import ROTATION_ATTR, rotate_

    folder, text = tiny_folder
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(folder))
    rotate_(model, seed=3)
    q = quantize_(model, RaBiTConfig(precondition=False))
    saved = tmp_path / "q"
    serialization.save_quantized(q, saved, tokenizer=tok)
    assert getattr(load_model(str(saved))[0], ROTATION_ATTR) == {"seed": 3, "values": True}
    out = tmp_path / "d.json"
    rc = main(["diagnose", str(saved), "--teacher", str(folder), "--calib-source", str(text),
               "--calib-samples", "2", "--calib-len", "32", "--json", str(out)])
    assert rc == 0 and "rotated the teacher as the student's source was (seed 3, values too)" in capsys.readouterr().out
    layers = json.loads(out.read_text())["layers"]
    errs = [r["rel_err_all"] for r in (layers.values() if isinstance(layers, dict) else layers)]
    assert len(errs) == 14 and max(errs) < 0.9, errs
