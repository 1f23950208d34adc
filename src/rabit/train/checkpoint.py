"""Training checkpoints that lose nothing, in safetensors + JSON (never pickle), written atomically.

Layout under a run folder:

    checkpoints/step-000050/model.safetensors   the student's state dict (tied tensors stored once)
    checkpoints/step-000050/optim.safetensors   optimizer tensors (momenta, Adam moments) and RNG states
    checkpoints/step-000050/state.json          step, scheduler, data position, optimizer hyper-parameters,
                                                Python RNG state, caller extras, and the size + SHA-256 of
                                                both safetensors files; written last
    checkpoints/latest                          JSON pointer {"step": 50, "dir": "step-000050"}
    checkpoints/fixed-<sha256[:16]>.safetensors the state-dict tensors that do not train (frozen latents, embeddings),
                                                written once and named (size + SHA-256) by each state.json that
                                                uses them instead of being rewritten with every checkpoint

With frozen latents the fixed tensors are nearly all of a checkpoint's bytes (the default model: ~540 of 655 MB),
and writing and hashing them every few steps cost a tenth of a long run's training time. A FixedTensors object
(one per trainer) remembers what it wrote, and writes again only if one of the tensors changed (its version
counter, storage or shape), so a checkpoint never names stale tensors.

A checkpoint is written into a temporary folder, each file fsynced, the folder renamed into place, and only
then the `latest` pointer replaced (os.replace) and older checkpoints removed: a crash at any moment leaves
the previous checkpoint intact and pointed to. Loading re-hashes both files and checks sizes, headers and
the JSON, so a truncated or corrupted checkpoint raises CheckpointError instead of being loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_io import atomic_write_json
from ..atomic_io import fsync_dir as _fsync_dir
from ..errors import InputError

FORMAT = "rabit-train-checkpoint"
VERSION = 2              # 2: the fixed tensors may live in a shared file (state.json "fixed")
READS = (1, 2)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FIXED_FILE = re.compile(r"^fixed-[0-9a-f]{16}\.safetensors$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, incomplete, truncated, corrupted or does not match the run."""


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is unreadable: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is corrupt (invalid JSON: {e})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- tensor packing
def _storage_key(t: torch.Tensor) -> tuple:
    """Where a tensor's values live and how they are laid out: equal for tensors that are the same values."""
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def dedup_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights): (unique tensors, alias -> name)."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = _storage_key(t) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    return unique, aliases


def _to_json_value(v):
    if isinstance(v, tuple):
        return {"__tuple__": [_to_json_value(x) for x in v]}
    if isinstance(v, list):
        return [_to_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_json_value(x) for k, x in v.items()}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return {"__float__": repr(v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store a {type(v).__name__} in a JSON checkpoint: {v!r}")


def _from_json_value(v):
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_from_json_value(x) for x in v["__tuple__"])
        if set(v) == {"__float__"}:
            return float(v["__float__"])
        return {k: _from_json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json_value(x) for x in v]
    return v


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (tensors for safetensors, JSON-able description)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict] = {}
    for idx, pstate in sd["state"].items():
        entry = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tkey = f"{prefix}.state.{idx}.{key}"
                tensors[tkey] = value.detach().to("cpu").contiguous()
                entry[key] = {"tensor": tkey}
            else:
                entry[key] = {"value": _to_json_value(value)}
        state_meta[str(idx)] = entry
    return tensors, {"state": state_meta, "param_groups": _to_json_value(sd["param_groups"])}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                           name: str) -> None:
    state = {}
    try:
        for idx, entry in meta["state"].items():
            pstate = {}
            for key, spec in entry.items():
                if "tensor" in spec:
                    pstate[key] = tensors[spec["tensor"]]
                else:
                    pstate[key] = _from_json_value(spec["value"])
            state[int(idx)] = pstate
        groups = _from_json_value(meta["param_groups"])
    except KeyError as e:
        raise CheckpointError(f"{name} optimizer state is incomplete: missing {e}") from None
    mine = opt.state_dict()["param_groups"]
    if len(groups) != len(mine) or any(len(g["params"]) != len(m["params"]) for g, m in zip(groups, mine)):
        raise CheckpointError(f"{name} optimizer in the checkpoint has a different set of parameters "
                              "than this run's model")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot restore the {name} optimizer state: {e}") from None
    for pstate in opt.state.values():  # shapes were not checked by load_state_dict for every key
        for v in pstate.values():
            if torch.is_tensor(v) and not torch.isfinite(v).all() and v.is_floating_point():
                raise CheckpointError(f"{name} optimizer state holds NaN/Inf")


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy.keys"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta and "rng.numpy.keys" in tensors:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype("uint32"), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------- save / load
@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]   # full state dict (aliases filled in)
    optim: dict[str, torch.Tensor]   # optimizer + RNG tensors
    state: dict                      # the parsed state.json


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from ..integrity import checksum_metadata

    save_file(tensors, str(path), metadata={**metadata, **checksum_metadata(tensors)})  # names damaged tensors
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _signature(t: torch.Tensor) -> tuple:
    """What changes when a tensor's values may have changed: an in-place write bumps the version counter (which
    a state dict's detached alias shares with the parameter); .data = ... or a resize changes storage/shape."""
    return (*_storage_key(t), t._version)


