"""The one dispatch of the packed linear: every backend against the reference on random shapes, the registered
operator (schema, fake tensor, autograd, torch.compile), the native kernel's cached call plans, the OpenMP
build fallback, and the cache root."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from rabit import kernels, sign_bits
from rabit.kernels import cpu as cpu_backend
from rabit.kernels.reference import rabit_linear_lut8_reference, rabit_linear_reference
from rabit.packed_layer import PackedRaBiTLinear
from test_kernels import CPU_OK, SRC, needs_cpu, rel_err


def random_case(gen: torch.Generator, bias: bool):
    k = int(torch.randint(1, 4, (), generator=gen))
    out = int(torch.randint(1, 150, (), generator=gen))
    inf = int(torch.randint(1, 300, (), generator=gen))
    batch = int(torch.randint(0, 10, (), generator=gen))
    B = torch.where(torch.rand(k, out, inf, generator=gen) > 0.5, 1.0, -1.0)
    g = torch.rand(k, out, generator=gen) + 0.1
    h = torch.randn(k, inf, generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    x = torch.randn(batch, inf, generator=gen)
    return x, sign_bits.pack_signs(B), g, h, b


def _device_for(backend: str) -> str:
    return "cuda" if backend == "triton" else "cpu"


@pytest.mark.parametrize("seed", range(6))
def test_every_backend_matches_the_reference_on_random_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    backends = kernels.available_backends()
    if not CPU_OK:
        assert "cpu" not in backends
    for case in range(4):
        x, P, g, h, b = random_case(gen, bias=case % 2 == 0)
        exact = rabit_linear_reference(x, P, g, h, b, compute_dtype=torch.float64)
        one_row = x.numel() == x.shape[-1]
        for backend in backends:
            dev = _device_for(backend)
            args = [t.to(dev) if t is not None else None for t in (x, P, g, h, b)]
            y = kernels.rabit_linear(*args, backend=backend)
            # cpu_int8 computes its own method for one-row inputs (int8 tables), the exact product for more rows
            ref = rabit_linear_lut8_reference(x, P, g, h, b) if backend == "cpu_int8" and one_row else exact
            assert y.shape == ref.shape and y.dtype == x.dtype
            assert rel_err(y.cpu(), ref) < 1e-5, (backend, tuple(P.shape), x.shape)
            # the registered operator gives the same numbers
            y_op = torch.ops.rabit.packed_linear(*args, backend, 1)
            assert torch.equal(y_op, y), backend


@needs_cpu
def test_operator_registration_opcheck():
    """Schema, fake (meta) implementation and autograd registration of rabit::packed_linear."""
    gen = torch.Generator().manual_seed(1)
    x, P, g, h, b = random_case(gen, bias=True)
    x = torch.randn(3, h.shape[1], generator=gen)
    xg, gg, hg, bg = (t.clone().requires_grad_() for t in (x, g, h, b))
    torch.library.opcheck(torch.ops.rabit.packed_linear.default, (xg, P, gg, hg, bg, "cpu", 1))


@needs_cpu
def test_gradients_through_a_fast_backend_equal_the_reference():
    gen = torch.Generator().manual_seed(2)
    x, P, g, h, b = random_case(gen, bias=True)
    x = torch.randn(4, h.shape[1], generator=gen)
    grads = []
    for backend in ("reference", "cpu"):
        leaves = [t.clone().requires_grad_() for t in (x, g, h, b)]
        y = kernels.rabit_linear(leaves[0], P, leaves[1], leaves[2], leaves[3], backend=backend)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        grads.append([t.grad for t in leaves])
    for ref, fast in zip(*grads):
        assert fast is not None and torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)


@needs_cpu
def test_torch_compile_keeps_one_graph_with_the_operator():
    gen = torch.Generator().manual_seed(3)
    _, P, g, h, b = random_case(gen, bias=True)
    layer = PackedRaBiTLinear(h.shape[1], g.shape[1], num_paths=g.shape[0], bias=True, scale_dtype=torch.float32)
    with torch.no_grad():
        layer.packed.copy_(P), layer.g.copy_(g), layer.h.copy_(h), layer.bias.copy_(b)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda v: torch.relu(layer(v)) * 2, backend=backend, fullgraph=True)
    x = torch.randn(2, h.shape[1], generator=gen)
    with torch.no_grad():
        assert torch.allclose(fn(x), torch.relu(layer(x)) * 2)
    assert len(graphs) == 1 and "rabit.packed_linear" in graphs[0]


@needs_cpu
def test_cpu_plans_follow_the_tensors():
    """The native kernel's prepared calls are cached per tensor: in-place changes are seen, replaced buffers
    (.float()) get a new plan, and a deleted layer's plan is dropped."""
    gen = torch.Generator().manual_seed(4)
    x, P, g, h, b = random_case(gen, bias=True)
    x = torch.randn(2, h.shape[1], generator=gen)
    paths = [(g[i], sign_bits.unpack_signs(P, g.shape[1], h.shape[1])[i], h[i]) for i in range(g.shape[0])]
    layer = PackedRaBiTLinear.from_paths(paths, b, dtype=torch.float16, backend="cpu")

    def ref():
        return rabit_linear_reference(x, layer.packed, layer.g, layer.h, layer.bias, compute_dtype=torch.float64)

    with torch.no_grad():
        assert rel_err(layer(x), ref()) < 1e-5
        assert (id(layer.packed), False) in cpu_backend._plans
        layer.g.mul_(2)                                  # in place: same tensors, new values
        assert rel_err(layer(x), ref()) < 1e-5
        old = (id(layer.packed), False)
        layer.float()                                    # new buffer objects
        assert layer.g.dtype == torch.float32 and rel_err(layer(x), ref()) < 1e-5
        assert old not in cpu_backend._plans or cpu_backend._plans[old].refs[0]() is not None
        key = (id(layer.packed), False)
        del layer
        assert key not in cpu_backend._plans


