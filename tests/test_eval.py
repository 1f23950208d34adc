"""rabit eval: the PIQA scorer, the correlation helper, lm-eval integration and the CLI on a tiny random model."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from conftest import make_tiny_llama
from rabit.eval.correlation import PearsonAccumulator, pearson
from rabit.eval.piqa import load_piqa, requests_for, score_items


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """lm-eval / datasets must never try the network in these tests."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # restored afterwards, also when `rabit eval --offline` sets them
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------------------------------- correlation
def test_pearson_plus_minus_one_and_zero():
    a = torch.randn(64, 16, dtype=torch.float64)
    assert pearson(a, 3 * a + 7) == pytest.approx(1.0, abs=1e-12)
    assert pearson(a, -0.5 * a + 2) == pytest.approx(-1.0, abs=1e-12)
    x = torch.tensor([1.0, -1.0, 1.0, -1.0])
    y = torch.tensor([1.0, 1.0, -1.0, -1.0])  # orthogonal, both zero-mean
    assert pearson(x, y) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(pearson(x, torch.ones(4)))  # constant side: undefined


def test_pearson_streaming_matches_exact():
    torch.manual_seed(0)
    a = torch.randn(1000) + 1e4  # a large offset must not cost precision
    b = 0.3 * a + torch.randn(1000)
    acc = PearsonAccumulator()
    for ca, cb in zip(a.split(137), b.split(137)):
        acc.add(ca, cb)
    ref = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()
    assert acc.value == pytest.approx(ref, abs=1e-9)
    assert acc.n == 1000


# ------------------------------------------------------------------------------------------------- PIQA
def test_piqa_local_data():
    items = load_piqa()
    assert len(items) == 1838
    assert {it["label"] for it in items} == {0, 1}
    assert set(items[0]) == {"goal", "sol1", "sol2", "label"}
    assert len(load_piqa(limit=5)) == 5
    with pytest.raises(ValueError):
        load_piqa(limit=0)


def test_piqa_scorer_acc_and_acc_norm():
    # A fake model: log p(continuation) = -(number of characters). acc prefers the shorter choice;
    # acc_norm divides by len(choice) (lm-eval): -(len + 1) / len = -1 - 1/len, which prefers the longer one.
    seen = []

    def loglikelihood(reqs):
        seen.extend(reqs)
        return [-float(len(cont)) for _ctx, cont in reqs]

    items = [
        dict(goal="g1", sol1="short", sol2="a much longer answer", label=0),  # acc right, acc_norm wrong
        dict(goal="g2", sol1="short", sol2="a much longer answer", label=1),  # acc wrong, acc_norm right
        dict(goal="g3", sol1="a long long answer", sol2="tiny", label=1),  # acc right, acc_norm wrong
        dict(goal="g4", sol1="a long long answer", sol2="tiny", label=1),  # acc right, acc_norm wrong
    ]
    res = score_items(items, loglikelihood)
    assert res["predictions"] == [0, 0, 1, 1]
    assert res["acc"] == pytest.approx(0.75)
    assert res["acc_norm"] == pytest.approx(0.25)
    assert res["n"] == 4
    assert res["acc_stderr"] == pytest.approx(0.25)  # sample std 0.5 / sqrt(4)
    # lm-eval's prompt: context "Question: {goal}\nAnswer:", continuation " " + choice.
    assert seen[0] == ("Question: g1\nAnswer:", " short")
    assert seen[1] == ("Question: g1\nAnswer:", " a much longer answer")
    assert requests_for(items[2])[1] == ("Question: g3\nAnswer:", " tiny")


def test_piqa_scorer_ties_and_bad_input():
    items = [dict(goal="g", sol1="ab", sol2="cd", label=1)]
    res = score_items(items, lambda reqs: [-1.0, -1.0])
    assert res["predictions"] == [0] and res["acc"] == 0.0  # ties go to the first choice, as numpy.argmax
    with pytest.raises(ValueError):
        score_items(items, lambda reqs: [-1.0])
    with pytest.raises(ValueError):
        score_items([], lambda reqs: [])


