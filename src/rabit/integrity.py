"""Checksums of what rabit saves, and their verification at load time.

Packed model folders (``rabit.save_quantized``): the last file written, ``model.safetensors``, carries in its
safetensors metadata under ``rabit_checksums`` a JSON record of every tensor (safetensors dtype, shape, SHA-256 of
its bytes) and of every other file of the folder (size, SHA-256): config.json, generation_config.json, the
tokenizer files. The record is inside the atomically written weights file, so it is never out of step with the
data it describes; config.json declares ``quantization_config.checksums = "sha256"`` so that a record lost to
damage is not mistaken for a folder written before checksums existed (those load with a one-line notice).

Training checkpoints (``rabit.train.checkpoint``): state.json already records the size and SHA-256 of both
safetensors files; each file's metadata also records its tensors (as above), so a mismatch names the tensor.
Distributed (DCP) checkpoints: state.json records the size and SHA-256 of every file DCP wrote, each rank hashing
its own files.

Why per-tensor xxh3-128: a per-tensor record lets the error name the damaged tensor, and tensors hash straight
from an mmap of the file. The digest guards against damage (bad copies, flaky disks, partial downloads), not
against tampering: whoever can rewrite the weights can rewrite their checksums too, so a cryptographic hash buys
nothing here, and SHA-256 (1.2 GB/s per core here) cost +50% of the default model's load time where xxh3-128
(~5x faster) stays under the 10% target (measured in docs/RESULTS.md). Records with "sha256" verify as well.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

ALGORITHM = "xxh3_128"
_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
METADATA_KEY = "rabit_checksums"
CONFIG_KEY = "checksums"          # quantization_config key: "sha256" when model.safetensors carries checksums
WEIGHTS_NAME = "model.safetensors"
_MAX_HEADER = 100_000_000
_log = logging.getLogger("rabit")
_skip = contextvars.ContextVar("rabit_skip_verification", default=False)

_TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _TORCH_TO_ST[getattr(torch, _name)] = _st
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class IntegrityError(ValueError):
    """A saved model or checkpoint does not match its checksums, or its structure is damaged."""


@dataclass
class Problem:
    file: str
    message: str
    tensor: str | None = None

    def __str__(self) -> str:
        return f"{self.file}: " + (f"tensor {self.tensor!r}: " if self.tensor else "") + self.message


@dataclass
class Report:
    """The outcome of verifying one saved folder or checkpoint."""

    path: Path
    kind: str                       # "model folder", "checkpoint", "DCP checkpoint"
    verified: bool = True           # False: written before checksums existed (structure checked only)
    problems: list[Problem] = field(default_factory=list)
    tensors: int = 0
    files: int = 0
    bytes: int = 0
    algorithm: str = ALGORITHM

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.problems:
            head = f"DAMAGED     {self.path} ({self.kind}): {len(self.problems)} problem(s)"
            return "\n".join([head] + [f"    {p}" for p in self.problems])
        what = f"{self.files} files" + (f", {self.tensors} tensors" if self.tensors else "") + \
            f", {self.bytes / 2**20:.1f} MiB"
        if not self.verified:
            return f"UNVERIFIED  {self.path} ({self.kind}): written before checksums existed; structure intact ({what})"
        return f"INTACT      {self.path} ({self.kind}): {self.algorithm} of {what} match"


# ------------------------------------------------------------------------------------------------ digests
def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def digest(data, algorithm: str = ALGORITHM) -> str:
    return _HASHES[algorithm](data).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22, algorithm: str = ALGORITHM) -> str:
    h = _HASHES[algorithm]()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> list:
    """[size, digest] of a file."""
    return [Path(path).stat().st_size, file_digest(path)]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_records(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """{name: [safetensors dtype, shape, digest of the bytes]} of in-memory tensors, as safetensors stores them."""
    def one(item):
        name, t = item
        if t.dtype not in _TORCH_TO_ST:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        return name, [_TORCH_TO_ST[t.dtype], list(t.shape), digest(_tensor_bytes(t))]

    with ThreadPoolExecutor(_workers()) as pool:
        return dict(pool.map(one, tensors.items()))


def checksum_metadata(tensors: dict[str, torch.Tensor], files: dict[str, str | os.PathLike] | None = None) -> dict:
    """The safetensors metadata entry recording `tensors` and the other `files` ({name in folder: path})."""
    record = {"algorithm": ALGORITHM, "tensors": tensor_records(tensors),
              "files": {name: file_record(p) for name, p in sorted((files or {}).items())}}
    return {METADATA_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))}


# ------------------------------------------------------------------------------------------- safetensors
@dataclass
class SafetensorsLayout:
    header: dict             # tensor name -> {"dtype", "shape", "data_offsets"}
    metadata: dict           # the __metadata__ strings
    data_start: int
    size: int


def read_layout(file: str | os.PathLike) -> SafetensorsLayout:
    """Parse and check a safetensors file's structure: header JSON, dtypes, shapes against byte ranges, ranges
    that tile the data section exactly, and a file size that is exactly header + data. IntegrityError otherwise."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{file}: not a valid safetensors file (truncated: {size} bytes, shorter "
                                     "than the 8-byte header length)")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > _MAX_HEADER:
                raise IntegrityError(f"{file}: truncated or damaged: header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise IntegrityError(f"{file} is missing") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{file}: damaged header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{file}: damaged header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise IntegrityError(f"{file}: damaged header (__metadata__ is not an object)")
    ranges = []
    for name, info in header.items():
        try:
            dt, shape, (b0, b1) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            b0, b1 = int(b0), int(b1)
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{file}: damaged header entry for tensor {name!r}") from None
        if dt not in _ST_SIZES:
            raise IntegrityError(f"{file}: tensor {name!r} has unknown dtype {dt!r} (damaged header)")
        numel = 1
        for s in shape:
            if s < 0:
                raise IntegrityError(f"{file}: tensor {name!r} has a negative dimension {shape} (damaged header)")
            numel *= s
        if b1 - b0 != numel * _ST_SIZES[dt]:
            raise IntegrityError(f"{file}: tensor {name!r}: shape {shape} x {dt} does not match its "
                                 f"{b1 - b0} bytes (damaged header)")
        ranges.append((b0, b1, name))
    pos = 0
    for b0, b1, name in sorted(ranges):
        if b0 != pos:
            raise IntegrityError(f"{file}: tensor {name!r} starts at byte {b0}, expected {pos} (damaged header)")
        pos = b1
    if 8 + n + pos != size:
        state = "truncated" if 8 + n + pos > size else "longer than its header declares"
        raise IntegrityError(f"{file}: {state}: the header declares {8 + n + pos} bytes, the file has {size} "
                             "(re-copy or re-save it)")
    return SafetensorsLayout(header, metadata, 8 + n, size)


def read_with_record(file: Path, report) -> tuple[SafetensorsLayout, dict | None] | None:
    """read_layout and recorded_checksums of `file`; a damaged file becomes a Problem in `report` (None)."""
    try:
        layout = read_layout(file)
        return layout, recorded_checksums(layout, file)
    except IntegrityError as e:
        report.problems.append(Problem(str(file), str(e).removeprefix(f"{file}: ")))
        return None


def recorded_checksums(layout: SafetensorsLayout, file) -> dict | None:
    """The checksum record in a safetensors file's metadata (None if there is none)."""
    text = layout.metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        if record.get("algorithm") not in _HASHES:
            raise IntegrityError(f"{file}: checksums use {record.get('algorithm')!r}; this rabit checks "
                                 f"{sorted(_HASHES)} (upgrade rabit)")
        if not isinstance(record["tensors"], dict) or not isinstance(record.get("files", {}), dict):
            raise TypeError
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise IntegrityError(f"{file}: the checksum record in its header is damaged") from None
    return record


def check_tensors(file: str | os.PathLike, layout: SafetensorsLayout, records: dict,
                  algorithm: str = ALGORITHM) -> list[Problem]:
    """Compare every tensor of a safetensors file with its record (names, dtypes, shapes, digests of the bytes)."""
    file = str(file)
    problems = [Problem(file, "recorded in the checksums but not in the file", name)
                for name in records if name not in layout.header]
    problems += [Problem(file, "in the file but not recorded in the checksums", name)
                 for name in layout.header if name not in records]
    todo = []
    for name, info in layout.header.items():
        rec = records.get(name)
        if rec is None:
            continue
        if not (isinstance(rec, list) and len(rec) == 3):
            problems.append(Problem(file, "its checksum record is damaged", name))
        elif rec[0] != info["dtype"] or list(rec[1]) != [int(s) for s in info["shape"]]:
            problems.append(Problem(file, f"header says {info['dtype']} {list(info['shape'])}, the checksums "
                                          f"recorded {rec[0]} {rec[1]}", name))
        else:
            todo.append((name, info["data_offsets"], rec[2]))
    if not todo:
        return problems
    with open(file, "rb") as f:
        if layout.size == layout.data_start:
            buf = b""
        else:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = memoryview(buf)

            def one(item):
                name, (b0, b1), want = item
                got = digest(view[layout.data_start + b0: layout.data_start + b1], algorithm)
                return None if got == want else Problem(file, f"{algorithm} of its data does not match the "
                                                              "recorded checksum (the bytes are damaged)", name)

            # one task per thread (hundreds of tiny tensors would cost more to dispatch than to hash), balanced
            # by bytes: largest first, each to the lightest group
            groups: list[list] = [[] for _ in range(min(_workers(), len(todo)))]
            loads = [0] * len(groups)
            for item in sorted(todo, key=lambda t: t[1][0] - t[1][1]):
                i = loads.index(min(loads))
                groups[i].append(item)
                loads[i] += item[1][1] - item[1][0]
            with ThreadPoolExecutor(len(groups)) as pool:
                for found in pool.map(lambda g: [p for p in map(one, g) if p is not None], groups):
                    problems += found
            view.release()
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()
    return problems


def damaged_tensors(file: str | os.PathLike) -> list[str]:
    """Names of the tensors of a safetensors file that differ from its own checksum record ([] if none/no record)."""
    try:
        layout = read_layout(file)
        record = recorded_checksums(layout, file)
    except IntegrityError:
        return []
    if record is None:
        return []
    return [p.tensor for p in check_tensors(file, layout, record["tensors"], record["algorithm"]) if p.tensor]


def check_files(folder: Path, records: dict, algorithm: str, where: str, report: Report, present: set[str],
                only=None) -> None:
    """Compare the files of `folder` with their records {name: [size, digest]}, kept in `where`; adds the problems
    (and the files checked) to `report`. only(name) -> bool restricts the check to some files."""
    for name, rec in records.items():
        if only is not None and not only(name):
            continue
        f = folder / name
        if name not in present:
            report.problems.append(Problem(str(f), f"missing (recorded in {where})"))
            continue
        report.files += 1
        size = f.stat().st_size
        report.bytes += size
        if not (isinstance(rec, list) and len(rec) == 2):
            report.problems.append(Problem(str(f), f"its checksum record in {where} is damaged"))
        elif size != rec[0]:
            report.problems.append(Problem(str(f), f"{size} bytes, {where} recorded {rec[0]} (truncated, replaced "
                                                   "or edited)"))
        elif file_digest(f, algorithm=algorithm) != rec[1]:
            what = "a config from another model, or edited" if name == "config.json" else "damaged or replaced"
            report.problems.append(Problem(str(f), f"{algorithm} does not match the checksum recorded in {where} "
                                                   f"({what})"))


# ---------------------------------------------------------------------------------------- model folders
# Files a user may add to a model folder that no loader reads (model cards, licences, VCS files).
def _is_doc(name: str) -> bool:
    low = name.lower()
    return name.startswith(".") or low.startswith(("readme", "license", "licence", "notice")) or low.endswith(".md")


def folder_files(path: Path) -> dict[str, Path]:
    """The files of a model folder that its checksums record: every regular file but the weights and docs."""
    return {p.name: p for p in sorted(path.iterdir())
            if p.is_file() and p.name != WEIGHTS_NAME and not _is_doc(p.name)}


def verify_model_folder(path: str | os.PathLike) -> Report:
    """Check a folder written by rabit.save_quantized against its checksums; every problem is reported."""
    path = Path(path)
    report = Report(path, "model folder")
    weights = path / WEIGHTS_NAME
    try:
        cfg = json.loads((path / "config.json").read_text())
        declared = (cfg.get("quantization_config") or {}).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError) as e:
        cfg, declared = None, None
        report.problems.append(Problem(str(path / "config.json"), f"unreadable ({type(e).__name__}: {e})"))
    read = read_with_record(weights, report)
    if read is None:
        return report
    layout, record = read
    report.tensors, report.bytes = len(layout.header), layout.size
    report.files = 1
    if record is None:
        if declared is not None or cfg is None:
            report.problems.append(Problem(str(weights), "its checksum record is missing, but config.json says it "
                                                         "was written with checksums (the header is damaged)"))
        else:
            report.verified = False
        return report
    if cfg is not None and declared != record["algorithm"]:
        report.problems.append(Problem(str(path / "config.json"), "does not declare the checksums that "
                                       "model.safetensors carries (config.json was replaced or edited)"))
    report.algorithm = record["algorithm"]
    report.problems += check_tensors(weights, layout, record["tensors"], record["algorithm"])
    present = folder_files(path)
    check_files(path, record.get("files", {}), record["algorithm"], "model.safetensors", report, set(present))
    for name in present:
        if name not in record.get("files", {}):
            report.problems.append(Problem(str(path / name), "extra file, not recorded in model.safetensors (not "
                                                             "written with this model; a loader may read it): remove it"))
    return report


