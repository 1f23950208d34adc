"""Checksums of saved folders and checkpoints: corruption fuzzing, `rabit verify`, folders without checksums.

Every corruption must end in a clear error naming the damaged file (never a crash, a hang, or a model that
differs from the saved one); the only corruptions allowed to load are those that change nothing (a flipped
byte of JSON whitespace that stays whitespace), and then the model must equal the saved one exactly.
"""
import json
import logging
import random
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rabit import RaBiTConfig, quantize_
from rabit.integrity import IntegrityError, read_layout, verify_model_folder
from rabit.integrity_checkpoints import check_dcp_folder, dcp_checksums, verify_path
from rabit.serialization import load_quantized, save_quantized
from rabit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

SEED = 15
CASES_PER_KIND = 4


@contextmanager
def no_hang(seconds=30):
    def fail(*_):
        raise TimeoutError(f"hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _quantized(seed=0, hidden=32):
    model = make_tiny_llama(seed=seed, hidden=hidden)
    quantize_(model, RaBiTConfig(precondition=False, init="naive"))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from rabit.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("integrity")
    path = save_quantized(_quantized(), root / "m", tokenizer=tiny_tokenizer())
    other = save_quantized(_quantized(seed=1), root / "other")   # same shapes, other weights
    wider = save_quantized(_quantized(seed=2, hidden=48), root / "wider")
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg["rms_norm_eps"] != 1e-5 else 1e-6   # another model of the same shapes
    (other / "config.json").write_text(json.dumps(cfg, indent=2))
    reference = {k: v.clone() for k, v in load_quantized(path).state_dict().items()}
    return {"path": path, "reference": reference, "other": other, "wider": wider}


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _flip(file: Path, pos: int, rng: random.Random) -> None:
    data = bytearray(file.read_bytes())
    data[pos] ^= rng.randrange(1, 256)
    file.write_bytes(bytes(data))


def _header_len(file: Path) -> int:
    return 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


def _set_header(file: Path, edit) -> None:
    """Rewrite a safetensors header through `edit(header dict)`, keeping the data bytes."""
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _corruptions(saved, rng):
    """(name, function(folder) -> name of the damaged file) for every kind of damage, seeded."""
    weights = saved["path"] / "model.safetensors"
    size, head = weights.stat().st_size, _header_len(weights)
    cases = []
    for i in range(CASES_PER_KIND):
        cut = rng.randrange(0, size)
        cases.append((f"truncate weights at {cut}", lambda p, cut=cut: (
            (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:cut]), "model.safetensors")[1]))
        pos, seed = rng.randrange(0, head), rng.randrange(1 << 30)
        cases.append((f"flip header byte {pos}", lambda p, pos=pos, seed=seed: (
            _flip(p / "model.safetensors", pos, random.Random(seed)), "model.safetensors")[1]))
        pos, seed = rng.randrange(head, size), rng.randrange(1 << 30)
        cases.append((f"flip data byte {pos}", lambda p, pos=pos, seed=seed: (
            _flip(p / "model.safetensors", pos, random.Random(seed)), "model.safetensors")[1]))
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        n = (saved["path"] / name).stat().st_size
        for _ in range(2):
            pos, seed, cut = rng.randrange(0, n), rng.randrange(1 << 30), rng.randrange(0, n)
            cases.append((f"flip {name} byte {pos}", lambda p, name=name, pos=pos, seed=seed: (
                _flip(p / name, pos, random.Random(seed)), name)[1]))
            cases.append((f"truncate {name} at {cut}", lambda p, name=name, cut=cut: (
                (p / name).write_bytes((p / name).read_bytes()[:cut]), name)[1]))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        cases.append((f"missing {name}", lambda p, name=name: ((p / name).unlink(), name)[1]))
    for name, body in (("model.safetensors.index.json", b'{"weight_map": {}}'), ("pytorch_model.bin", b"x"),
                       ("vocab.txt", b"a\nb\n")):
        cases.append((f"extra {name}", lambda p, name=name, body=body: ((p / name).write_bytes(body), name)[1]))

    def wrong_shape(p):   # the shape of one tensor changed, byte count and JSON still consistent
        def edit(h):
            k = "model.layers.0.self_attn.q_proj.g"
            h[k]["shape"] = h[k]["shape"][::-1]
        _set_header(p / "model.safetensors", edit)
        return "model.safetensors"

    def impossible_shape(p):   # a shape that does not fit the tensor's bytes
        _set_header(p / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=[31]))
        return "model.safetensors"

    def no_record(p):   # the checksum record removed from the header (config.json still declares it)
        _set_header(p / "model.safetensors", lambda h: h["__metadata__"].pop("rabit_checksums"))
        return "model.safetensors"

    def damaged_record(p):
        def edit(h):
            rec = json.loads(h["__metadata__"]["rabit_checksums"])
            k = "model.layers.1.mlp.up_proj.packed"
            rec["tensors"][k][2] = "0" * len(rec["tensors"][k][2])
            h["__metadata__"]["rabit_checksums"] = json.dumps(rec)
        _set_header(p / "model.safetensors", edit)
        return "model.safetensors"

    cases += [("wrong shape in header", wrong_shape), ("shape that does not fit its bytes", impossible_shape),
              ("checksum record removed", no_record), ("checksum record altered", damaged_record)]
    for other in ("other", "wider"):
        cases.append((f"config.json of another model ({other})", lambda p, other=other: (
            shutil.copy(saved[other] / "config.json", p / "config.json"), "config.json")[1]))
        cases.append((f"weights of another model ({other})", lambda p, other=other: (
            shutil.copy(saved[other] / "model.safetensors", p / "model.safetensors"), "config.json")[1]))
    return cases


