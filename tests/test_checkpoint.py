"""Checkpoints: round trip, detection of damaged files, and resume after SIGKILL giving the same losses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rabit import RaBiTConfig
from rabit.layer import RaBiTLinear
from rabit.train import CheckpointError, OptimConfig, Trainer, TrainConfig, make_student
from rabit.train.checkpoint import (FixedTensors, atomic_write_json, latest_checkpoint, load_checkpoint,
                                    save_checkpoint, verify_checkpoint)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows(n=8, seq=16, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def make_trainer(run_dir, steps=6, mode="coupled", step_callback=None, train_latents=True):
    teacher = make_tiny_llama()
    student = make_student(teacher, RaBiTConfig(mode=mode, precondition=False))
    cfg = TrainConfig(steps=steps, grad_accum=2, autocast=False, save_every=3, seed=3, train_latents=train_latents,
                      optim=OptimConfig(latent_lr=1e-3, scale_lr=1e-2, warmup_steps=2))
    return Trainer(teacher, student, rows(), cfg, run_dir, progress=False, step_callback=step_callback)


class Crash(Exception):
    pass


def crash_at(n):
    def callback(trainer, step):
        if step == n:
            raise Crash(step)
    return callback


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode,train_latents", [("coupled", True), ("frozen", True), ("coupled", False)])
def test_in_process_resume_is_exact(tmp_path, mode, train_latents):
    full = make_trainer(tmp_path / "a", mode=mode, train_latents=train_latents)
    full.train()
    # a second run crashes in step 5 (checkpoint at 3, steps 1-4 logged), then a fresh trainer continues
    part = make_trainer(tmp_path / "b", mode=mode, step_callback=crash_at(5), train_latents=train_latents)
    with pytest.raises(Crash):
        part.train()
    assert len(losses(tmp_path / "b")) == 4
    resumed = make_trainer(tmp_path / "b", mode=mode, train_latents=train_latents)
    assert resumed.resume() and resumed.step == 3
    assert len(losses(tmp_path / "b")) == 3
    resumed.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_round_trip_and_rotation(tmp_path):
    tr = make_trainer(tmp_path)
    tr.train()
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 6 and ck.state["data"]["index"] == 4  # 6 steps x 2 micro-batches of 1 row over 8 rows
    assert ck.state["scheduler"]["step"] == 6
    for k, v in tr.student.state_dict().items():
        assert torch.equal(ck.model[k], v), k
    # only the newest checkpoint is kept, no temporary folders are left behind; the tensors that do not train
    # (here the embedding) sit in one shared file, which the checkpoint names
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [ck.state["fixed"]["name"], "latest", "step-000006"]
    # JSON only, no pickle anywhere
    for p in (tmp_path / "checkpoints").rglob("*"):
        if p.is_file():
            assert p.suffix in (".json", ".safetensors") or p.name == "latest"


def test_tied_weights_are_saved_once(tmp_path):
    w = torch.randn(4, 3)
    save_checkpoint(tmp_path, 1, {"a": w, "b": w, "c": torch.ones(2)}, {}, {"x": 1})
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(ck.model["a"], w) and torch.equal(ck.model["b"], w)
    from safetensors import safe_open

    with safe_open(str(ck.path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a", "c"]


def tensor_names(f):
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        return set(h.keys())


def test_frozen_latents_are_written_once(tmp_path, monkeypatch):
    import rabit.train.checkpoint as checkpoint

    tr = make_trainer(tmp_path, steps=9, train_latents=False)
    writes = []
    original = checkpoint._write_safetensors

    def counting(path, tensors, metadata):
        writes.append(metadata.get("part", path.name))
        return original(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "_write_safetensors", counting)
    tr.train()   # checkpoints at steps 3, 6, 9: three model and optimizer files, one fixed-tensor file
    assert sorted(writes) == ["fixed"] + ["model.safetensors"] * 3 + ["optim.safetensors"] * 3
    ck = latest_checkpoint(tmp_path)
    state = verify_checkpoint(ck)
    latents = {f"{n}.{p}" for n, m in tr.student.named_modules() if isinstance(m, RaBiTLinear)
               for p, q in m.named_parameters(recurse=False) if any(q is x for x in m.latent_parameters())}
    assert latents and not any(tr.student.get_parameter(n).requires_grad for n in latents)
    fixed = tensor_names(ck.parent / state["fixed"]["name"])
    moving = tensor_names(ck / "model.safetensors")
    assert latents <= fixed and not (fixed & moving)
    assert all(tr.student.get_parameter(n).requires_grad for n in moving if n in dict(tr.student.named_parameters()))
    # the per-step file holds scales and norms only (even in this tiny model, under a third of the fixed bytes)
    assert (ck / "model.safetensors").stat().st_size < 0.3 * (ck.parent / state["fixed"]["name"]).stat().st_size
    loaded = load_checkpoint(ck)
    for k, v in tr.student.state_dict().items():
        assert torch.equal(loaded.model[k], v), k


def test_changed_fixed_tensors_are_written_again(tmp_path):
    w, e = torch.randn(4, 3), torch.randn(5, 2)
    fixed = FixedTensors({"e"})
    save_checkpoint(tmp_path, 1, {"w": w, "e": e}, {}, {}, fixed=fixed)
    first = fixed.record["name"]
    save_checkpoint(tmp_path, 2, {"w": w, "e": e}, {}, {}, fixed=fixed)
    assert fixed.record["name"] == first
    e.add_(1.0)   # an in-place change: a new file, the old one removed with the checkpoint that named it
    save_checkpoint(tmp_path, 3, {"w": w, "e": e}, {}, {}, fixed=fixed)
    assert fixed.record["name"] != first
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [fixed.record["name"], "latest", "step-000003"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(ck.model["e"], e) and torch.equal(ck.model["w"], w)
    # with keep=2 the older checkpoint keeps its own file
    e.mul_(2.0)
    save_checkpoint(tmp_path, 4, {"w": w, "e": e}, {}, {}, keep=2, fixed=fixed)
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("fixed-*"))
    assert len(files) == 2
    old = load_checkpoint(tmp_path / "checkpoints" / "step-000003")
    assert torch.equal(old.model["e"], e / 2.0)


def test_damaged_or_missing_fixed_tensors_are_detected(tmp_path):
    tr = make_trainer(tmp_path, steps=3, train_latents=False)
    tr.train()
    ck = latest_checkpoint(tmp_path)
    f = ck.parent / verify_checkpoint(ck)["fixed"]["name"]
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fixed-.*corrupt: SHA-256"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="SHA-256"):
        make_trainer(tmp_path, steps=3, train_latents=False).resume()
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(ck, checksums=False)
    f.unlink()
    with pytest.raises(CheckpointError, match="fixed tensors .* are missing"):
        load_checkpoint(ck, verify=False)


def test_version_1_checkpoints_still_load(tmp_path):
    w = torch.randn(4, 3)
    save_checkpoint(tmp_path, 1, {"w": w}, {}, {"x": 1})   # no fixed tensors: what version 1 wrote
    ck = latest_checkpoint(tmp_path)
    state = json.loads((ck / "state.json").read_text())
    state["version"] = 1
    (ck / "state.json").write_text(json.dumps(state))
    assert torch.equal(load_checkpoint(ck).model["w"], w)
    state["version"] = 3
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="version 3"):
        load_checkpoint(ck)


@pytest.fixture
def saved(tmp_path):
    tr = make_trainer(tmp_path, steps=3)
    tr.train()
    return tmp_path, latest_checkpoint(tmp_path)


def test_truncated_safetensors_is_detected(saved):
    run, ck = saved
    f = ck / "optim.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ck)
    tr = make_trainer(run, steps=3)
    with pytest.raises(CheckpointError, match="optim.safetensors"):
        tr.resume()


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_bytes_are_detected(saved, where):
    _, ck = saved
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    pos = len(data) - 10 if where == "data" else 20
    data[pos] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ck)


def test_missing_or_corrupt_json_is_detected(saved):
    run, ck = saved
    state = ck / "state.json"
    text = state.read_text()
    state.unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        verify_checkpoint(ck)
    state.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="invalid JSON"):
        verify_checkpoint(ck)
    state.write_text(text)
    verify_checkpoint(ck)
    (run / "checkpoints" / "latest").write_text("{not json")
    with pytest.raises(CheckpointError, match="pointer"):
        latest_checkpoint(run)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match="no 'latest' pointer"):
        latest_checkpoint(run)


def test_resume_with_different_settings_is_refused(saved):
    run, _ = saved
    tr = make_trainer(run, steps=5)
    with pytest.raises(CheckpointError, match="steps"):
        tr.resume()


def test_atomic_write_leaves_no_partial_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(p, {"a": float("nan")})  # refused before anything is replaced
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------------- SIGKILL, then --resume
@pytest.fixture(scope="module")
def kill_files(tmp_path_factory):
    from rabit.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("kill")
    make_tiny_llama(vocab_size=512, hidden=64, intermediate=128).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    corpora = Path(__file__).resolve().parents[1] / "src" / "rabit" / "corpora" / "austen"
    (root / "train.txt").write_text((corpora / "emma.txt").read_text(encoding="utf-8")[:30000], encoding="utf-8")
    (root / "eval.txt").write_text((corpora / "persuasion.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return root


STEPS = 120


def quantize_cmd(files, out, *extra):
    return [sys.executable, "-m", "rabit", "quantize", "--model", str(files / "model"), "--out", str(out),
            "--train-data", str(files / "train.txt"), "--eval-data", str(files / "eval.txt"),
            "--eval-seq-len", "64", "--eval-windows", "1", "--seq-len", "32", "--tokens", str(32 * 2 * STEPS),
            "--grad-accum", "2", "--save-every", "7", "--calib-samples", "2", "--calib-len", "32",
            "--val-sequences", "0", "--skip-init-eval", "--train-latents", "--latent-lr", "1e-3", "--scale-lr", "1e-2",
            "--no-progress", "--threads", "1", *extra]


def read_log(out):
    p = Path(out) / "log.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def test_resume_after_sigkill_gives_the_same_losses(kill_files, tmp_path):
    env = dict(os.environ, RABIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # the run to be killed first (it also warms the token cache), then the uninterrupted reference
    proc = subprocess.Popen(quantize_cmd(kill_files, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(read_log(killed)) >= 25 and (killed / "checkpoints" / "latest").exists():
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    logged_at_kill = len(read_log(killed))
    saved_at_kill = json.loads((killed / "checkpoints" / "latest").read_text())["step"]
    assert 0 < saved_at_kill <= logged_at_kill < STEPS
    assert not (killed / "summary.json").exists()

    r = subprocess.run(quantize_cmd(kill_files, killed, "--resume"), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed at step {saved_at_kill}" in r.stderr
    r = subprocess.run(quantize_cmd(kill_files, ref), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = read_log(ref), read_log(killed)
    assert [x["step"] for x in a] == list(range(1, STEPS + 1))
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("loss", "kl", "mse"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=0), (x["step"], key, x[key], y[key])
    # and the saved models are identical
    from safetensors.torch import load_file

    ma, mb = load_file(str(ref / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_cli_reports_a_corrupt_checkpoint_on_resume(kill_files, tmp_path, monkeypatch, capsys):
    from rabit.cli import main

    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [str(a) for a in quantize_cmd(kill_files, out)[3:]]
    args[args.index("--tokens") + 1] = "256"
    assert main(args) == 0
    ck = latest_checkpoint(out)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "model.safetensors" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