_ADVICE = ("re-copy or re-download the folder, or re-save the model; to load it anyway (at your own risk) pass "
           "--no-verify (load_quantized(..., verify=False); around from_pretrained: "
           "`with rabit.integrity.verification_skipped():`)")


def check_model_folder(path: str | os.PathLike) -> Report:
    """verify_model_folder, raising IntegrityError on any problem; one-line notice for a folder without checksums.

    The quantization_config is validated first (a folder of a newer format says so rather than failing its
    checksums), and a missing weights file is left to the loader, whose error lists what the folder holds."""
    from .serialization import read_quantization_config

    read_quantization_config(path)
    if not (Path(path) / WEIGHTS_NAME).is_file():
        return Report(Path(path), "model folder", verified=False)
    report = verify_model_folder(path)
    if report.problems:
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more problem(s); `rabit verify {path}` lists them)" \
            if len(report.problems) > 1 else ""
        raise IntegrityError(f"{first}{more}. The model folder is damaged: {_ADVICE}")
    if not report.verified:
        _log.warning(f"rabit: {path} was saved before checksums existed and cannot be verified "
                     "(re-save it with rabit.save_quantized to add them)")
    return report


@contextlib.contextmanager
def verification_skipped(skip: bool = True):
    """Within the block, loading a rabit folder (e.g. AutoModelForCausalLM.from_pretrained) skips the checksums."""
    token = _skip.set(skip)
    try:
        yield
    finally:
        _skip.reset(token)


def check_on_load(folder: str | os.PathLike) -> None:
    """Called by the transformers quantizer before any weight is read (unless verification_skipped)."""
    if not _skip.get():
        check_model_folder(folder)