def _equal_to_reference(model, reference) -> bool:
    state = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_every_corruption_of_a_saved_folder_is_refused_or_harmless(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    rng = random.Random(SEED)
    cases = _corruptions(saved, rng)
    assert len(cases) >= 35
    harmless = []
    for i, (desc, corrupt) in enumerate(cases):
        path = _copy(saved["path"], tmp_path, f"case{i}")
        damaged = corrupt(path)
        loaders = [load_quantized] + ([AutoModelForCausalLM.from_pretrained] if i % 8 == 0 else [])
        for load in loaders:
            try:
                with no_hang():
                    model = load(path)
            except (ValueError, OSError) as e:   # IntegrityError is a ValueError; FileNotFoundError an OSError
                msg = str(e)
                # weights of another model are caught through the files their record names
                assert damaged in msg or "model.safetensors" in msg, f"{desc}: error does not name {damaged}: {msg}"
                assert "Traceback" not in msg
                continue
            # loaded: only acceptable when nothing that matters changed
            assert _equal_to_reference(model, saved["reference"]), f"{desc}: loaded a different model silently"
            harmless.append(desc)
        if not verify_model_folder(path).problems:
            assert desc in harmless, f"{desc}: rabit verify found nothing"
        shutil.rmtree(path)
    # harmless means a header byte that stayed JSON whitespace: rare
    assert len(harmless) <= 2, harmless


def test_flipped_tensor_byte_names_the_tensor_and_no_verify_loads_it(saved, tmp_path):
    path = _copy(saved["path"], tmp_path, "c")
    layout = read_layout(path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.packed"
    start = layout.data_start + layout.header[name]["data_offsets"][0]
    _flip(path / "model.safetensors", start + 3, random.Random(0))
    with pytest.raises(IntegrityError, match=rf"model.safetensors: tensor '{name}': .*--no-verify"):
        load_quantized(path)
    model = load_quantized(path, verify=False)   # what a user who insists gets: the damaged model
    assert not torch.equal(model.state_dict()[name], saved["reference"][name])


def test_folder_without_checksums_loads_with_a_one_line_notice(saved, tmp_path, caplog):
    path = _copy(saved["path"], tmp_path, "old")
    _set_header(path / "model.safetensors", lambda h: h["__metadata__"].pop("rabit_checksums"))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["checksums"]
    (path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="rabit"):
        model = load_quantized(path)
    assert _equal_to_reference(model, saved["reference"])
    notices = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    report = verify_model_folder(path)
    assert report.ok and not report.verified


def test_docs_added_to_a_folder_are_not_errors(saved, tmp_path):
    path = _copy(saved["path"], tmp_path, "docs")
    (path / "README.md").write_text("# my model\n")
    assert _equal_to_reference(load_quantized(path), saved["reference"])


# ---------------------------------------------------------------------------------------------- checkpoints
def _file_cases(src, names, rng):
    """(damaged file, corrupt(folder)): truncations and byte flips at random points, and the file missing."""
    cases = []
    for name in names:
        n = (src / name).stat().st_size
        for _ in range(CASES_PER_KIND):
            cut, pos, seed = rng.randrange(0, n), rng.randrange(0, n), rng.randrange(1 << 30)
            cases.append((name, lambda p, name=name, cut=cut: (p / name).write_bytes((p / name).read_bytes()[:cut])))
            cases.append((name, lambda p, name=name, pos=pos, seed=seed: _flip(p / name, pos, random.Random(seed))))
        cases.append((name, lambda p, name=name: (p / name).unlink()))
    return cases


def _checkpoint(run_dir):
    torch.manual_seed(0)
    model = {"w": torch.randn(16, 8), "b": torch.randn(8).to(torch.bfloat16), "n": torch.arange(5)}
    optim = {"adam.state.0.exp_avg": torch.randn(16, 8)}
    return save_checkpoint(run_dir, 3, model, optim, {"config": {}}), model


def test_every_corruption_of_a_checkpoint_is_refused(tmp_path):
    rng = random.Random(SEED)
    src, model = _checkpoint(tmp_path / "src")
    assert torch.equal(load_checkpoint(src).model["w"], model["w"])
    cases = _file_cases(src, ("model.safetensors", "optim.safetensors", "state.json"), rng)
    cases.append(("stray.safetensors", lambda p: (p / "stray.safetensors").write_bytes(b"x")))
    for i, (name, corrupt) in enumerate(cases):
        path = tmp_path / f"run{i}" / "checkpoints" / src.name
        shutil.copytree(src, path)
        corrupt(path)
        with no_hang(), pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert name in str(e.value) or "state.json" in str(e.value), str(e.value)
        assert not verify_path(path)[0].ok


def test_every_corruption_of_a_fixed_tensor_file_is_refused(tmp_path):
    """The tensors that do not train sit beside the checkpoints in one shared file, named by state.json."""
    from rabit.train.checkpoint import FixedTensors, rng_state

    rng = random.Random(SEED)
    torch.manual_seed(0)
    model = {"w": torch.randn(16, 8), "e": torch.randn(32, 8)}
    src = save_checkpoint(tmp_path / "src", 3, model, {}, {"config": {}}, fixed=FixedTensors({"e"}))
    fixed = next(src.parent.glob("fixed-*.safetensors")).name
    assert torch.equal(load_checkpoint(src).model["e"], model["e"])
    (report,) = verify_path(src)
    # three files (model, optimizer + RNG, the fixed file): w, the RNG states, e
    assert report.ok and report.files == 3 and report.tensors == 2 + len(rng_state()[0])
    for i, (name, corrupt) in enumerate(_file_cases(src.parent, (fixed,), rng)):
        root = tmp_path / f"run{i}" / "checkpoints"
        shutil.copytree(src.parent, root)
        corrupt(root)
        with no_hang(), pytest.raises(CheckpointError) as e:
            load_checkpoint(root / src.name)
        assert fixed in str(e.value), str(e.value)
        assert not verify_path(root / src.name)[0].ok


def test_checkpoint_mismatch_names_the_tensor(tmp_path):
    path, _ = _checkpoint(tmp_path)
    layout = read_layout(path / "model.safetensors")
    _flip(path / "model.safetensors", layout.data_start + layout.header["w"]["data_offsets"][0] + 5,
          random.Random(1))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt: .*damaged tensor: w\).*--overwrite"):
        load_checkpoint(path)
    load_checkpoint(path, verify=False)   # sizes and structure still pass; the user asked for no checksums


def _dcp_checkpoint(path: Path, with_checksums=True) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "assuming the intent is to save in a single process"
        dcp.save({"model": {"w": torch.randn(32, 16), "b": torch.randn(16)}}, checkpoint_id=str(path))
    state = {"format": "rabit-dcp-checkpoint", "version": 1, "step": 2}
    if with_checksums:
        state["checksums"] = dcp_checksums(path)
    (path / "state.json").write_text(json.dumps(state))
    return path


def test_every_corruption_of_a_dcp_checkpoint_is_refused(tmp_path, caplog):
    rng = random.Random(SEED)
    src = _dcp_checkpoint(tmp_path / "src")
    check_dcp_folder(src)
    files = sorted(p.name for p in src.iterdir() if p.name != "state.json")
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    cases = _file_cases(src, files, rng)
    cases.append(("__9_0.distcp", lambda p: (p / "__9_0.distcp").write_bytes(b"x")))
    cases.append(("state.json", lambda p: (p / "state.json").write_text("{")))
    for i, (name, corrupt) in enumerate(cases):
        path = tmp_path / f"c{i}"
        shutil.copytree(src, path)
        corrupt(path)
        with no_hang(), pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            check_dcp_folder(path)
    old = _dcp_checkpoint(tmp_path / "old", with_checksums=False)
    with caplog.at_level(logging.WARNING, logger="rabit"):
        check_dcp_folder(old)
    assert any("before checksums existed" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------------- rabit verify
def test_rabit_verify_cli(saved, tmp_path, capsys):
    from rabit.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ck, _ = _checkpoint(run)
    shutil.copytree(saved["path"], run / "quantized")
    (run / "run.json").write_text("{}")
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("INTACT") == 2 and "step-000003" in out and "quantized" in out

    _flip(run / "quantized" / "tokenizer.json", 10, random.Random(2))
    assert main(["verify", str(run), str(saved["path"])]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "tokenizer.json" in out and out.count("INTACT") == 2

    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().out
