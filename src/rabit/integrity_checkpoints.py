"""Verification of training checkpoints (single-process and DCP) and of whole run folders; see rabit.integrity.

Single-process checkpoints (rabit.train.checkpoint) record the size and SHA-256 of their two safetensors files in
state.json, and each file records its tensors in its own metadata (rabit.integrity.checksum_metadata), so a
mismatch names the damaged tensors. DCP checkpoints (rabit.train.distributed) record the size and SHA-256 of every
file DCP wrote in state.json ("checksums": {"algorithm", "files"}), each rank hashing the files it wrote.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from .integrity import (_HASHES, ALGORITHM, WEIGHTS_NAME, IntegrityError, Problem, Report, check_files,
                        check_tensors, damaged_tensors, file_record, read_layout, read_with_record,
                        verify_model_folder)

_log = logging.getLogger("rabit")

_CHECKPOINT_ADVICE = ("the checkpoint cannot be trusted: restore it from a copy, or start the run again with "
                      "--overwrite; --resume --no-verify skips this check (at your own risk)")


def checkpoint_mismatch_message(file: Path, what: str) -> str:
    """The error for a checkpoint file whose digest does not match state.json, naming the damaged tensors."""
    names = damaged_tensors(file)
    where = f" (damaged tensor{'s' if len(names) > 1 else ''}: {', '.join(names[:5])}" + \
        (f" and {len(names) - 5} more)" if len(names) > 5 else ")") if names else ""
    return f"checkpoint file {file} is corrupt: {what}{where}; {_CHECKPOINT_ADVICE}"


def verify_checkpoint_folder(path: str | os.PathLike) -> Report:
    """Check a single-process training checkpoint (rabit.train.checkpoint) against state.json."""
    from .train.checkpoint import CheckpointError, verify_checkpoint

    path = Path(path)
    report = Report(path, "checkpoint", algorithm="sha256")
    try:
        state = verify_checkpoint(path)
    except CheckpointError as e:
        report.problems.append(Problem(str(path), str(e)))
        return report
    files = [path / name for name in state["files"]]
    if state.get("fixed"):   # the tensors that do not train, shared by the run's checkpoints (verified above)
        files.append(path.parent / state["fixed"]["name"])
    for f in files:
        report.files += 1
        report.bytes += f.stat().st_size
        with contextlib.suppress(IntegrityError):
            report.tensors += len(read_layout(f).header)
    return report


_DCP_DATA = ("__", ".distcp")


def _dcp_owner(name: str, world: int) -> int:
    """The rank that hashes a DCP file: the rank that wrote __{rank}_{i}.distcp, rank 0 for the rest."""
    if name.startswith(_DCP_DATA[0]) and name.endswith(_DCP_DATA[1]):
        with contextlib.suppress(ValueError, IndexError):
            return int(name[2:].split("_")[0]) % world
    return 0


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def dcp_checksums(folder: str | os.PathLike) -> dict:
    """{"algorithm", "files": {name: [size, digest]}} of every file in a DCP checkpoint folder (collective when
    torch.distributed is initialized: each rank hashes the files it wrote, so the cost is split; every rank gets
    the whole record)."""
    folder = Path(folder)
    rank, world = _rank_world()
    mine = {p.name: file_record(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "state.json" and _dcp_owner(p.name, world) == rank}
    merged: dict[str, list] = {}
    for part in _all_gather(mine):
        merged.update(part)
    return {"algorithm": ALGORITHM, "files": dict(sorted(merged.items()))}


def verify_dcp_folder(path: str | os.PathLike, share: tuple[int, int] = (0, 1)) -> Report:
    """Check a DCP checkpoint folder against the files recorded in its state.json; share=(rank, world) checks
    only the files that rank hashes (the structure checks are done by rank 0)."""
    path = Path(path)
    rank, world = share
    report = Report(path, "DCP checkpoint")
    try:
        state = json.loads((path / "state.json").read_text())
        checksums = state.get("checksums")
        records = None if checksums is None else checksums["files"]
        algorithm = None if checksums is None else checksums["algorithm"]
        if records is not None and (not isinstance(records, dict) or algorithm not in _HASHES):
            raise ValueError("bad 'checksums' entry")
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        report.problems.append(Problem(str(path / "state.json"), f"missing or damaged ({e})"))
        return report
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != "state.json"}
    if records is None:
        report.verified = False
        if ".metadata" not in present:
            report.problems.append(Problem(str(path / ".metadata"), "missing"))
        return report
    check_files(path, records, algorithm, "state.json", report, present,
                only=lambda name: _dcp_owner(name, world) == rank)
    if rank == 0:
        report.problems += [Problem(str(path / n), "extra file, not recorded in state.json") for n in
                            sorted(present - set(records))]
    return report


def check_dcp_folder(path: str | os.PathLike) -> None:
    """verify_dcp_folder split over the ranks (collective when distributed); CheckpointError on every rank if any
    file is damaged, a one-line notice (rank 0) for a checkpoint written before checksums existed."""
    from .train.checkpoint import CheckpointError

    rank, world = _rank_world()
    report = verify_dcp_folder(path, (rank, world))
    problems = [str(p) for part in _all_gather([str(p) for p in report.problems]) for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}; {_CHECKPOINT_ADVICE}")
    if not report.verified and rank == 0:
        _log.warning(f"rabit: checkpoint {path} was written before checksums existed and cannot be verified")


# -------------------------------------------------------------------------------------------- any path
def _state_format(path: Path) -> str | None:
    try:
        return json.loads((path / "state.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _is_model_folder(path: Path) -> bool:
    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return (path / WEIGHTS_NAME).is_file() and (path / "config.json").exists()


def verify_state_dict_file(file: Path) -> Report:
    """A standalone safetensors file (a run's final model.safetensors) against its own checksum record."""
    report = Report(file, "state dict")
    read = read_with_record(file, report)
    if read is None:
        return report
    layout, record = read
    report.files, report.tensors, report.bytes = 1, len(layout.header), layout.size
    if record is None:
        report.verified = False
    else:
        report.algorithm = record["algorithm"]
        report.problems += check_tensors(file, layout, record["tensors"], record["algorithm"])
    return report


def _named_fixed_folder(step: Path) -> list[Report]:
    """The report of the fixed-N folder (the parameters that do not train) a DCP checkpoint's state.json names,
    a problem if it is missing; nothing for a checkpoint that names none (version 1)."""
    try:
        fixed = json.loads((step / "state.json").read_text()).get("fixed")
    except (OSError, ValueError, AttributeError):
        return []   # verify_dcp_folder reports the damaged state.json
    if not fixed:
        return []
    folder = step.parent / str(fixed)
    if not (folder / "state.json").is_file():
        return [Report(folder, "DCP checkpoint", problems=[Problem(str(folder), f"missing (named by {step.name})")])]
    return [verify_dcp_folder(folder)]


def verify_path(path: str | os.PathLike) -> list[Report]:
    """Verify a model folder, a checkpoint folder, or a run folder (every checkpoint, the final state dict and the
    packed model in it). FileNotFoundError / ValueError if `path` is none of these."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: rabit verify checks folders and .safetensors files")
        return [verify_state_dict_file(path)]
    fmt = _state_format(path)
    if fmt is None and path.name.startswith("step-"):   # a checkpoint whose state.json is damaged
        fmt = "rabit-dcp-checkpoint" if (path / ".metadata").exists() or path.parent.name == "dcp" \
            else "rabit-train-checkpoint"
    if fmt == "rabit-train-checkpoint":
        return [verify_checkpoint_folder(path)]
    if fmt == "rabit-dcp-checkpoint":
        return [verify_dcp_folder(path)] + _named_fixed_folder(path)
    if fmt == "rabit-dcp-fixed":
        return [verify_dcp_folder(path)]
    if _is_model_folder(path):
        return [verify_model_folder(path)]
    reports: list[Report] = []
    for sub, verify in (("checkpoints", verify_checkpoint_folder), ("dcp", verify_dcp_folder)):
        root = path / sub
        if root.is_dir():
            steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
            if not steps:
                reports.append(Report(root, "checkpoints", problems=[Problem(str(root), "no checkpoint in it")]))
            # a DCP run's parameters that do not train sit in fixed-N folders the checkpoints share
            fixed = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("fixed-")) \
                if sub == "dcp" else []
            reports += [verify(p) for p in steps + fixed]
    if reports or (path / "run.json").is_file():
        if (path / WEIGHTS_NAME).is_file():
            reports.append(verify_state_dict_file(path / WEIGHTS_NAME))
        if (path / "quantized").is_dir():
            reports.append(verify_model_folder(path / "quantized"))
        return reports
    raise ValueError(f"{path} is not a rabit model folder, checkpoint or run folder")
