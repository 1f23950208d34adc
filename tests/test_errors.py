"""No silent fallbacks: bad input is one line (exit 2), internal errors keep their traceback, and what used to be
dropped quietly (a failed ablation step, the transformers registration, generation_config / rabit_config) is
reported."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _fail_with(monkeypatch, exc):
    import rabit.cli.generate

    def run(args):
        raise exc

    monkeypatch.setattr(rabit.cli.generate, "run", run)


@pytest.mark.parametrize("exc", [ValueError("bad option"), FileNotFoundError("no such folder"),
                                 "CheckpointError", "TrainingDiverged"])
def test_input_errors_are_one_line_with_status_2(monkeypatch, capsys, exc):
    from rabit.cli import main
    from rabit.train.checkpoint import CheckpointError
    from rabit.train.trainer import TrainingDiverged

    exc = {"CheckpointError": CheckpointError("damaged checkpoint"),
           "TrainingDiverged": TrainingDiverged("loss is NaN at step 3")}.get(exc, exc)
    monkeypatch.delenv("RABIT_DEBUG", raising=False)
    _fail_with(monkeypatch, exc)
    assert main(["generate", "x", "--prompt", "p"]) == 2
    err = capsys.readouterr().err
    assert err == f"rabit generate: error: {exc}\n"


def test_internal_errors_keep_their_traceback(monkeypatch):
    from rabit.cli import main

    _fail_with(monkeypatch, RuntimeError("an internal bug"))
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["generate", "x", "--prompt", "p"])
    _fail_with(monkeypatch, KeyError("state"))
    with pytest.raises(KeyError):
        main(["generate", "x", "--prompt", "p"])


def test_internal_error_exits_1_with_a_traceback(tmp_path):
    code = textwrap.dedent("""
        import sys, rabit.cli.generate, rabit.cli
        def run(args):
            raise RuntimeError("an internal bug")
        rabit.cli.generate.run = run
        sys.exit(rabit.cli.main(["generate", "x", "--prompt", "p"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=SRC))
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: an internal bug" in r.stderr


def test_ablation_fails_when_an_evaluation_step_fails(tmp_path, monkeypatch, capsys):
    """A cell whose diagnosis subprocess failed makes `rabit ablate` fail, naming the cell and the step."""
    from rabit.cli import ablate as cli_ablate
    from rabit.cli import main

    def fake_run(cmd, log, env=None):
        log.write_text("")
        sub = cmd[3]
        if sub == "quantize":
            cell = Path(cmd[cmd.index("--out") + 1])
            (cell / "quantized").mkdir(parents=True)
            (cell / "summary.json").write_text(json.dumps({"eval": {"fp": 10.0, "init": 50.0, "final": 20.0},
                                                           "train": {"tokens": 64}}))
            return 0
        if sub == "eval":
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"tasks": {"piqa": {"acc": 0.5}}}))
            return 0
        return 3   # diagnose fails

    monkeypatch.setattr(cli_ablate, "_run", fake_run)
    rc = main(["ablate", "--model", "m", "--modes", "coupled,frozen", "--inits", "svid", "--tokens", "2048",
               "--out-dir", str(tmp_path / "abl")])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "coupled/svid: rabit diagnose exited with status 3" in captured.err
    assert "frozen/svid: rabit diagnose exited with status 3" in captured.err
    # the table is still written, with what did finish
    assert "| coupled | svid | 50.00 | 20.00 |" in (tmp_path / "abl" / "ablation.md").read_text()


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    from rabit import RaBiTConfig, quantize_
    from rabit.serialization import save_quantized

    model = make_tiny_llama()
    quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0))
    model.rabit_config = RaBiTConfig(precondition=False, init="svid", isvid_rounds=0)
    folder = tmp_path_factory.mktemp("saved") / "m"
    save_quantized(model, folder)
    return model, folder


def test_unsaved_generation_config_and_unreadable_rabit_config_are_reported(saved_folder, tmp_path):
    from rabit.serialization import load_quantized, save_quantized

    model, folder = saved_folder
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["rabit_config"]["init"] == "svid"

    class BrokenGenerationConfig:
        def save_pretrained(self, path):
            raise ValueError("temperature is set but do_sample is False")

    good = model.generation_config
    model.generation_config = BrokenGenerationConfig()
    try:
        with pytest.warns(RuntimeWarning, match="generation_config.json was not saved .*do_sample"):
            save_quantized(model, tmp_path / "g")
    finally:
        model.generation_config = good
    assert not (tmp_path / "g" / "generation_config.json").exists()

    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["rabit_config"]["not_a_field"] = 1
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(RuntimeWarning, match="rabit_config of this folder cannot be read .*not_a_field"):
        loaded = load_quantized(bad, verify=False)  # edited on purpose: its checksums no longer match
    assert getattr(loaded, "rabit_config", None) is None
    assert load_quantized(folder).rabit_config.init == "svid"


def test_failed_registration_with_transformers_is_reported(saved_folder):
    _, folder = saved_folder
    code = textwrap.dedent(f"""
        import sys, warnings
        import rabit
        from rabit import hf_integration as h
        assert "transformers.quantizers.auto" not in sys.modules and not h._registered
        def incompatible():
            raise TypeError("quantizer API changed")
        h._build_classes = incompatible
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import transformers.quantizers.auto
        msgs = [str(m.message) for m in w if "could not register" in str(m.message)]
        assert len(msgs) == 1 and "quantizer API changed" in msgs[0], [str(m.message) for m in w]
        try:
            rabit.load_quantized({str(folder)!r})
        except RuntimeError as e:
            assert "could not register" in str(e) and "quantizer API changed" in str(e), e
        else:
            raise AssertionError("loading should fail")
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=SRC))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]