class FixedTensors:
    """The tensors of a checkpoint that do not train, written once into checkpoints/fixed-<hash>.safetensors.

    `names` (set by the caller before each save) are the state-dict keys that do not train. write() returns the
    record ({"name", "size", "sha256"}) a state.json stores; it writes a new file only when the set of tensors or
    any tensor's signature changed since the last write, or the file is gone."""

    def __init__(self, names=()):
        self.names = frozenset(names)
        self.record: dict | None = None
        self._signature: dict | None = None

    def write(self, root: Path, tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> dict:
        signature = {k: _signature(originals[k]) for k in tensors}
        if (self.record is not None and signature == self._signature
                and _file_size(root / self.record["name"]) == self.record["size"]):
            return self.record
        fd, name = tempfile.mkstemp(dir=root, prefix=".fixed-", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            _write_safetensors(tmp, tensors, {"format": FORMAT, "version": str(VERSION), "part": "fixed"})
            digest = sha256_file(tmp)
            record = {"name": f"fixed-{digest[:16]}.safetensors", "size": tmp.stat().st_size, "sha256": digest}
            os.replace(tmp, root / record["name"])
            tmp = None
            _fsync_dir(root)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        self.record, self._signature = record, signature
        return record


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    optim_tensors: dict[str, torch.Tensor], state: dict, keep: int = 1,
                    fixed: FixedTensors | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` checkpoints.

    With `fixed`, the state-dict tensors it names go to the shared fixed-tensor file (written only when they
    changed) instead of this checkpoint's model.safetensors."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}.", suffix=".tmp"))
    try:
        unique, aliases = dedup_state_dict(model_state)
        meta = {"format": FORMAT, "version": str(VERSION), "step": str(step)}
        fixed_record = None
        if fixed is not None and fixed.names:
            kept = {k: unique.pop(k) for k in list(unique) if k in fixed.names}
            if kept:
                fixed_record = fixed.write(root, kept, model_state)
        _write_safetensors(tmp / "model.safetensors", unique, {**meta, "aliases": json.dumps(aliases)})
        rng_t, rng_meta = rng_state()
        opt_t = {**optim_tensors, **rng_t}
        _write_safetensors(tmp / "optim.safetensors", {k: v.detach().to("cpu").contiguous() for k, v in opt_t.items()},
                           meta)
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                 for name in ("model.safetensors", "optim.safetensors")}
        body = {"format": FORMAT, "version": VERSION, "step": step, "files": files, "rng": rng_meta, **state,
                **({"fixed": fixed_record} if fixed_record else {})}
        atomic_write_json(tmp / "state.json", _to_json_value(body))
        _fsync_dir(tmp)
        if final.exists():  # a previous checkpoint of the same step (e.g. re-saved after resuming)
            shutil.rmtree(final)
        os.rename(tmp, final)
        tmp = None
        _fsync_dir(root)
        atomic_write_json(root / "latest", {"step": step, "dir": final.name})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # Clean up: older checkpoints beyond `keep`, and temporary folders of interrupted saves.
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for s, p in steps[:-max(keep, 1)]:
        if s != step:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".step-") and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".fixed-") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
    _remove_unused_fixed(root)
    return final


def _remove_unused_fixed(root: Path) -> None:
    """Delete fixed-tensor files that no remaining checkpoint names (keep them all if a state.json is unreadable:
    better a stale file than a checkpoint without its tensors)."""
    used = set()
    for p in root.iterdir():
        if _STEP_DIR.match(p.name) and p.is_dir():
            try:
                state = read_json(p / "state.json", "checkpoint state")
            except CheckpointError:
                return
            record = state.get("fixed") if isinstance(state, dict) else None
            if isinstance(record, dict):
                used.add(record.get("name"))
    for p in root.iterdir():
        if _FIXED_FILE.match(p.name) and p.name not in used:
            p.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder the `latest` pointer names, or None when the run has no checkpoint yet.

    Raises CheckpointError if the pointer is corrupt or names a missing folder, or if checkpoint folders
    exist without a pointer (so that a damaged run is reported instead of silently restarted).
    """
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        if root.is_dir() and any(_STEP_DIR.match(p.name) for p in root.iterdir()):
            raise CheckpointError(f"{root} holds checkpoints but no 'latest' pointer; the run folder is damaged")
        return None
    info = read_json(pointer, "checkpoint pointer")
    if not isinstance(info, dict) or not isinstance(info.get("dir"), str) or not _STEP_DIR.match(info["dir"]):
        raise CheckpointError(f"checkpoint pointer {pointer} is corrupt: {info!r}")
    path = root / info["dir"]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint pointer {pointer} names {path}, which does not exist")
    return path


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True) -> dict:
    """Check a checkpoint folder's JSON, file sizes and (unless checksums=False) SHA-256 sums; return the parsed
    state.json."""
    path = Path(path)
    state_path = path / "state.json"
    if not state_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing")
    state = read_json(state_path, "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path} is not a rabit training checkpoint")
    if state.get("version") not in READS:
        raise CheckpointError(f"{state_path} has version {state.get('version')}, this rabit reads "
                              f"{', '.join(map(str, READS))}")
    files = state.get("files")
    if not isinstance(files, dict) or set(files) != {"model.safetensors", "optim.safetensors"}:
        raise CheckpointError(f"{state_path} is corrupt: bad 'files' entry")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (*files, "state.json") and p.name[0] != ".")
    if extra:   # something else wrote into the checkpoint (a bad copy, another checkpoint's file)
        raise CheckpointError(f"checkpoint {path} holds files it did not write: {', '.join(extra)}; remove them")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        _check_file(f, info, checksums)
    fixed_file(path, state, checksums)
    return _from_json_value(state)


def _check_file(f: Path, record: dict, checksums: bool) -> None:
    """A checkpoint file against its state.json record: its size, and its SHA-256 unless checksums=False."""
    from ..integrity_checkpoints import checkpoint_mismatch_message

    size = f.stat().st_size
    if size != record.get("size"):
        raise CheckpointError(checkpoint_mismatch_message(f, f"truncated or damaged: {size} bytes, "
                                                             f"expected {record.get('size')}"))
    if checksums and sha256_file(f) != record.get("sha256"):
        raise CheckpointError(checkpoint_mismatch_message(f, "SHA-256 does not match state.json"))


def fixed_file(path: Path, state: dict, checksums: bool = True) -> Path | None:
    """The shared fixed-tensor file a checkpoint's state.json names (checked: size, and SHA-256 unless
    checksums=False), or None when the checkpoint holds all its tensors itself."""
    record = state.get("fixed")
    if record is None:
        return None
    if not isinstance(record, dict) or not _FIXED_FILE.match(str(record.get("name"))):
        raise CheckpointError(f"{path / 'state.json'} is corrupt: bad 'fixed' entry")
    f = path.parent / record["name"]
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: its fixed tensors {f} are missing")
    _check_file(f, record, checksums)
    return f


def _read_safetensors(f: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            tensors = {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"checkpoint file {f} is unreadable: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a rabit training checkpoint file")
    return tensors, meta


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Verify and read a checkpoint folder (see verify_checkpoint; verify=False skips the SHA-256 sums)."""
    path = Path(path)
    state = verify_checkpoint(path, checksums=verify)
    model, meta = _read_safetensors(path / "model.safetensors")
    fixed = fixed_file(path, state, checksums=False)   # verified above
    if fixed is not None:
        tensors, _ = _read_safetensors(fixed)
        clash = sorted(set(tensors) & set(model))
        if clash:
            raise CheckpointError(f"checkpoint {path}: {clash[:5]} are both in model.safetensors and in {fixed.name}")
        model.update(tensors)
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'model.safetensors'} has corrupt metadata: {e}") from None
    for alias, target in aliases.items():
        if target not in model:
            raise CheckpointError(f"{path / 'model.safetensors'}: alias {alias} -> {target} names no tensor")
        model[alias] = model[target]
    optim, _ = _read_safetensors(path / "optim.safetensors")
    step = state.get("step")
    if not isinstance(step, int) or step < 0 or meta.get("step") != str(step):
        raise CheckpointError(f"checkpoint {path} is inconsistent: step {step!r} vs {meta.get('step')!r}")
    return Checkpoint(path, step, model, optim, state)
