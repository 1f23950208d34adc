"""The native kernels of the coupled linear (``rabit.kernels.coupled_cpu``) against the PyTorch formulas of
``rabit.ops.coupled``: the derivation (bitwise) and the path-scale gradients (to fp32 summation order), on random
and odd shapes, k = 1..6, 1 and 2 threads, every ISA path; the dispatchers' fallbacks; the coupled op's gradients
either way."""
import pytest
import torch

from rabit.kernels import coupled_cpu
from rabit.ops import coupled
from rabit.ops.coupled import (coupled_linear, coupled_weight, coupled_weight_reference, scale_grads,
                                scale_grads_reference)

SKIP = coupled_cpu.build_error()
needs_kernel = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _problem(out, inp, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gw = torch.randn(out, inp, generator=gen) * torch.rand(out, 1, generator=gen)
    gw.view(-1)[:1] = 0.0   # a zero gradient (its sign is irrelevant)
    pos = [torch.rand(out, inp, generator=gen) > 0.5 for _ in range(k)]
    g = [torch.randn(out, generator=gen) for _ in range(k)]
    h = [torch.randn(inp, generator=gen) for _ in range(k)]
    return gw, pos, g, h


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(got, ref):
    weight, positives, mask = got
    rweight, rpositives, rmask = ref
    assert torch.equal(_bits(weight), _bits(rweight))          # bitwise, NaNs and signed zeros included
    assert len(positives) == len(rpositives)
    assert all(p.dtype == torch.bool and torch.equal(p, r) for p, r in zip(positives, rpositives))
    assert (mask is None) == (rmask is None)
    assert mask is None or (mask.dtype == torch.bool and torch.equal(mask, rmask))


def _latent(out, inp, k, seed):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(out, inp, generator=gen)
    latent.view(-1)[::7] = 0.0          # sign(0) = +1
    latent.view(-1)[3::11] = -0.0
    g = [torch.rand(out, generator=gen).add_(0.2) for _ in range(k)]
    h = [torch.rand(inp, generator=gen).add_(0.2) for _ in range(k)]
    if k > 1:
        g[1].view(-1)[:1] *= -1          # a negative scale
    return latent, g, h


@needs_kernel
@pytest.mark.parametrize("out,inp", [(1, 1), (7, 13), (33, 65), (257, 129), (3, 1100)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("clip", [None, 0.7])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["auto", "avx2", "scalar"])   # auto: AVX-512 where the CPU has it
def test_derivation_is_the_reference_bitwise(out, inp, k, clip, threads, isa):
    latent, g, h = _latent(out, inp, k, seed=out * 1000 + inp + k)
    weight, positives, mask, finite = coupled_cpu.derive_cpu(latent, g, h, clip, num_threads=threads, isa=isa,
                                                             min_parallel_work=0)
    assert finite
    _same((weight, positives, mask), coupled_weight_reference(latent, g, h, clip))


@needs_kernel
@pytest.mark.parametrize("isa", ["auto", "avx2", "scalar"])
def test_derivation_of_a_non_finite_latent_and_many_paths(isa):
    latent, g, h = _latent(19, 37, 6, seed=5)
    latent[2, 3], latent[4, 36], latent[18, 0] = float("inf"), float("nan"), float("-inf")
    ref = coupled_weight_reference(latent, g, h, 0.5)
    weight, positives, mask, finite = coupled_cpu.derive_cpu(latent, g, h, 0.5, isa=isa)
    assert not finite
    _same((weight + (latent - latent), positives, mask), ref)
    got = coupled_weight(latent, g, h, 0.5)       # the dispatcher adds (latent - latent) itself, as the reference
    _same(got, ref)
    assert not torch.isfinite(got[0]).all() and torch.isfinite(got[0][1]).all()


@needs_kernel
def test_derivation_threaded_above_the_default_threshold():
    latent, g, h = _latent(2049, 1031, 2, seed=3)
    assert latent.numel() * 2 >= coupled_cpu.PARALLEL_MIN_WORK
    _same(coupled_cpu.derive_cpu(latent, g, h, 0.7, num_threads=2)[:3], coupled_weight_reference(latent, g, h, 0.7))


def test_derivation_dispatcher_falls_back_to_the_reference(monkeypatch):
    latent, g, h = _latent(9, 14, 2, seed=1)
    ref = coupled_weight_reference(latent, g, h, 0.7)
    assert not coupled_cpu.supports_derive(latent.t(), g, h)
    assert not coupled_cpu.supports_derive(latent.double(), g, h)

    class Sub(torch.Tensor):
        pass

    assert not coupled_cpu.supports_derive(latent.as_subclass(Sub), g, h)   # e.g. a DTensor: the reference
    _same(coupled_weight(latent.t().contiguous().t(), g, h, 0.7), ref)
    monkeypatch.setattr(coupled_cpu, "is_available", lambda: False)
    _same(coupled_weight(latent, g, h, 0.7), ref)


def _close(got, ref):
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (float(b.abs().max()) + 1e-12))


@needs_kernel
@pytest.mark.parametrize("out,inp", [(1, 1), (7, 13), (33, 65), (257, 129), (3, 1100)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["auto", "avx2", "scalar"])   # one the CPU lacks falls back to its best
def test_kernel_matches_reference(out, inp, k, threads, isa):
    gw, pos, g, h = _problem(out, inp, k, seed=out * 1000 + inp + k)
    dg, dh = coupled_cpu.scale_grads_cpu(gw, pos, g, h, num_threads=threads, isa=isa, min_parallel_work=0)
    rdg, rdh = scale_grads_reference(gw, pos, g, h)
    _close(dg, rdg)
    _close(dh, rdh)


@needs_kernel
@pytest.mark.parametrize("out,inp", [(1, 1), (7, 13), (33, 65), (257, 129), (3, 1100), (5, 2053)])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["auto", "avx2", "scalar"])
def test_bf16_gradient_gives_the_sums_of_its_fp32_copy_bitwise(out, inp, k, threads, isa):
    # 2053 columns: more than one column tile; k = 5: more paths than one pass takes
    gw, pos, g, h = _problem(out, inp, k, seed=out * 7 + inp + k)
    gw16 = gw.to(torch.bfloat16)
    kw = dict(num_threads=threads, isa=isa, min_parallel_work=0)
    got = coupled_cpu.scale_grads_cpu(gw16, pos, g, h, **kw)
    ref = coupled_cpu.scale_grads_cpu(gw16.float(), pos, g, h, **kw)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got[0] + got[1], ref[0] + ref[1]))
    rdg, rdh = scale_grads_reference(gw16.float(), pos, g, h)
    _close(got[0] + got[1], rdg + rdh)