def _has_gcc() -> bool:
    return shutil.which("gcc") is not None


@pytest.mark.skipif(not _has_gcc(), reason="needs gcc to stand in for a compiler without OpenMP")
def test_kernel_built_without_openmp_says_so(tmp_path):
    """A compiler that cannot build with -fopenmp gives a single-threaded kernel and a warning, not silence."""
    cc = tmp_path / "cc-no-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && '
                  '{ echo "cc: error: unsupported option -fopenmp" >&2; exit 1; }; done\nexec gcc "$@"\n')
    cc.chmod(0o755)
    code = textwrap.dedent("""
        import warnings
        from rabit.kernels import cpu
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert cpu.is_available(), cpu.build_error()
        assert not cpu.has_openmp()
        msgs = [str(m.message) for m in w if "without OpenMP" in str(m.message)]
        assert len(msgs) == 1 and "unsupported option -fopenmp" in msgs[0] and "--threads" in msgs[0], msgs
        print("OK")
    """)
    env = dict(os.environ, CC=str(cc), RABIT_CACHE=str(tmp_path / "cache"), PYTHONPATH=SRC)
    env.pop("RABIT_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "cache" / "kernels").is_dir()


def test_one_cache_root(monkeypatch, tmp_path, capsys):
    from rabit import data, models, paths

    for var in ("RABIT_CACHE", "RABIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "rabit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "xdg" / "rabit"
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "c"))
    assert paths.cache_root() == tmp_path / "c"
    assert models.cache_root() == tmp_path / "c" and data.default_cache_dir() == tmp_path / "c" / "tokens"
    assert capsys.readouterr().err == ""
    # the old variable still works, with one notice per process
    monkeypatch.delenv("RABIT_CACHE")
    monkeypatch.setenv("RABIT_CACHE_DIR", str(tmp_path / "old"))
    monkeypatch.setattr(paths, "_noticed", False)
    assert paths.cache_root() == tmp_path / "old" and paths.cache_root() == tmp_path / "old"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RABIT_CACHE_DIR is deprecated" in err and "RABIT_CACHE " in err
    # RABIT_CACHE wins over the old one, silently
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "c"))
    assert paths.cache_root() == tmp_path / "c" and capsys.readouterr().err == ""
