"""benchmarks/gpu_check.py: the CPU dry run (so the GPU command cannot rot) and, on a GPU, its device checks."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_every_section(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    secs = report["sections"]
    assert report["dry"] and set(secs) == {"triton", "gemv", "decode", "train"}
    assert not [n for n, s in secs.items() if "error" in s]
    try:
        import triton  # noqa: F401
        assert secs["triton"]["ok"] and secs["triton"]["cases"] >= 10
    except ImportError:
        assert secs["triton"]["skipped"] == "triton is not installed"
    rows = secs["gemv"]["rows"]
    assert [(r["out"], r["in"]) for r in rows] == [(64, 96), (100, 33)]
    assert all(r["packed_us"] > 0 and r["fp16_linear_us"] > 0 for r in rows) and secs["gemv"]["copy_GBps"] > 0
    for w in ("fp16", "2bit"):
        assert secs["decode"][w]["eager"]["tokens_per_s"] > 0
        assert "graph" not in secs["decode"][w]  # CUDA graphs: on a GPU only
    assert secs["decode"]["speedup_2bit_vs_fp16"] == pytest.approx(
        secs["decode"]["2bit"]["eager"]["tokens_per_s"] / secs["decode"]["fp16"]["eager"]["tokens_per_s"])
    assert secs["train"]["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(secs["train"]["final_loss"]))
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| out x in |" in md and "2-bit vs fp16" in md and "tokens/s" in md
    assert "random weights" not in md or secs["train"]["weights"] == "random"


def test_unknown_section_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        _module().main(["--dry", "--out", str(tmp_path), "--sections", "gemv,warp"])
    assert e.value.code == 2


@pytest.mark.cuda
def test_triton_kernels_match_reference_on_device():
    res = _module().check_triton(torch.device("cuda"), dry=False)
    assert "skipped" not in res, res
    assert res["ok"], res["failures"]


@pytest.mark.cuda
def test_device_sections_run(tmp_path):
    assert _module().main(["--out", str(tmp_path), "--sections", "triton,gemv"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["gemv"]["rows"][-1]["out"] == 8192


@pytest.mark.cuda
def test_graph_decoding_matches_eager_on_device():
    """The CUDA-graph replay of the one-token step gives the eager step's tokens (fp16, tiny Llama)."""
    from transformers import LlamaForCausalLM

    from rabit.generate import decode_tokens, make_decoder

    mod = _module()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(mod.llama_config(True)).to(torch.float16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    eager = decode_tokens(make_decoder(model, 40), ids, 24).tokens
    graph_decoder = make_decoder(model, 40, cuda_graph=True)
    assert decode_tokens(graph_decoder, ids, 24).tokens == eager
    assert decode_tokens(graph_decoder, ids, 24).tokens == eager  # replayed after a reset