@pytest.fixture(scope="module")
def tiny_lm():
    from rabit.testing import tiny_tokenizer

    return make_tiny_llama(vocab_size=512, layers=1), tiny_tokenizer()


def test_native_loglikelihood_matches_lm_eval(tiny_lm):
    """Our own PIQA log-likelihoods equal lm-eval HFLM's on the same model (same tokenization protocol)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from rabit.eval.piqa import model_loglikelihood

    model, tok = tiny_lm
    reqs = [r for it in load_piqa(limit=3) for r in requests_for(it)]
    ours = model_loglikelihood(model, tok, batch_size=4)(reqs)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]
    theirs = [ll for ll, _greedy in lm.loglikelihood(inst, disable_tqdm=True)]
    assert ours == pytest.approx(theirs, abs=1e-4)


# ------------------------------------------------------------------------------------------- task checks
def test_unknown_and_unreachable_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    from rabit.eval.zeroshot import TaskDataError, check_tasks, make_task_manager, prepare_tasks

    tm = make_task_manager(["piqa"])  # local tasks only: fast
    assert check_tasks(["piqa"], tm) == ["piqa"]
    with pytest.raises(ValueError, match="unknown lm-eval task.*piqaa.*did you mean piqa"):
        check_tasks(["piqaa"], tm)
    # A task whose data is not reachable: a clear TaskDataError (a RuntimeError) naming it.
    (tmp_path / "gone.yaml").write_text(
        "task: rabit_gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tmp_path / 'missing.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: 0\ndoc_to_choice: ['a', 'b']\nmetric_list:\n  - metric: acc\n")
    with pytest.raises(TaskDataError, match="rabit_gone"):
        prepare_tasks(["rabit_gone"], include_paths=[str(tmp_path)])
    with pytest.raises(ValueError, match="native backend only evaluates piqa"):
        prepare_tasks(["arc_easy"], backend="native")


# --------------------------------------------------------------------------------------------------- CLI
def _folder_digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_lm):
    model, tok = tiny_lm
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = (folder.parent / "small.txt")
    from rabit.data import CORPORA_DIR

    text.write_text((CORPORA_DIR / "austen" / "persuasion.txt").read_text(encoding="utf-8")[:6000])
    return folder, text


def test_cli_eval_tiny_model(tiny_folder, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from rabit.cli import main

    folder, text = tiny_folder
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    before = _folder_digest(folder)
    out = tmp_path / "res.json"
    rc = main(["eval", str(folder), "--tasks", "piqa", "--limit", "8", "--ppl", str(text), "--seq-len", "64",
               "--max-windows", "3", "--batch-size", "4", "--json", str(out), "--offline"])
    assert rc == 0
    res = json.loads(out.read_text())
    ppl = res["perplexity"][str(text)]
    assert ppl["windows"] == 3 and math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1
    piqa = res["tasks"]["piqa"]
    assert piqa["n"] == 8 and piqa["n_total"] == 1838 and piqa["backend"] == "lm-eval"
    assert 0.0 <= piqa["acc"] <= 1.0 and 0.0 <= piqa["acc_norm"] <= 1.0
    assert res["kind"] == "hf" and res["limit"] == 8 and res["seq_len"] == 64
    shown = capsys.readouterr().out
    assert "| piqa | 8 |" in shown and "PPL" in shown
    assert _folder_digest(folder) == before  # evaluation never modifies the model folder

    # The native scorer gives the same PIQA numbers on the same items.
    from rabit.eval.piqa import evaluate_piqa
    from rabit.models import load_model

    model, tok = load_model(str(folder))
    native = evaluate_piqa(model, tok, limit=8)
    assert native["acc"] == pytest.approx(piqa["acc"]) and native["acc_norm"] == pytest.approx(piqa["acc_norm"])


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0", "--tasks", "piqa"], "--limit must be >= 1"),
    (["--ppl", "none"], "nothing to evaluate"),
    (["--tasks", "nosuchtask", "--zeroshot-backend", "native", "--ppl", "none"], "native backend only"),
])
def test_cli_eval_bad_input(tiny_folder, argv, message, capsys):
    from rabit.cli import main

    folder, _ = tiny_folder
    assert main(["eval", str(folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_eval_unreadable_folder(tmp_path, capsys):
    from rabit.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--ppl", "austen", "--json", str(tmp_path / "r.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--json", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_cli_eval_saved_rabit_folder(tiny_folder, tmp_path, monkeypatch):
    """A saved 2-bit folder is evaluated through its packed layers and gives the unpacked model's numbers."""
    pytest.importorskip("lm_eval")
    from rabit import serialization
    from rabit.cli import main
    from rabit.config import RaBiTConfig
    from rabit.data import eval_tokens
    from rabit.eval.perplexity import perplexity
    from rabit.models import load_model
    from rabit.quantize import quantize_

    folder, text = tiny_folder
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(folder))
    q = quantize_(model, RaBiTConfig(precondition=False))
    saved = tmp_path / "q"
    serialization.save_quantized(q, saved, tokenizer=tok, scale_dtype=torch.float32, dtype=torch.float32)
    expected = perplexity(q, eval_tokens(tok, str(text)), 64, None, 2)
    before = _folder_digest(saved)
    out = tmp_path / "res.json"
    assert main(["eval", str(saved), "--ppl", str(text), "--seq-len", "64", "--max-windows", "2",
                 "--tasks", "piqa", "--limit", "4", "--json", str(out), "--offline"]) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "rabit"
    assert res["perplexity"][str(text)]["ppl"] == pytest.approx(expected, rel=1e-3)
    assert res["tasks"]["piqa"]["n"] == 4
    assert _folder_digest(saved) == before


