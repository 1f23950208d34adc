"""BOS follows the tokenizer's own rule everywhere (training, calibration, perplexity, generation) unless a flag
overrides it."""
import json

import pytest

from conftest import write_run_files
from rabit.bos import resolve_bos, tokenizer_adds_bos
from rabit.testing import tiny_tokenizer


def bos_tokenizer():
    """The tiny tokenizer configured like Llama / Gemma tokenizers: encoding starts every text with <s>."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_tokenizer_rule_is_read_from_its_encoding():
    plain, adds = tiny_tokenizer(), bos_tokenizer()
    assert plain("Mr. Darcy").input_ids[0] != 1 and adds("Mr. Darcy").input_ids[0] == 1
    assert tokenizer_adds_bos(plain) is False and tokenizer_adds_bos(adds) is True
    assert resolve_bos(plain).use is False and resolve_bos(plain).token_id is None
    choice = resolve_bos(adds)
    assert (choice.use, choice.token_id, choice.source) == (True, 1, "tokenizer")
    assert "from the tokenizer" in choice.describe()
    # flags win, both ways
    assert resolve_bos(adds, False).token_id is None and resolve_bos(adds, False).source == "flag"
    assert resolve_bos(plain, True).token_id == 1
    # a tokenizer without a BOS token: never adds one, and asking for it is an error
    nobos = tiny_tokenizer()
    nobos.bos_token = None
    assert tokenizer_adds_bos(nobos) is False
    with pytest.raises(ValueError, match="no BOS token"):
        resolve_bos(nobos, True)


def test_prompt_encoding_follows_the_same_rule():
    from rabit.generate import encode_prompt

    plain, adds = tiny_tokenizer(), bos_tokenizer()
    body = plain("It is a truth", add_special_tokens=False).input_ids
    assert encode_prompt(plain, "It is a truth").tolist() == [body]
    assert encode_prompt(adds, "It is a truth").tolist() == [[1] + body]
    assert encode_prompt(adds, "It is a truth", add_bos=False).tolist() == [body]
    assert encode_prompt(plain, "It is a truth", add_bos=True).tolist() == [[1] + body]
    assert encode_prompt(plain, "").tolist() == [[1]]    # an empty prompt still has a first token


@pytest.fixture(scope="module")
def bos_run_files(tmp_path_factory):
    return write_run_files(tmp_path_factory.mktemp("bosrun"), bos_tokenizer(), 12000, 4000)


@pytest.mark.parametrize("flag, expect_bos", [(None, True), ("--no-bos", False)])
def test_quantize_uses_one_bos_rule_for_training_calibration_and_eval(bos_run_files, tmp_path, monkeypatch, flag,
                                                                     expect_bos):
    import rabit.data as data
    import rabit.eval.perplexity as ppl_mod
    from rabit.cli import main

    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    seen = {"train": [], "calib": [], "eval": []}
    real_train, real_calib, real_ppl = data.training_sequences, data.calibration_batch, ppl_mod.perplexity

    def train_spy(*a, **k):
        rows = real_train(*a, **k)
        seen["train"].append(bool((rows[0][:, 0] == 1).all()))
        return rows

    def calib_spy(*a, **k):
        rows = real_calib(*a, **k)
        seen["calib"].append(bool((rows[:, 0] == 1).all()))
        return rows

    def ppl_spy(model, tokens, seq_len, bos, *a, **k):
        seen["eval"].append(bos)
        return real_ppl(model, tokens, seq_len, bos, *a, **k)

    monkeypatch.setattr(data, "training_sequences", train_spy)
    monkeypatch.setattr(data, "calibration_batch", calib_spy)
    monkeypatch.setattr(ppl_mod, "perplexity", ppl_spy)
    out = tmp_path / "run"
    argv = ["quantize", "--model", str(bos_run_files / "model"), "--out", str(out),
            "--train-data", str(bos_run_files / "train.txt"), "--eval-data", str(bos_run_files / "eval.txt"),
            "--eval-seq-len", "32", "--eval-windows", "1", "--seq-len", "32", "--tokens", "64", "--grad-accum", "1",
            "--calib-samples", "2", "--calib-len", "32", "--val-sequences", "0", "--no-progress", "--threads", "1",
            "--skip-init-eval", "--isvid-rounds", "0", "--precondition"] + ([flag] if flag else [])
    assert main(argv) == 0
    # calibration rows are drawn twice: for the initialization's preconditioning and for the block-wise stage
    assert seen["train"] == [expect_bos] and seen["calib"] == [expect_bos, expect_bos]
    assert seen["eval"] and set(seen["eval"]) == {1 if expect_bos else None}
    summary = json.loads((out / "summary.json").read_text())
    source = "flag" if flag else "tokenizer"
    assert summary["bos"]["train"] == {"use": expect_bos, "token_id": 1 if expect_bos else None, "source": source}
    assert summary["bos"]["eval"] == summary["bos"]["train"]
    assert json.loads((out / "run.json").read_text())["data"]["bos"] is expect_bos
    assert f"BOS (training/calibration) | {'on' if expect_bos else 'off'}" in (out / "summary.md").read_text()


def test_quantize_saves_with_size_report_and_embedding_option(bos_run_files, tmp_path, monkeypatch, capsys):
    from rabit.cli import main

    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    argv = ["quantize", "--model", str(bos_run_files / "model"), "--out", str(tmp_path / "run"),
            "--train-data", str(bos_run_files / "train.txt"), "--eval-data", str(bos_run_files / "eval.txt"),
            "--eval-seq-len", "32", "--eval-windows", "1", "--seq-len", "32", "--tokens", "32", "--grad-accum", "1",
            "--calib-samples", "2", "--calib-len", "32", "--val-sequences", "0", "--no-progress", "--threads", "1",
            "--skip-init-eval", "--isvid-rounds", "0", "--keep-fp32", "--embed-bits", "8", "--embed-group-size", "32"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "saved model:" in err and "(unquantized tensors in float32)" in err and "embeddings" in err
    folder = tmp_path / "run" / "quantized"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["storage_dtype"] == "float32" and qc["embedding_quant"]["bits"] == 8
    from rabit.embedquant import QuantizedEmbedding, QuantizedLinear
    from rabit.serialization import load_quantized, size_report

    loaded = load_quantized(folder)
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding) and isinstance(loaded.lm_head, QuantizedLinear)
    assert size_report(folder)["components"]["embeddings"] == 512 * 32 + 512 * 1 * 2
    # a group size that does not divide the embedding width is refused before any training
    bad = argv[:]
    bad[bad.index("--out") + 1] = str(tmp_path / "bad")
    bad[-1] = "24"
    assert main(bad) == 2
    assert "does not divide" in capsys.readouterr().err and not (tmp_path / "bad").exists()
