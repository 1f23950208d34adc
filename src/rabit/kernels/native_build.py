"""Builds a C source of ``rabit/csrc`` into a shared library with the system C compiler on first use and loads it
with ctypes. Shared by the native backends (``cpu``: packed RaBiT layers; ``groupwise_cpu``: group-quantized
embeddings and heads), one library per source file.

Libraries are cached under ``rabit.paths.cache_root()/kernels/<hash>/`` (``~/.cache/rabit/kernels`` or
``$RABIT_CACHE/kernels``), falling back to the temporary directory when the cache is not writable; the hash covers
the source, the flags and the platform, so an edited source is rebuilt. When the compiler cannot build with OpenMP
the library is built without it (single-threaded) and a warning says so.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

from ..paths import cache_root

BASE_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off"]
# For the sources whose loops call rabit_exp.h's exp_nonpos: with gcc's default trapping math its clamp stays a
# branch and those loops scalar (docs/RESULTS.md section 33). The flag changes no value computed.
EXP_FLAGS = BASE_FLAGS + ["-fno-trapping-math"]


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _compile(cc: str, src: Path, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, str(src), "-o", tmp, "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, out)   # atomic: concurrent builders never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_error_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["unknown error"])[0][:300]


def build_library(src: Path, lib_name: str, flags: list[str], what: str) -> ctypes.CDLL:
    """Compile `src` (cached) and load it. Raises RuntimeError with the compiler's message when it cannot."""
    # the headers next to the source are part of what is compiled: an edited header must rebuild
    code = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))
    errors = []
    omp_error = "the library did not load"
    cc = compiler()
    for extra in (["-fopenmp"], []):      # retry without OpenMP (single-threaded) if it is missing
        all_flags = flags + extra
        key = hashlib.sha256(code + repr((all_flags, sys.platform, platform.machine())).encode()).hexdigest()[:16]
        roots = [cache_root() / "kernels", Path(tempfile.gettempdir()) / f"rabit-kernels-{os.getuid()}"]
        lib = None
        for root in roots:                # fall back to /tmp when the cache dir is not writable
            path = root / key / lib_name
            try:
                if not path.exists():
                    if cc is None:
                        raise RuntimeError("no C compiler found (install gcc or set CC)")
                    _compile(cc, src, all_flags, path)
                lib = ctypes.CDLL(str(path))
                break
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
                if extra and not isinstance(e, OSError):
                    omp_error = _first_error_line(str(e))
                if cc is None or not isinstance(e, OSError):
                    break                 # a compile error will not go away in another directory
        if lib is not None:
            break
    else:
        raise RuntimeError("\n".join(dict.fromkeys(errors)))
    if not extra:
        warnings.warn(f"{what} was built without OpenMP ({omp_error}): it runs on one thread, so "
                      "--threads / torch.set_num_threads do not speed it up; install OpenMP for your C compiler "
                      "(e.g. libgomp) to fix", RuntimeWarning, stacklevel=3)
    return lib


class LazyLibrary:
    """A library built and loaded on first use, once per process; a failure is remembered (and re-raised as
    RuntimeError) so that a missing compiler costs one attempt, not one per call."""

    def __init__(self, build: Callable[[], ctypes.CDLL], what: str) -> None:
        self._build, self._what = build, what
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL:
        if self.lib is not None:
            return self.lib
        if self.error is None:
            with self._lock:
                if self.lib is None and self.error is None:
                    try:
                        self.lib = self._build()
                    except Exception as e:  # noqa: BLE001
                        self.error = f"{self._what} unavailable: {e}"
        if self.lib is None:
            raise RuntimeError(self.error)
        return self.lib

    def is_available(self) -> bool:
        try:
            self.load()
            return True
        except RuntimeError:
            return False
