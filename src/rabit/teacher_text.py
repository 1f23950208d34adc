"""Training text sampled from the full-precision model itself (the ``teacher`` training source).

The shipped corpora are encyclopedic text and drama; a model distilled on them alone keeps what the teacher does on
those domains and nothing forces it to keep the rest (everyday knowledge that zero-shot tasks such as PIQA probe).
Sequences sampled from the teacher cover its own distribution instead, with no data to download (LLM-QAT, arXiv
2305.17888, distils on such samples). Sampling costs generation time, so the text is cached once per model, length
and seed under ``rabit.paths.cache_root()/teacher/`` as a ``.jsonl`` file (one ``{"text": ...}`` per sequence) that
the data module then reads like any local corpus.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

__all__ = ["TEACHER_SOURCE", "DEFAULT_TEACHER_TOKENS", "parse_teacher_source", "sample_texts", "teacher_corpus",
           "default_teacher_dir"]

#: The training-source name that stands for text sampled from the teacher: ``teacher`` or ``teacher:TOKENS``.
TEACHER_SOURCE = "teacher"
#: Tokens sampled for a bare ``teacher`` source: ~1-2 minutes of generation for the default model on 2 CPU cores.
DEFAULT_TEACHER_TOKENS = 32768
# Bump when the sampling procedure changes: old cached texts are then not reused.
_FORMAT = 1
_MIN_TOKENS = 64

_SOURCE_RE = re.compile(rf"^{TEACHER_SOURCE}(?::(.*))?$")


def parse_teacher_source(source: str) -> int | None:
    """The token count a ``teacher[:TOKENS]`` source asks for, or None for any other source.

    Raises ValueError for a malformed count (not an integer, or below 64)."""
    m = _SOURCE_RE.match(source.strip())
    if m is None:
        return None
    if m.group(1) is None:
        return DEFAULT_TEACHER_TOKENS
    try:
        n = int(m.group(1).replace("_", ""))
    except ValueError:
        raise ValueError(f"bad training source {source!r}: expected {TEACHER_SOURCE} or {TEACHER_SOURCE}:TOKENS "
                         "(an integer)") from None
    if n < _MIN_TOKENS:
        raise ValueError(f"bad training source {source!r}: sample at least {_MIN_TOKENS} tokens")
    return n


def _rows(n_tokens: int, seq_len: int) -> int:
    """Sequences of seq_len - 1 sampled tokens that hold n_tokens."""
    return max(1, math.ceil(n_tokens / (seq_len - 1)))


def _start_token(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise ValueError("sampling text from the model needs a BOS or EOS token to start from; the tokenizer has neither")


@torch.no_grad()
def sample_texts(model, tokenizer, n_tokens: int, seq_len: int = 256, batch_size: int = 32, seed: int = 0,
                 top_p: float = 0.95, temperature: float = 1.0, autocast: bool = False,
                 progress: bool = False) -> list[str]:
    """``ceil(n_tokens / (seq_len - 1))`` texts sampled from ``model``, each ``seq_len - 1`` new tokens after the
    tokenizer's BOS (EOS suppressed, so that every sequence has its full length), decoded without special tokens.

    Nucleus sampling (``top_p``, ``temperature``; no top-k) from a fixed seed, without touching the global RNG.
    autocast: generate under bf16 autocast (a CPU with native bf16)."""
    from transformers import GenerationConfig

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not 0 < top_p <= 1 or not temperature > 0:
        raise ValueError(f"need 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
    new = seq_len - 1
    rows = _rows(n_tokens, seq_len)
    start = _start_token(tokenizer)
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    gen = GenerationConfig(do_sample=True, top_p=top_p, top_k=0, temperature=temperature, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=start if pad is None else pad,
                           eos_token_id=getattr(tokenizer, "eos_token_id", None))
    texts: list[str] = []
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(seed)
            bar = tqdm(total=rows * new, desc="sampling teacher text", unit="tok", disable=not progress)
            for first in range(0, rows, batch_size):
                b = min(batch_size, rows - first)
                ids = torch.full((b, 1), start, dtype=torch.long, device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
                texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
                bar.update(b * new)
            bar.close()
    finally:
        model.train(was_training)
    return texts


def default_teacher_dir() -> Path:
    from .paths import cache_root

    return cache_root() / "teacher"


def _key(model_fingerprint: str, tokenizer, n_tokens: int, seq_len: int, seed: int, top_p: float,
         temperature: float) -> str:
    from .data import tokenizer_fingerprint

    h = hashlib.sha256()
    h.update(f"rabit-teacher-text-v{_FORMAT}\0{model_fingerprint}\0{tokenizer_fingerprint(tokenizer)}\0"
             f"{n_tokens}\0{seq_len}\0{seed}\0{top_p!r}\0{temperature!r}".encode())
    return h.hexdigest()


def _read_cached(path: Path, rows: int) -> bool:
    """True when ``path`` is a complete cached corpus (``rows`` JSON lines with a string text each)."""
    from .data import read_jsonl_texts

    try:
        return len(read_jsonl_texts(path)) == rows
    except (OSError, ValueError):
        return False


def teacher_corpus(model, tokenizer, n_tokens: int, model_fingerprint: str, seq_len: int = 256, seed: int = 0,
                   top_p: float = 0.95, temperature: float = 1.0, autocast: bool = False,
                   cache_dir: str | Path | None = None, progress: bool = False, say=None) -> Path:
    """The ``.jsonl`` file of :func:`sample_texts`' texts for this model and settings: read from the cache when a
    complete one is there, else sampled and written atomically (a killed run leaves no partial file)."""
    from .atomic_io import atomic_write_bytes

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_teacher_dir()
    digest = _key(model_fingerprint, tokenizer, n_tokens, seq_len, seed, top_p, temperature)
    path = folder / f"teacher-{n_tokens}-{digest[:24]}.jsonl"
    rows = _rows(n_tokens, seq_len)
    if path.is_file():
        if _read_cached(path, rows):
            if say is not None:
                say(f"teacher text: {n_tokens:,} tokens sampled before, from {path}")
            return path
        if say is not None:
            say(f"teacher text: {path} is incomplete or damaged; sampling again")
    if say is not None:
        say(f"teacher text: sampling {n_tokens:,} tokens ({rows} sequences of {seq_len - 1}, top-p {top_p}, "
            f"seed {seed}) ...")
    texts = sample_texts(model, tokenizer, n_tokens, seq_len=seq_len, seed=seed, top_p=top_p,
                         temperature=temperature, autocast=autocast, progress=progress)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    try:
        atomic_write_bytes(path, data.encode("utf-8"))
    except OSError as e:
        raise OSError(f"could not write the sampled teacher text to {path}: {e} (set RABIT_CACHE to a writable "
                      "folder)") from e
    return path