@needs_kernel
def test_more_paths_than_one_pass_takes_and_constant_planes():
    gw, pos, g, h = _problem(19, 37, 6, seed=1)
    pos[1].fill_(True)
    pos[2].fill_(False)
    for isa in ("auto", "scalar"):
        dg, dh = coupled_cpu.scale_grads_cpu(gw, pos, g, h, num_threads=2, isa=isa, min_parallel_work=0)
        rdg, rdh = scale_grads_reference(gw, pos, g, h)
        _close(dg + dh, rdg + rdh)


@needs_kernel
def test_threaded_above_the_default_threshold_and_reproducible():
    gw, pos, g, h = _problem(2049, 1031, 2, seed=2)   # out * in * k above PARALLEL_MIN_WORK
    assert gw.numel() * 2 >= coupled_cpu.PARALLEL_MIN_WORK
    rdg, rdh = scale_grads_reference(gw, pos, g, h)
    first = coupled_cpu.scale_grads_cpu(gw, pos, g, h, num_threads=2)
    _close(first[0] + first[1], rdg + rdh)
    again = coupled_cpu.scale_grads_cpu(gw, pos, g, h, num_threads=2)
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))


@needs_kernel
def test_empty_dimensions():
    gw, pos, g, h = _problem(0, 5, 2)
    dg, dh = coupled_cpu.scale_grads_cpu(gw, pos, g, h)
    assert [t.shape for t in dg] == [(0,)] * 2 and all(torch.equal(t, torch.zeros(5)) for t in dh)


