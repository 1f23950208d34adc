import json
import sys
import types
import warnings

import pytest
import torch

from rabit import data
from rabit.testing import tiny_tokenizer

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\n\nHowever little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families.\n"
)
CORPUS_TEXT = data.load_text("wikitext2-valid")[:12_000]  # not periodic: packed rows are distinct


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT, encoding="utf-8")
    return p


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _stream(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- tiny tokenizer -------------------------------------------------------------------------


def test_tiny_tokenizer(tok):
    assert len(tok) == 512
    assert tok.name_or_path == "rabit-tiny-tokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = "Mr. Darcy's reply, in 1813 — naïve but “fine”!\n\n  Next paragraph.\tTab."
    ids = _stream(tok, text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # it compresses English
    other = tiny_tokenizer()
    assert other is not tok
    assert other("hello world")["input_ids"] == tok("hello world")["input_ids"]
    assert data.tokenizer_fingerprint(other) == data.tokenizer_fingerprint(tok)


# --- sources --------------------------------------------------------------------------------


def test_builtin_names():
    assert {"wikitext2-test", "wikitext2-valid", "austen"} <= set(data.BUILTIN_CORPORA)
    assert data.EVAL_ONLY == {"wikitext2-test"}


def test_wikitext2_test_text():
    text = data.load_text("wikitext2-test")
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is an English film , television")
    assert text.endswith("Eddie Pelkey . ")
    assert "\r" not in text
    raw = (data.CORPORA_DIR / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode()
    lines = [line for line in raw.split("\r\n") if line]
    assert text == "\n\n".join(lines)


def test_other_builtins():
    austen = data.load_text("austen")
    assert austen.startswith("EMMA")
    for title in ("\n\nMANSFIELD PARK", "\n\nNORTHANGER ABBEY", "\n\nPersuasion\n", "\n\nPRIDE AND PREJUDICE", "\n\nSENSE AND SENSIBILITY"):
        assert title in austen
    assert len(austen) > 3_900_000
    valid = data.load_text("wikitext2-valid")
    assert "Homarus gammarus" in valid[:100] and "<unk>" in valid


def test_shakespeare_and_the_out_of_domain_austen_text():
    plays = data.load_text("shakespeare")
    assert plays.startswith("HAMLET, PRINCE OF DENMARK")
    for title in ("\n\nMACBETH\n\nby William Shakespeare", "To be, or not to be", "KING RICHARD III"):
        assert title.lower() in plays.lower()
    assert 1_700_000 < len(plays) < 2_000_000
    persuasion = data.load_text("austen-persuasion")
    assert persuasion.startswith("Persuasion") and persuasion in data.load_text("austen")
    assert set(data.builtin_files("austen-persuasion")) <= set(data.builtin_files("austen"))
    assert not set(data.builtin_files("austen")) & set(data.builtin_files("shakespeare"))
    assert data.builtin_files("my/own.txt") == ()


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"unknown corpus 'austin'.*Did you mean 'austen'"):
        data.load_text("austin")
    with pytest.raises(ValueError, match="wikitext2-valid"):  # lists the built-in names
        data.load_text("no-such-corpus")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="hf:NAME"):
        data.load_text("hf:")


def test_jsonl_and_folder(tmp_path):
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "second one", "id": 1}) + "\n\n" + json.dumps({"text": "third"}) + "\n"
    )
    (tmp_path / "a.txt").write_text("first\r\nline\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("fourth")
    (tmp_path / "notes.md").write_text("ignored")
    assert data.load_text(str(tmp_path / "b.jsonl")) == "second one\n\nthird"
    assert data.load_text(str(tmp_path)) == "first\nline\n\n\nsecond one\n\nthird\n\nfourth"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        data.load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        data.load_text(str(tmp_path / "empty"))


def test_hf_source(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "id"]
        features = {}

        def __getitem__(self, key):
            return {"text": [" = A = \n", "", " body \n"]}[key]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline/thing":
            raise ConnectionError("no route to host")
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.load_text("hf:wikitext:wikitext-2-raw-v1:validation") == " = A = \n\n\n\n\n body \n"
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "validation")
    data.load_text("hf:some/name")
    assert calls[-1] == ("some/name", None, "train")
    from rabit.errors import InputError

    with pytest.raises(InputError, match="unreachable"):  # the user can fix it: one line, exit status 2
        data.load_text("hf:offline/thing")
    assert data.is_eval_only("hf:wikitext:wikitext-2-raw-v1:test")
    assert not data.is_eval_only("hf:wikitext:wikitext-2-raw-v1:train")


# --- tokenization and cache -----------------------------------------------------------------


