"""Training text sampled from the full-precision model (rabit.teacher_text) and the job's `teacher` source."""
import json

import pytest
import torch

from conftest import make_tiny_llama
from rabit.teacher_text import DEFAULT_TEACHER_TOKENS, parse_teacher_source, sample_texts, teacher_corpus
from rabit.testing import tiny_tokenizer


def test_parse_teacher_source():
    assert parse_teacher_source("teacher") == DEFAULT_TEACHER_TOKENS
    assert parse_teacher_source("teacher:5000") == 5000 and parse_teacher_source(" teacher:65_536 ") == 65536
    for other in ("wikitext2-valid", "teachers", "./teacher", "hf:teacher"):
        assert parse_teacher_source(other) is None
    with pytest.raises(ValueError, match="an integer"):
        parse_teacher_source("teacher:many")
    with pytest.raises(ValueError, match="at least 64"):
        parse_teacher_source("teacher:10")


def test_sampled_texts_have_their_length_follow_the_seed_and_leave_the_global_rng_alone(single_thread):
    tok = tiny_tokenizer()
    model = make_tiny_llama(vocab_size=512)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    texts = sample_texts(model, tok, 100, seq_len=17, batch_size=3, seed=5)
    assert torch.equal(torch.rand(3), before)          # the global RNG was not advanced
    assert len(texts) == 7                            # ceil(100 / 16) sequences of 16 new tokens
    assert all(isinstance(t, str) and t for t in texts)
    again = sample_texts(model, tok, 100, seq_len=17, batch_size=3, seed=5)
    other = sample_texts(model, tok, 100, seq_len=17, batch_size=3, seed=6)
    assert again == texts and other != texts
    with pytest.raises(ValueError, match="top_p"):
        sample_texts(model, tok, 100, top_p=0.0)


def test_sampling_follows_the_model_and_top_p_cuts_its_tail(single_thread):
    """A head that favours id 40 over 41 (and both over the rest by e^30): top-p 0.5 keeps 40 alone, 1.0 both."""
    tok = tiny_tokenizer()
    model = make_tiny_llama(vocab_size=512)
    bias = torch.full((512,), -30.0)
    bias[40], bias[41] = 0.0, -1.0
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(bias)
    greedy = sample_texts(model, tok, 48, seq_len=17, batch_size=2, seed=0, top_p=0.5)
    assert greedy == [tok.decode([40] * 16)] * 3
    both = "".join(sample_texts(model, tok, 480, seq_len=17, batch_size=8, seed=0, top_p=1.0))
    allowed = set(tok.decode([40]) + tok.decode([41]))
    assert set(both) == allowed     # both ids are drawn (41 with p = 0.27), nothing else


def test_teacher_corpus_is_cached_and_a_damaged_file_is_sampled_again(tmp_path, monkeypatch, single_thread):
    import rabit.teacher_text as tt

    tok = tiny_tokenizer()
    model = make_tiny_llama(vocab_size=512)
    said = []
    path = teacher_corpus(model, tok, 80, "fp-a", seq_len=17, cache_dir=tmp_path, say=said.append)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(isinstance(json.loads(ln)["text"], str) for ln in lines)
    assert "sampling 80 tokens" in said[0]

    def refuse(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(tt, "sample_texts", refuse)
    assert teacher_corpus(model, tok, 80, "fp-a", seq_len=17, cache_dir=tmp_path, say=said.append) == path
    assert "sampled before" in said[-1]
    # another model, seed or length is another file
    with pytest.raises(AssertionError, match="sampled again"):
        teacher_corpus(model, tok, 80, "fp-b", seq_len=17, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="sampled again"):
        teacher_corpus(model, tok, 80, "fp-a", seq_len=17, seed=1, cache_dir=tmp_path)
    monkeypatch.undo()
    path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")    # a truncated file
    assert teacher_corpus(model, tok, 80, "fp-a", seq_len=17, cache_dir=tmp_path, say=said.append) == path
    assert "incomplete or damaged" in said[-2] and path.read_text(encoding="utf-8").splitlines() == lines


def test_the_job_trains_on_teacher_text_and_records_the_source_by_name(tmp_path, monkeypatch, capsys):
    from conftest import write_run_files
    from test_blockwise import quantize_args
    from rabit.cli import main

    files = write_run_files(tmp_path / "files", tiny_tokenizer())
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [str(a) for a in quantize_args(files, out, "--no-blocks")]
    i = args.index("--train-data")
    args[i + 1] = f"{files / 'train.txt'},teacher:300"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "teacher text: sampling 300 tokens" in err and f"from {files / 'train.txt'}, teacher:300 (" in err
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["train"] == [str(files / "train.txt"), "teacher:300"]
    cached = list((tmp_path / "cache" / "teacher").glob("teacher-300-*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text(encoding="utf-8").splitlines()) == 2  # 255 tokens each
    # a resumed (or repeated) run finds the text in the cache
    assert main(args + ["--resume"]) == 0
    assert "sampled before" in capsys.readouterr().err


def test_a_malformed_teacher_source_is_refused_before_loading_anything():
    from rabit.cli import build_parser
    from rabit.cli.options import job_from_args

    spec = job_from_args(build_parser().parse_args(["quantize", "--train-data", "wikitext2-valid,teacher:x"]))
    with pytest.raises(ValueError, match="teacher:x"):
        spec.validate()
