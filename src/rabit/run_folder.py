"""The run folder of a quantize job: what is in it, whether this job may use it, and clearing it for --overwrite.

Every check here only reads; `prepare` is the first write, after all checks passed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .run_identity import identity_changes

# Files a run writes (the only ones --overwrite removes; anything else in the folder is left alone).
RUN_FILES = ("run.json", "log.jsonl", "evals.json", "loss.png", "summary.json", "summary.md",
             "model.safetensors", "rabit_config.json", "memory.json")
RUN_DIRS = ("checkpoints", "quantized", "dcp")


def run_state(out: Path) -> str:
    """'missing', 'empty', 'run' (holds run.json) or 'foreign' (other files)."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / "run.json").exists():
        return "run"
    return "foreign" if any(out.iterdir()) else "empty"


def check_folder(out: Path, resume: bool, overwrite: bool) -> tuple[str, dict | None]:
    """(state, the stored run.json or None); raises when the folder cannot be used as asked."""
    state = run_state(out)
    if resume and state != "run":
        raise FileNotFoundError(f"--resume: {out} holds no run to resume")
    if state == "foreign" and not overwrite:
        raise ValueError(f"{out} is not empty and holds no rabit run; choose another --out or pass --overwrite "
                         "(only the files a run writes would be replaced)")
    old_run = None
    if state == "run":
        try:
            old_run = json.loads((out / "run.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            if not overwrite:
                raise ValueError(f"{out / 'run.json'} is unreadable ({e}); pass --overwrite to start over") from None
    return state, old_run


def check_same_run(out: Path, old_run: dict | None, record: dict, resume: bool, overwrite: bool) -> None:
    if old_run is None or overwrite:
        return
    err = different_run_error(out, old_run, record)
    if err is not None:
        raise err
    if not resume:
        raise ValueError(f"{out} already holds this run; pass --resume to continue it or --overwrite to start over")


def different_run_error(out: Path, old: dict, new: dict) -> ValueError | None:
    """The error for a folder that holds another run, naming the settings that differ and, where a flag sets
    one, the flags that would reproduce the stored run (defaults may have changed since it started)."""
    from .cli.options import flag_for, flags_for_value

    changes = identity_changes(old, new)
    if not changes:
        return None
    hint = []
    for key, was, _ in changes:
        flag, flags = flag_for(key), flags_for_value(key, was)
        if flags:
            hint.append(flags)
        elif flag and isinstance(was, (int, float, str)) and not isinstance(was, bool):
            hint.append(f"{flag} {was}")
    msg = f"{out} holds a different run ({'; '.join(f'{k}: {x!r} -> {y!r}' for k, x, y in changes[:6])})"
    if hint:
        msg += f"; to continue that run pass its settings: --resume {' '.join(hint)}"
    return ValueError(msg + "; or use another --out, or --overwrite to replace it")


def prepare(out: Path, state: str, overwrite: bool, record: dict) -> None:
    """Clear the files of the run being replaced (--overwrite), create the folder and write run.json."""
    from .atomic_io import atomic_write_json

    if overwrite and state in ("run", "foreign"):
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run.json", record)