def test_chunked_tokenization_matches_whole(tok):
    text = data.load_text("wikitext2-valid")[:60_000]
    assert len(data._chunk_bounds(text, 2000)) > 10
    assert data._tokenize_text(tok, text, chunk_chars=2000) == _stream(tok, text)


def test_chunking_falls_back_when_unsafe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # sentencepiece-like
    t.decoder = decoders.Metaspace(prepend_scheme="first")
    t.train_from_iterator([TEXT * 3], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
    text = (TEXT + "\n") * 30
    assert data._tokenize_text(sp, text, chunk_chars=300) == _stream(sp, text)


def test_cache_hit_and_invalidation(tok, corpus, cache, monkeypatch):
    calls = []
    real_call = type(tok).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    first = data.tokenize_corpus(tok, str(corpus), cache_dir=cache)
    assert calls and first.dtype == torch.long and first.ndim == 1
    assert first.tolist() == _stream(tok, CORPUS_TEXT)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("corpus.txt-")
    assert not list(cache.glob(".tmp-*"))

    calls.clear()
    second = data.tokenize_corpus(tok, str(corpus), cache_dir=cache)
    assert calls == []  # served from the cache without tokenizing
    assert torch.equal(first, second)

    corpus.write_text(CORPUS_TEXT + TEXT, encoding="utf-8")  # size and mtime change: new key
    third = data.tokenize_corpus(tok, str(corpus), cache_dir=cache)
    assert calls and third.numel() > first.numel()
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_cache_env_var(tok, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache" / "tokens"
    data.tokenize_corpus(tok, str(corpus))
    assert len(list((tmp_path / "envcache" / "tokens").glob("*.safetensors"))) == 1


def test_corrupt_cache_rebuilt(tok, corpus, cache):
    good = data.tokenize_corpus(tok, str(corpus), cache_dir=cache)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(b"\x00garbage, not safetensors")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = data.tokenize_corpus(tok, str(corpus), cache_dir=cache)
    assert torch.equal(rebuilt, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid again
        assert torch.equal(data.tokenize_corpus(tok, str(corpus), cache_dir=cache), good)


# --- sequences ------------------------------------------------------------------------------


def test_pack_sequences_order_and_shapes():
    stream = torch.arange(103)
    rows = data.pack_sequences(stream, 10)
    assert rows.shape == (10, 10) and rows.dtype == torch.long
    assert torch.equal(rows.reshape(-1), stream[:100])
    rows = data.pack_sequences(stream, 10, bos_id=7)
    assert rows.shape == (11, 10)
    assert (rows[:, 0] == 7).all()
    assert torch.equal(rows[:, 1:].reshape(-1), stream[:99])
    with pytest.raises(ValueError, match=r"corpus x has 5 tokens, fewer than the 10 needed"):
        data.pack_sequences(torch.arange(5), 10, name="x")


def test_training_sequences(tok, corpus, cache):
    stream = torch.tensor(_stream(tok, CORPUS_TEXT))
    seq_len = 16
    train, val = data.training_sequences(tok, [str(corpus)], seq_len, val_fraction=0.1, seed=0, cache_dir=cache)
    n = stream.numel() // seq_len
    assert train.dtype == val.dtype == torch.long
    assert train.shape[1] == val.shape[1] == seq_len
    assert train.shape[0] + val.shape[0] == n and val.shape[0] == round(n * 0.1)

    # Every packed row appears exactly once across train and val (disjoint, nothing lost).
    packed = data.pack_sequences(stream, seq_len)
    index = {tuple(r): i for i, r in enumerate(packed.tolist())}
    assert len(index) == n  # rows are distinct here, so row identity is position identity
    train_idx = [index[tuple(r)] for r in train.tolist()]
    val_idx = [index[tuple(r)] for r in val.tolist()]
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(n))
    assert train_idx != sorted(train_idx)  # shuffled

    again = data.training_sequences(tok, str(corpus), seq_len, val_fraction=0.1, seed=0, cache_dir=cache)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    other = data.training_sequences(tok, str(corpus), seq_len, val_fraction=0.1, seed=1, cache_dir=cache)
    assert not torch.equal(other[0], train)

    tr_bos, va_bos = data.training_sequences(tok, str(corpus), seq_len, add_bos=True, cache_dir=cache)
    assert (tr_bos[:, 0] == tok.bos_token_id).all() and (va_bos[:, 0] == tok.bos_token_id).all()
    assert tr_bos.shape[0] + va_bos.shape[0] == stream.numel() // (seq_len - 1)

    tr0, va0 = data.training_sequences(tok, str(corpus), seq_len, val_fraction=0.0, cache_dir=cache)
    assert va0.shape == (0, seq_len) and tr0.shape == (n, seq_len)


def test_two_sequences_give_one_validation(tok, tmp_path, cache):
    p = tmp_path / "small.txt"
    p.write_text(TEXT)
    n_tok = len(_stream(tok, TEXT))
    train, val = data.training_sequences(tok, str(p), n_tok // 2, val_fraction=0.01, cache_dir=cache)
    assert train.shape[0] == 1 and val.shape[0] == 1


def test_too_small_corpus(tok, tmp_path, cache):
    p = tmp_path / "tiny.txt"
    p.write_text("Just a few words.")
    n_tok = len(_stream(tok, "Just a few words."))
    with pytest.raises(ValueError, match=rf"tiny.txt.* has {n_tok} tokens, fewer than the 64 needed"):
        data.training_sequences(tok, [str(p)], 64, cache_dir=cache)
    with pytest.raises(ValueError, match=rf"has {n_tok} tokens"):
        data.calibration_batch(tok, str(p), n_samples=2, seq_len=64, cache_dir=cache)


def test_eval_only_refused(tok, corpus, cache):
    with pytest.raises(ValueError, match="evaluation data"):
        data.training_sequences(tok, [str(corpus), "wikitext2-test"], 16, cache_dir=cache)
    with pytest.raises(ValueError, match="evaluation data"):
        data.calibration_batch(tok, "wikitext2-test", cache_dir=cache)
    raw = data.CORPORA_DIR / "wikitext-2-raw" / "wiki.test.raw"
    with pytest.raises(ValueError, match="evaluation data"):  # the same file by path
        data.training_sequences(tok, str(raw), 16, cache_dir=cache)
    copy = cache.parent / "evalcopy"
    copy.mkdir()
    (copy / "renamed.txt").write_bytes(raw.read_bytes())  # a byte-identical copy in a folder
    with pytest.raises(ValueError, match="evaluation data"):
        data.training_sequences(tok, str(copy), 16, cache_dir=cache)
    assert not data.is_eval_only(str(raw.parent.parent / "wikitext-2"))
    assert not list(cache.glob("*"))  # refused before tokenizing anything
    assert not data.is_eval_only("wikitext2-valid") and not data.is_eval_only(str(corpus))


def test_calibration_batch(tok, corpus, cache):
    stream = torch.tensor(_stream(tok, CORPUS_TEXT))
    batch = data.calibration_batch(tok, str(corpus), n_samples=8, seq_len=32, seed=3, cache_dir=cache)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    windows = stream.unfold(0, 32, 1)
    for row in batch:
        assert (windows == row).all(dim=1).any()
    assert torch.equal(batch, data.calibration_batch(tok, str(corpus), n_samples=8, seq_len=32, seed=3, cache_dir=cache))
    assert not torch.equal(batch, data.calibration_batch(tok, str(corpus), n_samples=8, seq_len=32, seed=4, cache_dir=cache))
    bos = data.calibration_batch(tok, str(corpus), n_samples=2, seq_len=32, add_bos=True, cache_dir=cache)
    assert bos.shape == (2, 32) and (bos[:, 0] == tok.bos_token_id).all()


@pytest.mark.parametrize("first", ["stream", "bos"])      # a held-out row starting in the stream, or with a BOS
def test_overlapping_starts_mark_exactly_the_windows_touching_a_row(first):
    tokens = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    body, m = 40, 25
    positions = [0, 130, 470]
    rows = torch.stack([tokens[p:p + m] for p in positions])
    if first == "bos":
        rows = torch.cat([torch.full((3, 1), 999), rows[:, 1:]], 1)
    blocked = data.overlapping_starts(tokens, rows, body)
    assert blocked.shape == (500 - body + 1,)
    for s in range(blocked.numel()):
        # the row's span [p, p + m) (a BOS-led row: its tokens from p + 1, and the position its BOS stands for)
        touches = any(s < p + m and s + body > p for p in positions)
        assert bool(blocked[s]) == touches, s
    assert not data.overlapping_starts(tokens, torch.full((1, 10), 999), body).any()   # not in the stream


def test_calibration_windows_avoid_the_held_out_rows(tok, corpus, cache):
    train, val = data.training_sequences(tok, str(corpus), 32, val_fraction=0.2, seed=0, cache_dir=cache)
    held_out = val[:3]
    free = data.calibration_batch(tok, str(corpus), n_samples=64, seq_len=48, seed=1, cache_dir=cache)
    batch = data.calibration_batch(tok, str(corpus), n_samples=64, seq_len=48, seed=1, cache_dir=cache,
                                   avoid=held_out)

    def shares_a_run(row, ref, n=8):          # n consecutive tokens of ref inside the window
        return bool((row.unfold(0, n, 1)[:, None, :] == ref.unfold(0, n, 1)[None]).all(-1).any())

    assert any(shares_a_run(r, v) for r in free for v in held_out)    # the unrestricted draw does overlap
    assert not any(shares_a_run(r, v) for r in batch for v in held_out)
    assert torch.equal(batch, data.calibration_batch(tok, str(corpus), n_samples=64, seq_len=48, seed=1,
                                                     cache_dir=cache, avoid=held_out))


def test_real_corpora_with_tiny_tokenizer(tok, cache):
    batch = data.calibration_batch(tok, n_samples=4, seq_len=64, cache_dir=cache)  # wikitext2-valid
    assert batch.shape == (4, 64)
    ids = data.eval_tokens(tok, cache_dir=cache)  # wikitext2-test is fine for evaluation
    assert ids.ndim == 1 and ids.numel() > 500_000
    assert tok.decode(ids[:20].tolist()) == data.load_text("wikitext2-test")[: len(tok.decode(ids[:20].tolist()))]
    assert tok.decode(ids[:20].tolist()).startswith(" = Robert Boulter = \n\n")


def test_equal_mix_takes_as_many_rows_from_each_corpus(tok, tmp_path, cache):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(CORPUS_TEXT[:3000], encoding="utf-8")
    large.write_text(data.load_text("shakespeare")[:20_000], encoding="utf-8")
    n_small = data.pack_sequences(torch.tensor(_stream(tok, CORPUS_TEXT[:3000])), 32).shape[0]
    small_rows = {tuple(r) for r in data.pack_sequences(torch.tensor(_stream(tok, CORPUS_TEXT[:3000])), 32).tolist()}
    by_size, _ = data.training_sequences(tok, [str(small), str(large)], 32, val_fraction=0.0, cache_dir=cache)
    equal, _ = data.training_sequences(tok, [str(small), str(large)], 32, val_fraction=0.0, cache_dir=cache,
                                       mix="equal")
    assert equal.shape[0] == 2 * n_small < by_size.shape[0]
    assert sum(tuple(r) in small_rows for r in equal.tolist()) == n_small   # every small row, as many large ones
    calib = data.calibration_batch(tok, [str(small), str(large)], 5, 16, mix="equal", cache_dir=cache)
    small_stream = torch.tensor(_stream(tok, CORPUS_TEXT[:3000]))
    in_small = [any(torch.equal(row, small_stream[i:i + 16]) for i in range(small_stream.numel() - 15))
                for row in calib]
    assert in_small == [True, True, True, False, False]
    with pytest.raises(ValueError, match="mix"):
        data.training_sequences(tok, [str(small)], 32, mix="proportional", cache_dir=cache)


def test_balanced_mix_keeps_every_row_and_repeats_the_smaller_corpus(tok, tmp_path, cache):
    from collections import Counter

    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(CORPUS_TEXT[:3000], encoding="utf-8")
    large.write_text(data.load_text("shakespeare")[:20_000], encoding="utf-8")
    small_rows = Counter(tuple(r) for r in data.pack_sequences(torch.tensor(_stream(tok, CORPUS_TEXT[:3000])),
                                                               32).tolist())
    large_rows = Counter(tuple(r) for r in data.pack_sequences(torch.tensor(_stream(tok, data.load_text(
        "shakespeare")[:20_000])), 32).tolist())
    train, val = data.training_sequences(tok, [str(small), str(large)], 32, val_fraction=0.1, cache_dir=cache,
                                         mix="balanced", seed=3)
    n_s, n_l = sum(small_rows.values()), sum(large_rows.values())
    v_s, v_l = round(n_s * 0.1), round(n_l * 0.1)
    rows = Counter(tuple(r) for r in train.tolist())
    held = Counter(tuple(r) for r in val.tolist())
    assert val.shape[0] == v_s + v_l and not set(rows) & set(held)            # held out from each, never trained
    assert sum(held[r] for r in small_rows) == v_s
    m = n_l - v_l
    assert train.shape[0] == 2 * m                                           # the same share for each corpus
    assert sum(rows[r] for r in large_rows) == m and all(rows[r] == 1 for r in large_rows if r not in held)
    small_counts = [rows[r] for r in small_rows if r not in held]
    assert sum(small_counts) == m and max(small_counts) - min(small_counts) <= 1 and min(small_counts) >= 2
    assert data.training_sequences(tok, [str(small), str(large)], 32, val_fraction=0.1, cache_dir=cache,
                                   mix="balanced", seed=3)[0].equal(train)
    # the block stage's windows: as "equal", the same number from each
    a = data.calibration_batch(tok, [str(small), str(large)], 5, 16, mix="balanced", cache_dir=cache)
    assert a.equal(data.calibration_batch(tok, [str(small), str(large)], 5, 16, mix="equal", cache_dir=cache))
