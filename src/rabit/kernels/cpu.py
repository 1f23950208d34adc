"""Native CPU backend: builds ``rabit/csrc/rabit_cpu.c`` with the system C compiler on first use (``native_build``:
cached under ``rabit.paths.cache_root()/kernels/<hash>/``) and calls it through ctypes.

The library has AVX-512, AVX2 and scalar code paths chosen at run time (``isa()``); threads come from OpenMP
(the same libgomp torch uses), ``torch.get_num_threads()`` of them by default. When the compiler cannot build
with OpenMP the kernel is built without it, single-threaded, and a warning says so.
"""
from __future__ import annotations

import ctypes
import os
import threading
import weakref
from pathlib import Path

import torch

from ..sign_bits import packed_shape
from . import native_build

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "rabit_cpu.c"
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ISA_NAMES = {0: "auto", 1: "scalar", 2: "avx2", 3: "avx512", 4: "avx512vbmi"}
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512vbmi": 4}

_lib = None


class _GemmArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p if n in ("x", "packed", "g", "h", "bias", "y", "packed_q8") else ctypes.c_int64)
                for n in ("x", "x_dt", "batch", "x_stride", "packed", "k", "out", "in_", "g", "g_dt", "h", "h_dt",
                          "bias", "bias_dt", "y", "y_dt", "y_stride", "nthreads", "isa", "lut8", "packed_q8")]


def _compiler() -> str | None:
    return native_build.compiler()


def _build_and_load():
    lib = native_build.build_library(_SRC, "librabit_cpu.so", native_build.BASE_FLAGS, "the rabit CPU kernel")
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.rabit_gemm_args.restype = i32
    lib.rabit_gemm_args.argtypes = [ctypes.POINTER(_GemmArgs)]
    lib.rabit_gemm.restype = i32
    lib.rabit_gemm.argtypes = [vp, i32, i64, i64, vp, i32, i64, i64, vp, i32, vp, i32, vp, i32,
                               vp, i32, i64, i32, i32, i32, vp]
    lib.rabit_q8_planar.restype = None
    lib.rabit_q8_planar.argtypes = [vp, i64, vp]
    lib.rabit_dense_rows.restype = i32
    lib.rabit_dense_rows.argtypes = [vp, i32, i64, i64, vp, i32, vp, i32, vp, i64, i64, i32, i32]
    lib.rabit_dense_weight.restype = i32
    lib.rabit_dense_weight.argtypes = [vp, i32, i64, i64, vp, i32, vp, i32, vp, i32, i32]
    lib.rabit_cpu_isa.restype = i32
    lib.rabit_has_openmp.restype = i32
    return lib


_library = native_build.LazyLibrary(_build_and_load, "rabit CPU kernel")


def load():
    """The ctypes library, building it if needed. Raises RuntimeError if it cannot be built."""
    global _lib
    if _lib is None:
        _lib = _library.load()   # the module-level handle is the dispatch's cheap "already built" check
    return _lib


def is_available() -> bool:
    """Whether the library builds; a successful check also sets the dispatch's "already built" handle."""
    if not _library.is_available():
        return False
    load()
    return True


def build_error() -> str | None:
    return None if is_available() else _library.error


def isa() -> str:
    """The SIMD level the kernel uses on this CPU: 'avx512vbmi', 'avx512', 'avx2' or 'scalar'."""
    return ISA_NAMES[load().rabit_cpu_isa()]


def has_openmp() -> bool:
    return bool(load().rabit_has_openmp())


