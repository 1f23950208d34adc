"""Where a run continues from: its newest checkpoint of either kind.

A run folder may hold local checkpoints (checkpoints/, written by one process) and DCP checkpoints (dcp/,
written by a process group) when it was resumed at another number of processes; the newer one wins. Both
trainers read both kinds, so a run started with one process resumes with several and the reverse.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError, latest_checkpoint, read_json


def latest_dcp(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / "dcp"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    info = read_json(pointer, "checkpoint pointer")
    path = root / str(info.get("dir", "")) if isinstance(info, dict) else root / ""
    if path == root or not (path / "state.json").exists() or not (path / ".metadata").exists():
        raise CheckpointError(f"checkpoint pointer {pointer} names {path}, which is missing or incomplete")
    return path


def _step(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def latest_any(run_dir: str | os.PathLike) -> tuple[str, Path] | None:
    """("local" | "dcp", folder) of the newest checkpoint, or None (raises CheckpointError when damaged)."""
    found = [(kind, p) for kind, p in (("local", latest_checkpoint(run_dir)), ("dcp", latest_dcp(run_dir)))
             if p is not None]
    if not found:
        return None
    return max(found, key=lambda kp: _step(kp[1]))
