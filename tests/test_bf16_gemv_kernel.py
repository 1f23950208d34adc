"""The native bf16-weight GEMV (``rabit.kernels.bf16_cpu``, the decoding path of a packed model's bf16 output head)
against ``F.linear`` on the widened weight, on odd shapes, every code path and both thread counts."""
import pytest
import torch
import torch.nn.functional as F

from rabit.kernels import bf16_cpu

needs_kernel = pytest.mark.skipif(not bf16_cpu.is_available(), reason="the bf16 GEMV kernel does not build here")


def _problem(rows, cols, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)).to(torch.bfloat16)
    x = torch.randn(batch, cols, generator=gen)
    return x, w


@needs_kernel
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (5, 16), (4, 31), (9, 32), (67, 33), (130, 100), (64, 576),
                                       (257, 640)])
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("isa", ["auto", "avx2", "scalar"])
def test_kernel_matches_fp32_linear(rows, cols, batch, isa):
    x, w = _problem(rows, cols, batch, seed=rows * 7 + cols + batch)
    y = bf16_cpu.bf16_linear_cpu(x, w, isa=isa)
    ref = F.linear(x, w.float())
    assert y.shape == (batch, rows) and y.dtype == torch.float32
    # the weights widen exactly and x stays fp32: only the order of the fp32 sums differs
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
def test_kernel_bias_strided_input_leading_dims_and_threads():
    x, w = _problem(5003, 96, 6, seed=3)          # enough rows for the threaded path, not a multiple of the block
    b = torch.randn(5003)
    xs = torch.randn(6, 200)[:, 10:106]           # a row stride that is not the row length
    xs.copy_(x)
    ref = F.linear(x, w.float(), b)
    for threads in (1, 2):
        y = bf16_cpu.bf16_linear_cpu(xs.reshape(2, 3, 96), w, b, num_threads=threads)
        assert y.shape == (2, 3, 5003)
        torch.testing.assert_close(y.reshape(6, 5003), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
def test_kernel_rejects_bad_input():
    x, w = _problem(8, 16, 1)
    with pytest.raises(TypeError, match="bfloat16"):
        bf16_cpu.bf16_linear_cpu(x, w.float())
    with pytest.raises(TypeError, match="float32"):
        bf16_cpu.bf16_linear_cpu(x.to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="shape mismatch"):
        bf16_cpu.bf16_linear_cpu(torch.randn(1, 15), w)
    with pytest.raises(ValueError, match="shape mismatch"):
        bf16_cpu.bf16_linear_cpu(x, w, torch.randn(7))
    with pytest.raises(ValueError, match="isa"):
        bf16_cpu.bf16_linear_cpu(x, w, isa="neon")