def test_supports_only_contiguous_fp32_or_bf16_cpu_inputs():
    gw, pos, g, h = _problem(6, 10, 2)
    assert coupled_cpu.supports(gw, pos, g, h)
    assert not coupled_cpu.supports(gw.t().contiguous().t(), pos, g, h)          # column-major
    assert coupled_cpu.supports(gw.to(torch.bfloat16), pos, g, h)
    assert not coupled_cpu.supports(gw.to(torch.float16), pos, g, h)
    assert not coupled_cpu.supports(gw, [pos[0].float(), pos[1]], g, h)
    assert not coupled_cpu.supports(gw, pos, [g[0].double(), g[1]], h)
    assert not coupled_cpu.supports(gw, pos, g, [h[0][:5], h[1]])
    assert not coupled_cpu.supports(gw, pos[:1], g, h)
    with pytest.raises(ValueError):
        coupled_cpu.scale_grads_cpu(gw.to(torch.float64), pos, g, h)


def test_dispatcher_falls_back_to_the_reference(monkeypatch):
    gw, pos, g, h = _problem(9, 14, 2)
    ref = scale_grads_reference(gw, pos, g, h)
    # inputs the kernel does not take: the reference, bitwise
    strided = torch.zeros(14, 9).t()
    strided.copy_(gw)
    got = scale_grads(strided, pos, g, h)
    assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], ref[0] + ref[1]))
    monkeypatch.setattr(coupled_cpu, "is_available", lambda: False)
    got = scale_grads(gw, pos, g, h)
    assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], ref[0] + ref[1]))


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("frozen_latent", [False, True])
def test_coupled_op_gradients_with_and_without_the_kernel(k, frozen_latent, monkeypatch):
    torch.manual_seed(k)
    latent = torch.randn(33, 65, requires_grad=not frozen_latent)
    g = [torch.rand(33).add_(0.5).requires_grad_() for _ in range(k)]
    h = [torch.rand(65).add_(0.5).requires_grad_() for _ in range(k)]
    x = torch.randn(4, 7, 65)

    def grads():
        for t in [latent, *g, *h]:
            t.grad = None
        coupled_linear(x, latent, g, h, None, clip=0.7).square().sum().backward()
        return [t.grad for t in ([] if frozen_latent else [latent]) + g + h]

    calls = []
    real = coupled_cpu.scale_grads_cpu
    monkeypatch.setattr(coupled_cpu, "scale_grads_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast = grads()
    assert calls == [1]   # one call for all k paths
    monkeypatch.setattr(coupled.coupled_cpu, "is_available", lambda: False)
    slow = grads()
    assert calls == [1]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@needs_kernel
@pytest.mark.parametrize("frozen_latent", [False, True])
def test_coupled_op_under_autocast_reads_the_bf16_gradient_as_it_is(frozen_latent, monkeypatch):
    # with frozen latents the native pass takes d W in bf16 (no fp32 copy): the same scale gradients as the
    # PyTorch formula on the fp32 copy; a training latent still gets (and the pass reads) the fp32 one
    torch.manual_seed(4)
    latent = torch.randn(40, 70, requires_grad=not frozen_latent)
    g = [torch.rand(40).add_(0.5).requires_grad_() for _ in range(2)]
    h = [torch.rand(70).add_(0.5).requires_grad_() for _ in range(2)]
    x = torch.randn(3, 9, 70)

    def grads():
        for t in [latent, *g, *h]:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = coupled_linear(x, latent, g, h, None, clip=0.7)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        return [t.grad for t in ([] if frozen_latent else [latent]) + g + h]

    seen = []
    real = coupled_cpu.scale_grads_cpu
    monkeypatch.setattr(coupled_cpu, "scale_grads_cpu",
                        lambda gw, *a, **kw: seen.append(gw.dtype) or real(gw, *a, **kw))
    fast = grads()
    assert seen == [torch.bfloat16 if frozen_latent else torch.float32]
    monkeypatch.setattr(coupled.coupled_cpu, "is_available", lambda: False)
    slow = grads()
    assert len(seen) == 1
    for a, b in zip(fast, slow):
        assert a is not None and float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
