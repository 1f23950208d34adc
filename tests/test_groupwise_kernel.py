"""The native group-quantized linear (``rabit.kernels.groupwise_linear``, the quantized output head's decoding
path) against the plain PyTorch reference, on random shapes, odd sizes and every code path."""
import pytest
import torch

from rabit import kernels
from rabit.embedquant import QuantizedLinear, dequantize_groupwise, quantize_groupwise
from rabit.kernels import dispatch
from rabit.kernels import groupwise_cpu
from rabit.kernels.reference import groupwise_linear_reference
from test_kernels import CPU_SKIP

needs_kernel = pytest.mark.skipif(CPU_SKIP is not None, reason=CPU_SKIP or "")


def _problem(rows, cols, group, batch, bits, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)   # rows of different ranges
    codes, scales = quantize_groupwise(w, bits, group)
    x = torch.randn(batch, cols, generator=gen)
    b = torch.randn(rows, generator=gen) if bias else None
    return x, codes, scales, b


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,cols,group", [(1, 16, 16), (5, 48, 16), (63, 96, 32), (129, 192, 64),
                                             (70, 40, 8), (3, 6, 2)])
@pytest.mark.parametrize("batch", [1, 3, 4, 9])
@pytest.mark.parametrize("isa", ["auto", "scalar"])
def test_kernel_matches_reference(bits, rows, cols, group, batch, isa):
    x, codes, scales, _ = _problem(rows, cols, group, batch, bits, seed=rows + cols + batch)
    y = groupwise_cpu.groupwise_linear_cpu(x, codes, scales, bits, group, isa=isa)
    ref = groupwise_linear_reference(x, codes, scales, bits, group)
    assert y.shape == (batch, rows) and y.dtype == torch.float32
    # both accumulate in fp32, in different orders
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_bias_dtypes_and_leading_dims(bits):
    x, codes, scales, b = _problem(37, 128, 64, 6, bits, bias=True)
    x3 = x.reshape(2, 3, 128).to(torch.bfloat16)
    y = groupwise_cpu.groupwise_linear_cpu(x3, codes, scales, bits, 64, bias=b, num_threads=2)
    assert y.shape == (2, 3, 37) and y.dtype == torch.bfloat16
    w = dequantize_groupwise(codes, scales, bits, 64)
    ref = (x3.float().reshape(6, 128) @ w.T + b).reshape(2, 3, 37)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)   # bf16 output rounding


@needs_kernel
def test_kernel_threads_on_a_large_head():
    """Enough work for the threaded path (row blocks handed out to 2 threads) and a non-multiple of the block."""
    x, codes, scales, _ = _problem(5003, 256, 64, 2, 8, seed=3)
    ref = groupwise_linear_reference(x, codes, scales, 8, 64)
    for threads in (1, 2):
        y = groupwise_cpu.groupwise_linear_cpu(x, codes, scales, 8, 64, num_threads=threads)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
def test_kernel_rejects_bad_input():
    x, codes, scales, _ = _problem(8, 64, 32, 1, 8)
    with pytest.raises(ValueError, match="do not match bits"):
        groupwise_cpu.groupwise_linear_cpu(x, codes, scales, 4, 32)
    with pytest.raises(ValueError, match="shape mismatch"):
        groupwise_cpu.groupwise_linear_cpu(x[:, :32], codes, scales, 8, 32)
    with pytest.raises(TypeError, match="float16"):
        groupwise_cpu.groupwise_linear_cpu(x, codes, scales.float(), 8, 32)


def test_dispatch_picks_the_kernel_for_decoding_only(monkeypatch):
    x, codes, scales, _ = _problem(40, 64, 32, dispatch.GROUPWISE_KERNEL_MAX_ROWS + 1, 8)
    assert kernels.groupwise_linear(x, codes, scales, 8, 32) is None               # prefill: the caller's GEMM
    ref = groupwise_linear_reference(x, codes, scales, 8, 32)
    torch.testing.assert_close(kernels.groupwise_linear(x, codes, scales, 8, 32, backend="reference"), ref)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.groupwise_linear(x, codes, scales, 8, 32, backend="triton")
    xr = x[:1].clone().requires_grad_()
    assert kernels.groupwise_linear(xr, codes, scales, 8, 32) is None              # autograd: the reference
    if CPU_SKIP is None:
        y = kernels.groupwise_linear(x[:2], codes, scales, 8, 32)
        torch.testing.assert_close(y, ref[:2], rtol=1e-5, atol=1e-4)
    # with the kernel unavailable, auto falls back (None) and an explicit "cpu" says why
    monkeypatch.setattr(groupwise_cpu._library, "lib", None)
    monkeypatch.setattr(groupwise_cpu._library, "error", "rabit group-quantized CPU kernel unavailable: no cc")
    assert kernels.groupwise_linear(x[:1], codes, scales, 8, 32) is None
    with pytest.raises(RuntimeError, match="no cc"):
        kernels.groupwise_linear(x[:1], codes, scales, 8, 32, backend="cpu")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows_in", [1, 2, 20])
def test_quantized_head_same_logits_on_every_path(bits, rows_in):
    """The head's decoding (kernel), prefill (chunked GEMM) and reference paths agree."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 1000, bias=True)
    head = QuantizedLinear.from_linear(lin, bits, 32)
    x = torch.randn(rows_in, 96)
    w = dequantize_groupwise(head.qweight, head.scales, bits, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ w.T + head.bias, rtol=1e-5, atol=1e-4)
