import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rabit import kernels, sign_bits
from rabit.kernels import cpu as cpu_backend
from rabit.kernels.reference import (LUT8_BLOCK, LUT8_MAX, dense_weight_reference, rabit_linear_lut8_reference,
                                    rabit_linear_reference)
from rabit.packed_layer import PackedRaBiTLinear

SRC = str(Path(__file__).resolve().parents[1] / "src")
IN_SIZES = [1, 7, 33, 100, 577]
OUT_SIZES = [1, 5, 63, 129]
CPU_OK = cpu_backend.is_available()
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _cpu_skip_reason() -> str | None:
    """Only a machine without any C compiler may skip the native-kernel tests (and not in CI): a compiler that
    fails on rabit's C source is a bug, so the tests then run and fail with the build error."""
    if CPU_OK or IN_CI or cpu_backend._compiler() is not None:
        return None
    return f"no C compiler on this machine ({cpu_backend.build_error()})"


CPU_SKIP = _cpu_skip_reason()
needs_cpu = pytest.mark.skipif(CPU_SKIP is not None, reason=CPU_SKIP or "")


def make(k, out, inf, batch, seed=0, bias=True, x_dtype=torch.float32, scale_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    B = torch.where(torch.rand(k, out, inf, generator=gen) > 0.5, 1.0, -1.0)
    g = (torch.rand(k, out, generator=gen) + 0.1).to(scale_dtype)
    h = (torch.randn(k, inf, generator=gen)).to(scale_dtype)      # signed h on purpose
    b = torch.randn(out, generator=gen).to(scale_dtype) if bias else None
    x = torch.randn(batch, inf, generator=gen).to(x_dtype)
    return x, B, g, h, b


def exact(x, B, g, h, b):
    """float64 sum_i g_i * ((h_i * x) @ B_i^T) + b, straight from the unpacked signs."""
    x, B, g, h = x.double(), B.double(), g.double(), h.double()
    y = sum(((x * h[i]) @ B[i].T) * g[i] for i in range(B.shape[0]))
    return y + b.double() if b is not None else y


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- reference
@pytest.mark.parametrize("k", [1, 2, 3])
def test_reference_is_exact(k):
    x, B, g, h, b = make(k, 63, 100, 3, seed=k)
    P = sign_bits.pack_signs(B)
    assert rel_err(rabit_linear_reference(x, P, g, h, b), exact(x, B, g, h, b)) < 1e-6
    W = dense_weight_reference(P, g, h, dtype=torch.float64)
    assert torch.allclose(W, sum(g[i].double()[:, None] * B[i].double() * h[i].double() for i in range(k)))


# ---------------------------------------------------------------- CPU kernel
@needs_cpu
def test_cpu_kernel_builds():
    assert CPU_OK, cpu_backend.build_error()


@needs_cpu
@pytest.mark.parametrize("inf", IN_SIZES)
@pytest.mark.parametrize("out", OUT_SIZES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cpu_gemv_fp32(inf, out, k):
    x, B, g, h, b = make(k, out, inf, 1, seed=inf * 7 + out * 3 + k)
    P = sign_bits.pack_signs(B)
    y = cpu_backend.rabit_linear_cpu(x, P, g, h, b)
    assert y.dtype == torch.float32 and y.shape == (1, out)
    assert rel_err(y, exact(x, B, g, h, b)) < 1e-5


@needs_cpu
@pytest.mark.parametrize("batch", [2, 3, 5, 8, 13])
@pytest.mark.parametrize("inf,out,k", [(577, 129, 2), (33, 63, 3), (100, 5, 1), (7, 129, 2)])
def test_cpu_batched_fp32(batch, inf, out, k):
    x, B, g, h, b = make(k, out, inf, batch, seed=batch + inf)
    P = sign_bits.pack_signs(B)
    assert rel_err(cpu_backend.rabit_linear_cpu(x, P, g, h, b), exact(x, B, g, h, b)) < 1e-5


@needs_cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vbmi"])
@pytest.mark.parametrize("batch", [1, 6])
def test_cpu_every_isa(isa, batch):
    """Each code path (capped at what the CPU supports) on odd shapes and partial tiles/groups."""
    for (k, out, inf) in [(2, 129, 577), (3, 5, 7), (1, 70, 64), (2, 200, 100)]:
        x, B, g, h, b = make(k, out, inf, batch, seed=out + inf)
        P = sign_bits.pack_signs(B)
        y = cpu_backend.rabit_linear_cpu(x, P, g, h, b, isa=isa)
        assert rel_err(y, exact(x, B, g, h, b)) < 1e-5, (isa, k, out, inf)
        W = cpu_backend.dense_weight_cpu(P, g, h, isa=isa)
        assert torch.allclose(W.double(), dense_weight_reference(P, g, h, torch.float64), atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vbmi"])
def test_cpu_every_input_position(isa):
    """One-hot inputs at each of 70 positions (two full words and a partial third): y = sum_i g_i * B_i[:, j] * h_i[j]
    exactly, so each input lands in its own lookup group and table entry (the AVX2 path groups 3 inputs, 10 per
    word plus a group of 2 at bits 30-31; the others 4). 1 and 2 threads, batch 1 and 3."""
    k, out, inf = 2, 37, 70
    _, B, g, h, b = make(k, out, inf, 1, seed=5)
    P = sign_bits.pack_signs(B)
    for j in range(inf):
        x = torch.zeros(3, inf)
        x[0, j], x[1, j], x[2, (j + 1) % inf] = 1.5, -0.25, 2.0
        ref = exact(x, B, g, h, b)
        for nt in (1, 2):
            y = cpu_backend.rabit_linear_cpu(x, P, g, h, b, isa=isa, num_threads=nt)
            assert rel_err(y, ref) < 1e-6, (isa, j, nt)
            y1 = cpu_backend.rabit_linear_cpu(x[:1], P, g, h, b, isa=isa, num_threads=nt)
            assert rel_err(y1, ref[:1]) < 1e-6, (isa, j, nt)


@needs_cpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_cpu_half_dtypes(x_dtype, scale_dtype, batch):
    x, B, g, h, b = make(2, 129, 577, batch, seed=5, x_dtype=x_dtype, scale_dtype=scale_dtype)
    P = sign_bits.pack_signs(B)
    y = cpu_backend.rabit_linear_cpu(x, P, g, h, b)
    assert y.dtype == x_dtype
    ref = exact(x, B, g, h, b)                      # same (rounded) inputs, exact arithmetic
    # computed in fp32, rounded once to x's dtype on output
    tol = 2 ** -8 if x_dtype == torch.bfloat16 else 2 ** -11
    assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-4 * ref.abs().max()).all()


@needs_cpu
def test_cpu_dense_path_and_shapes():
    x, B, g, h, b = make(2, 63, 100, 40, seed=9)
    P = sign_bits.pack_signs(B)
    ref = exact(x, B, g, h, b)
    y_dense = cpu_backend.rabit_linear_cpu(x, P, g, h, b, dense_min_batch=1)
    y_lut = cpu_backend.rabit_linear_cpu(x, P, g, h, b, dense_min_batch=10 ** 9)
    assert rel_err(y_dense, ref) < 1e-5 and rel_err(y_lut, ref) < 1e-5
    # leading dims, non-contiguous x, no bias, 1 and 2 threads
    x3 = torch.randn(2, 3, 200)[..., ::2]
    y3 = cpu_backend.rabit_linear_cpu(x3, P, g, h, None, num_threads=1)
    assert y3.shape == (2, 3, 63)
    assert rel_err(y3, exact(x3.reshape(-1, 100), B, g, h, None).reshape(2, 3, 63)) < 1e-5
    y3b = cpu_backend.rabit_linear_cpu(x3, P, g, h, None, num_threads=2)
    assert torch.equal(y3, y3b)
    assert cpu_backend.rabit_linear_cpu(torch.randn(0, 100), P, g, h, b).shape == (0, 63)
    # rows of x with a stride (a column slice of a wider matrix), through the function and a plan
    xs = torch.randn(5, 230)[:, 30:130]
    assert xs.stride() == (230, 1)
    for fn in (lambda v: cpu_backend.rabit_linear_cpu(v, P, g, h, b), cpu_backend.CpuLinearPlan(P, g, h, b)):
        assert rel_err(fn(xs), exact(xs, B, g, h, b)) < 1e-5
    assert torch.allclose(kernels.dense_weight(P, g, h).double(), dense_weight_reference(P, g, h, torch.float64),
                          atol=1e-5)
    with pytest.raises(ValueError):
        cpu_backend.rabit_linear_cpu(torch.randn(1, 99), P, g, h, b)


@needs_cpu
def test_cpu_plan():
    x, B, g, h, b = make(2, 129, 577, 5, seed=12, scale_dtype=torch.float16)
    P = sign_bits.pack_signs(B)
    plan = cpu_backend.CpuLinearPlan(P, g, h, b)
    ref = exact(x, B, g, h, b)
    assert rel_err(plan(x), ref) < 1e-5
    assert rel_err(plan(x[:1]), ref[:1]) < 1e-5
    y3 = plan(x.reshape(5, 1, 577).expand(5, 2, 577))
    assert y3.shape == (5, 2, 129) and rel_err(y3[:, 1], ref) < 1e-5
    xb = torch.randn(cpu_backend.DENSE_MIN_BATCH + 3, 577)
    assert rel_err(plan(xb), exact(xb, B, g, h, b)) < 1e-5
    with pytest.raises(ValueError):
        plan(torch.randn(1, 576))


@needs_cpu
@pytest.mark.parametrize("lut8", [False, True])
def test_cpu_plan_row_fn(lut8):
    """The decode loop's one-row calls: the same bits as the plan's __call__, one output tensor when reused, and
    anything but a contiguous fp32 row (a strided row, bf16, two rows) served by __call__ with a fresh tensor."""
    x, B, g, h, b = make(2, 129, 577, 3, seed=21, scale_dtype=torch.float16)
    P = sign_bits.pack_signs(B)
    plan = cpu_backend.CpuLinearPlan(P, g, h, b, lut8=lut8)
    for nt in (1, 2):
        fresh, reused = plan.row_fn(nt), plan.row_fn(nt, reuse_output=True)
        y0, y1 = reused(x[0].view(1, 1, -1)), None
        assert y0.shape == (1, 1, 129) and torch.equal(y0[0], plan(x[:1], nt))
        assert fresh(x[0].view(1, 1, -1)).shape == (1, 1, 129) and fresh(x[:1]).shape == (1, 129)
        y0 = reused(x[:1])
        assert y0.shape == (1, 129) and torch.equal(y0, plan(x[:1], nt))
        y0 = y0.clone()
        y1 = reused(x[1:2])
        assert y1.data_ptr() == reused(x[2:3]).data_ptr()               # overwritten in place by the next call
        assert torch.equal(y1, plan(x[2:3], nt)) and not torch.equal(y1, y0)
        a, c = fresh(x[:1]), fresh(x[:1])
        assert a.data_ptr() != c.data_ptr() and torch.equal(a, c) and torch.equal(a, y0)
        strided = torch.stack([x[1], x[1]], dim=1)[:, 0].view(1, -1)    # one row, stride 2
        assert not strided.is_contiguous() and torch.equal(reused(strided), plan(x[1:2], nt))
        xb = x[:1].to(torch.bfloat16)
        yb = reused(xb)
        assert yb.dtype == torch.bfloat16 and torch.equal(yb, plan(xb, nt))
        assert reused(x[:2]).shape == (2, 129) and reused(x[0]).shape == (129,)   # __call__'s shapes
    with pytest.raises(ValueError):
        plan.row_fn(1)(torch.randn(1, 576))


@needs_cpu
def test_cpu_tables_built_by_both_threads():
    """A batch whose tables are large enough to be built by every thread inside the parallel region (more than 8192
    groups of 4 inputs over the batch chunk's rows and paths), odd input width: each thread's share of the tables,
    split at arbitrary (row, path, group) boundaries, lands where the tile loops read it."""
    x, B, g, h, b = make(2, 70, 4101, 4, seed=13)
    P = sign_bits.pack_signs(B)
    ref = exact(x, B, g, h, b)
    for nt in (1, 2):
        assert rel_err(cpu_backend.rabit_linear_cpu(x, P, g, h, b, num_threads=nt), ref) < 1e-5


@needs_cpu
def test_cpu_large_threaded():
    x, B, g, h, b = make(2, 1000, 2048, 1, seed=11)
    P = sign_bits.pack_signs(B)
    ref = exact(x, B, g, h, b)
    for nt in (1, 2):
        assert rel_err(cpu_backend.rabit_linear_cpu(x, P, g, h, b, num_threads=nt), ref) < 1e-5


# ---------------------------------------------------------------- int8 lookup tables ("cpu_int8")
LUT8_SHAPES = [(2, 129, 577), (3, 5, 7), (1, 70, 64), (2, 200, 100), (2, 17, 1000), (2, 48, 2048)]


@needs_cpu
@pytest.mark.parametrize("k,out,inf", LUT8_SHAPES)
def test_lut8_matches_its_reference_on_every_isa(k, out, inf):
    """Every code path computes the same integer sums as the PyTorch reference of the method (so the same bits as
    each other), odd shapes and partial blocks of 256 inputs included; 1 and 2 threads."""
    x, B, g, h, b = make(k, out, inf, 1, seed=3 * out + inf)
    P = sign_bits.pack_signs(B)
    ref = rabit_linear_lut8_reference(x, P, g, h, b)
    first = None
    for isa in ("scalar", "avx2", "avx512", "avx512vbmi"):
        for nt in (1, 2):
            y = cpu_backend.rabit_linear_cpu(x, P, g, h, b, isa=isa, num_threads=nt, lut8=True)
            assert rel_err(y, ref) < 1e-6, (isa, nt)
            if first is None:
                first = y
            assert torch.equal(y, first), (isa, nt)   # bit-identical across ISAs and threads


@needs_cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vbmi"])
@pytest.mark.parametrize("lut8", [False, True])
@pytest.mark.parametrize("k,out,inf", [(2, 300, 1000), (3, 129, 1501), (2, 1000, 2048)])
def test_one_row_tables_built_by_free_threads(isa, lut8, k, out, inf):
    """One row large enough for threads (k * out * in >= 512K): each path's tables are a task of the parallel region,
    taken by whichever thread is free. 2 and 3 threads give the one-thread bits, and the method's references."""
    x, B, g, h, b = make(k, out, inf, 1, seed=out + k)
    P = sign_bits.pack_signs(B)
    ys = [cpu_backend.rabit_linear_cpu(x, P, g, h, b, isa=isa, num_threads=nt, lut8=lut8) for nt in (1, 2, 3)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    ref = rabit_linear_lut8_reference(x, P, g, h, b) if lut8 else exact(x, B, g, h, b)
    assert rel_err(ys[1], ref) < 1e-5


@needs_cpu
@pytest.mark.parametrize("k,out,inf", LUT8_SHAPES)
def test_lut8_error_within_its_bound(k, out, inf):
    """Against the exact product: each group's lookup is off by at most half a quantization step s_b, so
    |y - y_exact| <= sum_i |g_i| * sum_b s_b / 2 * groups(b); and on Gaussian inputs the relative error is ~5e-3."""
    x, B, g, h, b = make(k, out, inf, 1, seed=out + 7 * inf)
    P = sign_bits.pack_signs(B)
    y = cpu_backend.rabit_linear_cpu(x, P, g, h, b, lut8=True)
    ref = exact(x, B, g, h, b)
    bound = torch.zeros(out, dtype=torch.float64)
    for i in range(k):
        a = torch.zeros(-(-inf // 32) * 32, dtype=torch.float64)
        a[:inf] = (h[i] * x[0]).double()
        group_sums = a.view(-1, 4).abs().sum(1)
        per_block = LUT8_BLOCK // 4
        for q0 in range(0, group_sums.numel(), per_block):
            blk = group_sums[q0:q0 + per_block]
            bound += g[i].double().abs() * (blk.max() / LUT8_MAX / 2 * blk.numel())
    err = (y.double() - ref).abs()[0]
    assert (err <= bound * 1.0001 + 1e-6).all()
    assert 1e-4 < rel_err(y, ref) < 1.5e-2        # rounded (not the exact path), but close


@needs_cpu
def test_lut8_several_rows_and_half_inputs():
    """lut8 applies to one-row inputs; several rows run the exact path. 16-bit inputs are converted first."""
    x, B, g, h, b = make(2, 129, 577, 5, seed=21)
    P = sign_bits.pack_signs(B)
    assert torch.equal(cpu_backend.rabit_linear_cpu(x, P, g, h, b, lut8=True),
                       cpu_backend.rabit_linear_cpu(x, P, g, h, b))
    xb = x[:1].to(torch.bfloat16)
    y = cpu_backend.rabit_linear_cpu(xb, P, g, h, b, lut8=True)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), rabit_linear_lut8_reference(xb.float(), P, g, h, b)) < 1e-2   # bf16 output rounding
    assert rel_err(kernels.rabit_linear(x[:1], P, g, h, b, backend="cpu_int8"),
                   rabit_linear_lut8_reference(x[:1], P, g, h, b)) < 1e-6
    assert kernels.select_backend(x, "auto") == "cpu"    # auto never picks the approximate backend


@needs_cpu
def test_lut8_planar_layout():
    """The int8 path's copy of the signs: byte j of row r's 32-bit word of every 16-row x 32-input block moves to
    16 j + r of that block, so that byte j of 16 rows is one shuffle's index vector."""
    P = sign_bits.pack_signs(torch.where(torch.rand(2, 37, 70) > 0.5, 1.0, -1.0))
    Q = cpu_backend.q8_planar(P)
    assert Q.shape == P.shape and Q.dtype == torch.uint8
    blocks = P.reshape(-1, 16, 4)                       # (block, row, byte)
    assert torch.equal(Q.reshape(-1, 4, 16), blocks.transpose(1, 2))
    assert not torch.equal(Q, P)
    with pytest.raises(ValueError, match="64-byte blocks"):
        cpu_backend.q8_planar(torch.zeros(100, dtype=torch.uint8))


@needs_cpu
def test_lut8_without_the_planar_copy_is_refused():
    """The C entry point refuses a one-row int8 call without the planar signs (code 1) instead of reading NULL,
    and needs none for several rows or the exact path."""
    x, B, g, h, b = make(2, 64, 96, 1, seed=6)
    P = sign_bits.pack_signs(B)
    lib = cpu_backend.load()
    for batch, lut8, want in ((1, 1, 1), (1, 0, 0), (2, 1, 0)):
        xs = x.expand(batch, -1).contiguous()
        y = torch.empty(batch, 64)
        rc = lib.rabit_gemm(xs.data_ptr(), 0, batch, 96, P.data_ptr(), 2, 64, 96, g.data_ptr(), 0, h.data_ptr(), 0,
                            b.data_ptr(), 0, y.data_ptr(), 0, 64, 1, 0, lut8, None)
        assert rc == want, (batch, lut8)


@needs_cpu
def test_lut8_plan_follows_signs_written_in_place():
    """The cached cpu_int8 call reads its own copy of the signs: writing the module's signs in place (as
    load_state_dict does) must not leave it computing with the old ones."""
    x, B, g, h, b = make(2, 64, 96, 1, seed=5)
    P = sign_bits.pack_signs(B)
    y0 = kernels.rabit_linear(x, P, g, h, b, backend="cpu_int8")
    B2 = -B
    P.copy_(sign_bits.pack_signs(B2))
    y1 = kernels.rabit_linear(x, P, g, h, b, backend="cpu_int8")
    assert rel_err(y1, rabit_linear_lut8_reference(x, P, g, h, b)) < 1e-6
    assert rel_err(y1, y0) > 0.1
    with torch.inference_mode():   # signs made under inference_mode have no version counter: still served
        Pi, xi = P.clone(), x.clone()
        assert torch.equal(kernels.rabit_linear(xi, Pi, g, h, b, backend="cpu_int8"), y1)
    assert torch.equal(kernels.rabit_linear(xi, Pi, g, h, b, backend="cpu_int8"), y1)


# ---------------------------------------------------------------- dispatch
def test_dispatch_reference_always():
    assert "reference" in kernels.available_backends()
    x, B, g, h, b = make(2, 5, 7, 2)
    P = sign_bits.pack_signs(B)
    y = kernels.rabit_linear(x, P, g, h, b, backend="reference")
    assert rel_err(y, exact(x, B, g, h, b)) < 1e-6


def test_dispatch_auto_and_env(monkeypatch):
    x, B, g, h, b = make(2, 63, 33, 1)
    P = sign_bits.pack_signs(B)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.select_backend(x) == ("cpu" if CPU_OK else "reference")
    # autograd through the call -> reference
    assert kernels.select_backend(x, needs_grad=True) == "reference"
    xg = x.clone().requires_grad_()
    kernels.rabit_linear(xg, P, g, h, b).sum().backward()
    assert xg.grad is not None
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.select_backend(x) == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        kernels.select_backend(x)
    with pytest.raises(ValueError):
        kernels.select_backend(x, backend="bogus")


def test_no_compiler_falls_back(tmp_path):
    """With no usable compiler the cpu backend is unavailable and 'auto' warns once and uses the reference."""
    code = textwrap.dedent("""
        import warnings, torch
        from rabit import kernels, sign_bits
        from rabit.kernels import cpu
        assert not cpu.is_available() and cpu.build_error()
        assert kernels.available_backends()[0] == "reference" and "cpu" not in kernels.available_backends()
        P = sign_bits.pack_signs(torch.ones(1, 3, 4))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = kernels.rabit_linear(torch.ones(1, 4), P, torch.ones(1, 3), torch.ones(1, 4))
            kernels.rabit_linear(torch.ones(1, 4), P, torch.ones(1, 3), torch.ones(1, 4))
        assert torch.allclose(y, torch.full((1, 3), 4.0)), y
        assert sum("reference" in str(x.message) for x in w) == 1, [str(x.message) for x in w]
        try:
            kernels.rabit_linear(torch.ones(1, 4), P, torch.ones(1, 3), torch.ones(1, 4), backend="cpu")
        except RuntimeError:
            pass
        else:
            raise AssertionError("explicit cpu backend should raise")
        print("OK")
    """)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PATH=str(tmp_path), RABIT_CACHE=str(tmp_path),
               PYTHONPATH=SRC)
    env.pop("RABIT_CACHE_DIR", None)
    env.pop(kernels.ENV_VAR, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------- Triton (interpreter on CPU)
def _triton_importable():
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _triton_importable(), reason="triton not installed")
def test_triton_interpreter():
    code = textwrap.dedent("""
        import torch
        from rabit import sign_bits
        from rabit.kernels.triton_gemv import rabit_linear_triton
        def exact(x, B, g, h, b):
            x, B, g, h = x.double(), B.double(), g.double(), h.double()
            return sum(((x * h[i]) @ B[i].T) * g[i] for i in range(B.shape[0])) + b.double()
        torch.manual_seed(0)
        for (k, out, inf, batch, mode) in [(2, 5, 7, 1, "gemv"), (3, 33, 65, 3, "gemv"), (1, 17, 100, 1, "gemv"),
                                           (2, 40, 100, 20, "gemm"), (1, 17, 33, 2, "gemm")]:
            B = torch.randn(k, out, inf).sign(); g = torch.rand(k, out); h = torch.randn(k, inf)
            b = torch.randn(out); x = torch.randn(batch, inf)
            P = sign_bits.pack_signs(B)
            for dt, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
                xd = x.to(dt)
                y = rabit_linear_triton(xd, P, g, h, b, mode=mode)
                assert y.dtype == dt and y.shape == (batch, out)
                ref = exact(xd, B, g, h, b)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                assert err < tol, (k, out, inf, batch, mode, dt, err)
        print("OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "OK" not in r.stdout and ("interpret" in r.stderr.lower()
                                                        and "not supported" in r.stderr.lower()):
        pytest.skip("triton interpreter does not work here")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(not _triton_importable(), reason="triton not installed")
def test_triton_compiles_for_cuda():
    """The kernels lower to PTX/cubin for sm_90 (no GPU needed: Triton's bundled ptxas)."""
    code = textwrap.dedent("""
        from rabit.kernels.triton_gemv import compile_check
        sizes = compile_check(90)
        assert len(sizes) == 8 and all(v > 0 for v in sizes.values()), sizes
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=SRC, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas available")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------- PackedRaBiTLinear
class _FakeRaBiT(torch.nn.Module):
    def __init__(self, paths, bias):
        super().__init__()
        self._p, self.bias = paths, bias
        self.num_paths, self.out_features, self.in_features = len(paths), *paths[0][1].shape

    def paths(self):
        return self._p


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_packed_module(dtype):
    x, B, g, h, b = make(2, 63, 100, 4, seed=3)
    paths = [(g[i], B[i], h[i]) for i in range(2)]
    m = PackedRaBiTLinear.from_paths(paths, b, dtype=dtype)
    assert m.packed.dtype == torch.uint8 and m.g.shape == (2, 63) and m.h.shape == (2, 100)
    assert m.g.dtype == dtype and m.bias.dtype == dtype
    gq, hq, bq = m.g.float(), m.h.float(), m.bias.float()
    W = sum(gq[i][:, None] * B[i] * hq[i][None, :] for i in range(2))
    assert torch.allclose(m.unpacked_weight(), W, atol=1e-5)
    assert torch.equal(m.signs(), B)
    ref = exact(x, B, gq, hq, bq)
    with torch.no_grad():
        for backend in kernels.available_backends():
            if backend == "triton":
                continue
            m.backend = backend
            assert rel_err(m(x), ref) < 1e-5, backend
            assert rel_err(m(x), F.linear(x, W, bq).double()) < 1e-5
    # state dict round trip
    m2 = PackedRaBiTLinear(100, 63, num_paths=2, bias=True, scale_dtype=dtype)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.packed, m.packed) and torch.equal(m2.g, m.g)
    # from_rabit
    m3 = PackedRaBiTLinear.from_rabit(_FakeRaBiT(paths, None), dtype=dtype)
    assert m3.bias is None and torch.equal(m3.packed, m.packed)
    bpw = m.bits_per_weight()
    assert abs(bpw - (2 + 2 * (63 + 100) * 8 * m.g.element_size() / (63 * 100))) < 1e-9
    assert PackedRaBiTLinear(4096, 4096, 2).bits_per_weight() == pytest.approx(2.015625)


@pytest.mark.parametrize("mode", ["coupled", "independent"])
def test_from_real_rabit_layer(mode):
    """A RaBiTLinear initialized from a random linear (odd sizes) packs into a layer with the same outputs."""
    from rabit import RaBiTConfig
    from rabit.layer import RaBiTLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(67, 45, bias=True)
    layer = RaBiTLinear.from_linear(linear, RaBiTConfig(mode=mode, precondition=False))
    with torch.no_grad():
        W = layer.paths()
        dense = sum(g[:, None] * B * h[None, :] for g, B, h in W)
        # a real decomposition: a weight close to the linear's, both signs in every path
        assert rel_err(dense, linear.weight.double()) < 0.4
        assert all(0 < (B > 0).float().mean() < 1 for _, B, _ in W)
        m = PackedRaBiTLinear.from_rabit(layer, dtype=torch.float32)
        x = torch.randn(3, 67)
        ref = layer(x)
        assert ref.abs().max() > 0.1
        for backend in ("reference", "cpu") if CPU_OK else ("reference",):
            m.backend = backend
            assert rel_err(m(x), ref.double()) < 1e-5, backend
