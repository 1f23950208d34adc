"""Atomic writers: a failed write leaves the previous file and no temporary file behind."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rabit.atomic_io import atomic_path, atomic_save_safetensors, atomic_write_json


def test_failed_safetensors_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "w.safetensors"
    atomic_save_safetensors({"a": torch.arange(6.0)}, p, metadata={"v": "1"})
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):
        # safetensors refuses two names for one storage; the error comes mid-write, after the temp file exists
        atomic_save_safetensors({"a": shared, "b": shared}, p)
    assert torch.equal(load_file(p)["a"], torch.arange(6.0))
    assert [q.name for q in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_path_replaces_only_on_success(tmp_path):
    p = tmp_path / "plot.png"
    p.write_bytes(b"old")
    with pytest.raises(KeyError):
        with atomic_path(p, suffix=".png") as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != p
            tmp.write_bytes(b"half")
            raise KeyError("writer failed")
    assert p.read_bytes() == b"old"
    with atomic_path(p) as tmp:
        tmp.write_bytes(b"new")
    assert p.read_bytes() == b"new"
    assert [q.name for q in tmp_path.iterdir()] == ["plot.png"]


def test_json_options(tmp_path):
    p = tmp_path / "sub" / "r.json"   # missing folders are created
    atomic_write_json(p, {"b": float("nan"), "a": 1}, allow_nan=True, sort_keys=False)
    assert list(json.loads(p.read_text())) == ["b", "a"]
    assert math.isnan(json.loads(p.read_text())["b"])
