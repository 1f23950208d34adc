"""Native CPU backend: builds ``rabit/csrc/rabit_cpu.c`` with the system C compiler on first use (cached under
``$RABIT_CACHE_DIR`` or ``~/.cache/rabit/kernels/<hash>/``) and calls it through ctypes.

The library has AVX-512, AVX2 and scalar code paths chosen at run time (``isa()``); threads come from OpenMP
(the same libgomp torch uses), ``torch.get_num_threads()`` of them by default.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..packing import padded_in, padded_out

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "rabit_cpu.c"
_BASE_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off"]
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ISA_NAMES = {1: "scalar", 2: "avx2", 3: "avx512"}
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}

_lock = threading.Lock()
_lib = None
_error: str | None = None


def _cache_root() -> Path:
    env = os.environ.get("RABIT_CACHE_DIR")
    if env:
        return Path(env) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rabit" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _compile(cc: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, str(_SRC), "-o", tmp, "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, out)   # atomic: concurrent builders never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_load():
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = _SRC.read_bytes()
    errors = []
    for extra in (["-fopenmp"], []):      # retry without OpenMP (single-threaded) if it is missing
        flags = _BASE_FLAGS + extra
        try:
            ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        except Exception:  # noqa: BLE001
            ver = ""
        key = hashlib.sha256(src + repr((flags, ver, sys.platform)).encode()).hexdigest()[:16]
        path = _cache_root() / key / "librabit_cpu.so"
        try:
            if not path.exists():
                _compile(cc, flags, path)
            lib = ctypes.CDLL(str(path))
            break
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
    else:
        raise RuntimeError("\n".join(errors))
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.rabit_gemm.restype = i32
    lib.rabit_gemm.argtypes = [vp, i32, i64, i64, vp, i32, i64, i64, vp, i32, vp, i32, vp, i32,
                               vp, i32, i64, i32, i32]
    lib.rabit_dense_weight.restype = i32
    lib.rabit_dense_weight.argtypes = [vp, i32, i64, i64, vp, i32, vp, i32, vp, i32, i32]
    lib.rabit_cpu_isa.restype = i32
    lib.rabit_has_openmp.restype = i32
    return lib


def load():
    """The ctypes library, building it if needed. Raises RuntimeError if it cannot be built."""
    global _lib, _error
    if _lib is not None:
        return _lib
    if _error is not None:
        raise RuntimeError(_error)
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build_and_load()
            except Exception as e:  # noqa: BLE001
                _error = f"rabit CPU kernel unavailable: {e}"
    if _lib is None:
        raise RuntimeError(_error)
    return _lib


def is_available() -> bool:
    try:
        load()
        return True
    except RuntimeError:
        return False


def build_error() -> str | None:
    return None if is_available() else _error


def isa() -> str:
    """The SIMD level the kernel uses on this CPU: 'avx512', 'avx2' or 'scalar'."""
    return ISA_NAMES[load().rabit_cpu_isa()]


def has_openmp() -> bool:
    return bool(load().rabit_has_openmp())


def _check(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias):
    k, out, inf = g.shape[0], g.shape[-1], h.shape[-1]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (k, padded_out(out) // 16, padded_in(inf) // 8, 16):
        raise ValueError(f"packed signs {packed.dtype} {tuple(packed.shape)} do not match k={k}, out={out}, in={inf}")
    if h.shape[0] != k or x.shape[-1] != inf:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, g {tuple(g.shape)}, h {tuple(h.shape)}")
    for t in (x, packed, g, h) + ((bias,) if bias is not None else ()):
        if t.device.type != "cpu":
            raise ValueError("cpu backend needs CPU tensors")
    for t in (x, g, h) + ((bias,) if bias is not None else ()):
        if t.dtype not in _DT:
            raise TypeError(f"unsupported dtype {t.dtype}")
    return k, out, inf


def rabit_linear_cpu(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                     bias: torch.Tensor | None = None, num_threads: int | None = None,
                     isa: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Native LUT kernel; x (..., in) in fp32/bf16/fp16 -> y (..., out) in x.dtype (computed in fp32)."""
    lib = load()
    k, nout, inf = _check(x, packed, g, h, bias)
    x2 = x.reshape(-1, inf)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed = packed.contiguous()
    g = g.contiguous()
    h = h.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    batch = x2.shape[0]
    if out is None:
        out = torch.empty(batch, nout, dtype=x.dtype)
    elif out.shape != (batch, nout) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("bad `out` tensor")
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.rabit_gemm(x2.data_ptr(), _DT[x.dtype], batch, x2.stride(0) if batch > 1 else inf,
                        packed.data_ptr(), k, nout, inf,
                        g.data_ptr(), _DT[g.dtype], h.data_ptr(), _DT[h.dtype],
                        bias.data_ptr() if bias is not None else None,
                        _DT[bias.dtype] if bias is not None else 0,
                        out.data_ptr(), _DT[x.dtype], nout, nt, ISA_CODES[isa])
    if rc != 0:
        raise RuntimeError(f"rabit_gemm failed (code {rc})")
    return out.reshape(*x.shape[:-1], nout)


def dense_weight_cpu(packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, num_threads: int | None = None,
                     isa: str = "auto") -> torch.Tensor:
    """The dense fp32 weight sum_i g_i B_i h_i (out, in), computed natively."""
    lib = load()
    k, nout, inf = g.shape[0], g.shape[-1], h.shape[-1]
    _check(torch.empty(1, inf), packed, g, h, None)
    packed, g, h = packed.contiguous(), g.contiguous(), h.contiguous()
    w = torch.empty(nout, inf, dtype=torch.float32)
    nt = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.rabit_dense_weight(packed.data_ptr(), k, nout, inf, g.data_ptr(), _DT[g.dtype],
                                h.data_ptr(), _DT[h.dtype], w.data_ptr(), nt, ISA_CODES[isa])
    if rc != 0:
        raise RuntimeError(f"rabit_dense_weight failed (code {rc})")
    return w
