"""Atomic file writes: a result is either the old file or the complete new one, never half of either.

Every writer goes to a uniquely named temporary file in the destination folder (so concurrent writers never
share one), fsyncs it, renames it over the destination with os.replace, then fsyncs the folder. A crash or
an exception at any point leaves the previous file intact and removes the temporary one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename in `path` (best effort: some file systems cannot open or fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds, fsync it and rename it over `path`.

    For writers that want a file name rather than bytes (safetensors' save_file, matplotlib's savefig).
    `suffix` lets writers that infer the format from the extension see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj, *, allow_nan: bool = False, sort_keys: bool = True) -> None:
    """Serialize `obj` first (a value JSON cannot hold raises before anything is touched), then write it."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=allow_nan) + "\n"
    atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