# ------------------------------------------------------------------------------------------- perplexity
def test_perplexity_of_the_first_windows_equals_a_shorter_evaluation():
    from rabit.eval.perplexity import perplexity, perplexity_of, window_nlls

    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=64).eval()
    tokens = torch.randint(0, 64, (5 * 16 + 7,))     # 5 windows of 16 and a dropped tail
    for bos in (None, 1):
        nll, count = window_nlls(model, tokens, 16, bos, None, batch_size=2)
        assert len(nll) == 5 and count == [16 if bos is not None else 15] * 5
        assert all(v > 0 for v in nll)
        for n in (1, 3, 5):
            assert perplexity_of(nll, count, n) == pytest.approx(perplexity(model, tokens, 16, bos, n), rel=1e-5)
        assert perplexity_of(nll, count) == pytest.approx(perplexity(model, tokens, 16, bos), rel=1e-5)
        # the windows differ, so the first ones alone give another figure than all of them
        assert perplexity_of(nll, count, 1) != pytest.approx(perplexity_of(nll, count), rel=1e-3)
    with pytest.raises(ValueError, match="no windows"):
        perplexity_of([], [], 2)


@pytest.mark.parametrize("positions,chunk", [(1, 128), (37, 8), (300, 128), (256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_nll_in_chunks_matches_one_cross_entropy(positions, chunk, dtype):
    from rabit.eval.perplexity import summed_nll

    torch.manual_seed(positions)
    logits = (torch.randn(positions, 97) * 4).to(dtype)
    target = torch.randint(0, 97, (positions,))
    whole = torch.nn.functional.cross_entropy(logits.double(), target, reduction="sum").item()
    assert summed_nll(logits, target, chunk) == pytest.approx(whole, rel=1e-5)
    # a wrong target changes it: the sum is over the targets' log-probabilities, not a constant
    assert summed_nll(logits, (target + 1) % 97, chunk) != pytest.approx(whole, rel=1e-3)