def q8_planar(packed: torch.Tensor) -> torch.Tensor:
    """The sign planes in the "planar" layout the int8 lookup path reads (csrc/rabit_cpu.c): every 64-byte block
    of "tiled16x32" (16 rows x 32 inputs) reordered so that byte j of the 16 rows' words is contiguous. The same
    bytes, a second copy: "cpu_int8" holds it beside the module's packed signs (2x their memory)."""
    src = packed.contiguous()
    if src.dtype != torch.uint8 or src.numel() % 64:
        raise ValueError(f"packed signs must be uint8 in 64-byte blocks, got {src.dtype} with {src.numel()} bytes")
    dst = torch.empty_like(src)
    load().rabit_q8_planar(src.data_ptr(), src.numel() // 64, dst.data_ptr())
    return dst


def _check(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias):
    if g.dim() != 2 or h.dim() != 2:
        raise ValueError(f"g and h must be (k, out) and (k, in), got {tuple(g.shape)} and {tuple(h.shape)}")
    k, out, inf = g.shape[0], g.shape[-1], h.shape[-1]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != packed_shape(k, out, inf):
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


# From this many rows of x on, rabit_linear_cpu unpacks the weight (natively, blocks of rows) and uses torch's
# GEMM instead of the lookup-table kernel.  Measured on Zen 4 (1 core, k = 1..3, batch up to 512) the LUT kernel
# was always faster (~150 G sign-ops/s vs ~50-100 GFLOP/s for fp32 GEMM), so the default only kicks in for very
# long prompts; machines with much faster GEMMs (e.g. AMX) may want a lower value: $RABIT_CPU_DENSE_MIN_BATCH.
DENSE_MIN_BATCH = int(os.environ.get("RABIT_CPU_DENSE_MIN_BATCH", "1024"))


DENSE_BLOCK_BYTES = 4 << 20   # the dense path unpacks this many bytes of fp32 weight rows at a time
_tls = threading.local()


def _scratch(name: str, numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer reused across calls (fresh large allocations page-fault on every call)."""
    buf = getattr(_tls, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        setattr(_tls, name, buf)
    return buf[:numel]


def _dense_linear(lib, x2, packed, g, h, bias, nt, isa, out):
    """Large batches: unpack blocks of weight rows natively into a reused buffer and multiply with torch."""
    batch, inf = x2.shape
    k, nout = g.shape
    rows = max(16, min(-(-nout // 16) * 16, DENSE_BLOCK_BYTES // (4 * inf) // 16 * 16))
    wbuf = _scratch("w", rows * inf)
    tbuf = _scratch("t", batch * rows)
    xf = x2.float()
    y = out if out is not None else torch.empty(batch, nout, dtype=x2.dtype)
    bf = None if bias is None else bias.float()
    for r0 in range(0, nout, rows):
        r1 = min(nout, r0 + rows)
        n = r1 - r0
        w = wbuf[: n * inf].view(n, inf)
        rc = lib.rabit_dense_rows(packed.data_ptr(), k, nout, inf, g.data_ptr(), _DT[g.dtype], h.data_ptr(),
                                  _DT[h.dtype], w.data_ptr(), r0, r1, nt, ISA_CODES[isa])
        if rc != 0:
            raise RuntimeError(f"rabit_dense_rows failed (code {rc})")
        t = tbuf[: batch * n].view(batch, n)
        if bf is None:
            torch.mm(xf, w.t(), out=t)
        else:
            torch.addmm(bf[r0:r1], xf, w.t(), out=t)
        y[:, r0:r1].copy_(t)
    return y


def rabit_linear_cpu(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                     bias: torch.Tensor | None = None, num_threads: int | None = None,
                     isa: str = "auto", out: torch.Tensor | None = None,
                     dense_min_batch: int | None = None, lut8: bool = False) -> torch.Tensor:
    """Native kernel; x (..., in) in fp32/bf16/fp16 -> y (..., out) in x.dtype (computed in fp32).

    lut8: one input row uses int8 lookup tables (the backend "cpu_int8": h * x rounded per 64 inputs, relative
    error ~5e-3, fewer instructions); more rows run the exact path."""
    lib = _lib if _lib is not None else load()
    k, nout, inf = _check(x, packed, g, h, bias)
    x2 = x.reshape(-1, inf)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    batch = x2.shape[0]
    nt = torch.get_num_threads() if num_threads is None else num_threads
    if batch >= (DENSE_MIN_BATCH if dense_min_batch is None else dense_min_batch):
        y = _dense_linear(lib, x2, packed.contiguous(), g.contiguous(), h.contiguous(), bias, nt, isa, out)
        return y.reshape(*x.shape[:-1], nout)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if not g.is_contiguous():
        g = g.contiguous()
    if not h.is_contiguous():
        h = h.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if out is None:
        out = torch.empty(batch, nout, dtype=x.dtype)
    elif tuple(out.shape) != (batch, nout) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("bad `out` tensor")
    # one row through int8 tables reads the planar copy; made per call here (a pass over the signs), kept by a plan
    planar = q8_planar(packed) if lut8 and batch == 1 else None
    rc = lib.rabit_gemm(x2.data_ptr(), _DT[x.dtype], batch, x2.stride(0) if batch > 1 else inf,
                        packed.data_ptr(), k, nout, inf,
                        g.data_ptr(), _DT[g.dtype], h.data_ptr(), _DT[h.dtype],
                        bias.data_ptr() if bias is not None else None,
                        _DT[bias.dtype] if bias is not None else 0,
                        out.data_ptr(), _DT[x.dtype], nout, nt, ISA_CODES[isa], int(lut8),
                        planar.data_ptr() if planar is not None else None)
    if rc != 0:
        raise RuntimeError(f"rabit_gemm failed (code {rc})")
    return out.reshape(*x.shape[:-1], nout)


class CpuLinearPlan:
    """A prepared call of the native kernel for fixed (packed, g, h, bias): validates once, then each call only
    reshapes x, allocates y and calls C (saves ~5 us of Python per call versus ``rabit_linear_cpu``).
    Holds references to the tensors; rebuild it if they are replaced (not needed when modified in place, except
    for the signs of a lut8 plan: it reads a copy of them taken here)."""

    __slots__ = ("packed", "packed_q8", "g", "h", "bias", "k", "out_features", "in_features", "isa", "lut8", "_fn",
                 "_args", "_pargs", "_lock")

    def __init__(self, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None,
                 isa: str = "auto", lut8: bool = False):
        lib = load()
        k, nout, inf = _check(torch.empty(1, h.shape[-1]), packed, g, h, bias)
        self.packed, self.g, self.h = packed.contiguous(), g.contiguous(), h.contiguous()
        self.bias = bias.contiguous() if bias is not None else None
        self.k, self.out_features, self.in_features, self.isa = k, nout, inf, ISA_CODES[isa]
        self._fn = lib.rabit_gemm_args
        b = self.bias
        a = self._args = _GemmArgs()
        a.packed, a.k, a.out, a.in_ = self.packed.data_ptr(), k, nout, inf
        a.g, a.g_dt, a.h, a.h_dt = self.g.data_ptr(), _DT[g.dtype], self.h.data_ptr(), _DT[h.dtype]
        a.bias, a.bias_dt = (b.data_ptr(), _DT[b.dtype]) if b is not None else (None, 0)
        a.y_stride, a.isa = nout, self.isa
        self.lut8 = a.lut8 = int(bool(lut8))
        # lut8: the signs' planar copy for one-row calls (more rows read self.packed)
        self.packed_q8 = q8_planar(self.packed) if lut8 else None
        a.packed_q8 = self.packed_q8.data_ptr() if lut8 else None
        self._pargs = ctypes.byref(a)
        self._lock = threading.Lock()   # the argument struct is shared: one call at a time per plan

    def __call__(self, x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
        inf = self.in_features
        dt = _DT.get(x.dtype)
        if dt is None or not x.is_cpu or x.shape[-1] != inf:
            raise ValueError(f"bad input: {x.dtype} {tuple(x.shape)} on {x.device} (expected (..., {inf}) on CPU)")
        x2 = x if x.dim() == 2 else x.reshape(-1, inf)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        batch = x2.shape[0]
        nt = torch.get_num_threads() if num_threads is None else num_threads
        if batch >= DENSE_MIN_BATCH:
            return rabit_linear_cpu(x, self.packed, self.g, self.h, self.bias, num_threads=nt,
                                    isa=ISA_NAMES.get(self.isa, "auto"), lut8=bool(self.lut8))
        y = torch.empty(batch, self.out_features, dtype=x.dtype)
        a = self._args
        with self._lock:
            a.x, a.x_dt, a.batch, a.x_stride = x2.data_ptr(), dt, batch, x2.stride(0) if batch > 1 else inf
            a.y, a.y_dt, a.nthreads = y.data_ptr(), dt, nt
            rc = self._fn(self._pargs)
        if rc != 0:
            raise RuntimeError(f"rabit_gemm failed (code {rc})")
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def row_fn(self, num_threads: int, reuse_output: bool = False):
        """``x -> self(x, num_threads)`` for the one-row calls of a decoding loop with less Python per call (~3 of
        ~6 us): its own argument struct (no lock), the row's fields set once. The result has x's leading dimensions,
        as __call__'s. reuse_output: every call returns the same output storage, overwritten by the next call, for a
        loop that consumes each result before it calls again (saves the allocation). Inputs other than one
        contiguous fp32 CPU row of shape (1, in) or (1, 1, in) go through __call__ (and get a new tensor)."""
        a = _GemmArgs.from_buffer_copy(self._args)
        inf, nout, nt = self.in_features, self.out_features, int(num_threads)
        a.x_dt, a.batch, a.x_stride, a.y_dt, a.y_stride, a.nthreads = _DT[torch.float32], 1, inf, _DT[torch.float32], \
            nout, nt
        # the closure holds the plan (whose tensors the struct points into) and the struct itself
        fn, pargs, f32 = self._fn, ctypes.byref(a), torch.float32
        out3 = torch.empty(1, 1, nout) if reuse_output else None
        outs = {3: out3, 2: out3.view(1, nout)} if reuse_output else None

        def call(x: torch.Tensor) -> torch.Tensor:
            nd = x.dim()
            if x.dtype is not f32 or x.numel() != inf or not 2 <= nd <= 3 or not x.is_contiguous() or not x.is_cpu:
                return self(x, nt)
            y = outs[nd] if outs is not None else torch.empty((1, 1, nout) if nd == 3 else (1, nout))
            a.x, a.y = x.data_ptr(), y.data_ptr()
            rc = fn(pargs)
            if rc != 0:
                raise RuntimeError(f"rabit_gemm failed (code {rc})")
            return y

        return call


class _CachedPlan:
    """A CpuLinearPlan for the tensors (packed, g, h, bias), valid while those very objects live and keep their
    storage. The plan holds aliases (``detach()``) of their storage, never the objects themselves, so that the
    objects can die (a module's buffers replaced by ``.to()``, a model deleted) and take their entry with them."""

    __slots__ = ("refs", "ptrs", "signs_version", "plan", "__weakref__")

    def __init__(self, tensors: tuple, plan: CpuLinearPlan, on_death):
        self.refs = tuple(weakref.ref(t, on_death) if t is not None else None for t in tensors)
        self.ptrs = tuple(t.data_ptr() if t is not None else 0 for t in tensors)
        # a lut8 plan reads its own copy of the signs: in-place writes to them make it stale (inference tensors
        # have no version counter; writing them in place, possible only under inference_mode, goes unnoticed)
        copies = getattr(plan, "packed_q8", None) is not None and not tensors[0].is_inference()
        self.signs_version = tensors[0]._version if copies else None
        self.plan = plan

    def matches(self, packed, g, h, bias) -> bool:
        r = self.refs
        return (r[0]() is packed and r[1]() is g and r[2]() is h
                and (bias is None if r[3] is None else r[3]() is bias)
                and self.ptrs == (packed.data_ptr(), g.data_ptr(), h.data_ptr(),
                                  bias.data_ptr() if bias is not None else 0)
                and (self.signs_version is None or packed._version == self.signs_version))


_plans: dict[tuple, _CachedPlan] = {}   # (id(packed), lut8) -> its plan


def _plan_for(packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
              lut8: bool = False) -> CpuLinearPlan:
    key = (id(packed), bool(lut8))
    entry = _plans.get(key)
    if entry is not None and entry.matches(packed, g, h, bias):
        return entry.plan
    plan = CpuLinearPlan(packed.detach(), g.detach(), h.detach(), bias.detach() if bias is not None else None,
                         lut8=lut8)
    this: list = []

    def on_death(_ref, key=key, this=this, plans=_plans):   # one of the tensors was freed: forget its plan
        entry = this[0]() if this else None
        if entry is not None and plans.get(key) is entry:
            plans.pop(key, None)

    entry = _CachedPlan((packed, g, h, bias), plan, on_death)
    this.append(weakref.ref(entry))
    _plans[key] = entry
    return plan


def linear(x: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
           bias: torch.Tensor | None = None, num_threads: int | None = None, lut8: bool = False) -> torch.Tensor:
    """``rabit_linear_cpu`` with the checks and argument conversions done once per (packed, g, h, bias): the
    prepared call (a ``CpuLinearPlan``) is cached for as long as these tensors live. The backends "cpu" and
    (lut8=True) "cpu_int8" of ``rabit.kernels.rabit_linear``."""
    return _plan_for(packed, g, h, bias, lut8)(x, num_threads)


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
