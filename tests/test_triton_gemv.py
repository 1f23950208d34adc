"""The split-K Triton GEMV (``rabit.kernels.triton_gemv``): its launch heuristic (plain Python), and the kernel
against ``rabit_linear_reference`` under the Triton interpreter on CPU (one subprocess runs every case: the
interpreter must be chosen before triton compiles anything, and starting it once keeps the tests fast)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rabit import sign_bits
from rabit.kernels.reference import rabit_linear_reference
from rabit.kernels.triton_gemv import GEMV_MAX_ROWS, gemv_launch_params
from test_kernels import SRC, _triton_importable, rel_err

# (name, k, out, in, rows of x, x dtype, scale dtype, bias, gemv_config): odd sizes (out not a multiple of 16,
# in not of 32), 1-12 rows (two row groups of x past GEMV_MAX_ROWS), K splits that do not divide the words
CASES = [
    ("k1_tiny", 1, 5, 7, 1, torch.float32, torch.float32, True, None),
    ("k2_bf16_3rows", 2, 33, 65, 3, torch.bfloat16, torch.float32, False, None),
    ("k3_fp16_8rows_split2", 3, 47, 161, 8, torch.float16, torch.float16, True, {"SPLIT_K": 2}),
    ("k2_2rows_split4", 2, 130, 300, 2, torch.float32, torch.float32, False, {"SPLIT_K": 4}),   # 10 words: 4+4+2
    ("k3_bf16_5rows_split7", 3, 17, 1000, 5, torch.bfloat16, torch.bfloat16, True, {"SPLIT_K": 7}),  # 32 = 6*5+2
    ("k1_fp16_4rows", 1, 100, 577, 4, torch.float16, torch.float32, True, None),
    ("k2_heuristic_splits", 2, 64, 2048, 1, torch.float32, torch.float32, True, None),   # 8 slices of 8 words
    ("k2_12rows", 2, 20, 40, 12, torch.float32, torch.float32, True, None),
    ("k1_blocks_forced", 1, 70, 200, 6, torch.float32, torch.float32, False,
     {"SPLIT_K": 3, "BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_W": 2}),
    # the select-and-add variant (SIGN_XOR off; the default flips sign bits): odd sizes, dtypes, splits, rows
    ("select_k1_tiny", 1, 5, 7, 1, torch.float32, torch.float32, True, {"SIGN_XOR": False}),
    ("select_k2_fp16_split3", 2, 130, 300, 1, torch.float16, torch.float16, False, {"SIGN_XOR": False, "SPLIT_K": 3}),
    ("select_k3_bf16_5rows", 3, 47, 161, 5, torch.bfloat16, torch.float32, True, {"SIGN_XOR": False}),
    ("select_k2_12rows_blocks", 2, 70, 1000, 12, torch.float32, torch.float32, True,
     {"SIGN_XOR": False, "BLOCK_N": 32, "BLOCK_W": 2, "SPLIT_K": 4}),
    # the lookup-table kernel: inputs not a multiple of 4 or 32, several rows of x, splits, every dtype
    ("lut_k1_tiny", 1, 5, 7, 1, torch.float32, torch.float32, True, {"LUT": True}),
    ("lut_k2_fp16_split3", 2, 130, 300, 1, torch.float16, torch.float16, False, {"LUT": True, "SPLIT_K": 3}),
    ("lut_k3_bf16_5rows", 3, 47, 161, 5, torch.bfloat16, torch.float32, True, {"LUT": True}),
    ("lut_k2_8rows_blocks", 2, 70, 1000, 8, torch.float32, torch.float32, True,
     {"LUT": True, "BLOCK_N": 64, "BLOCK_W": 2, "SPLIT_K": 4}),
    ("lut_k2_one_split", 2, 64, 2048, 1, torch.float32, torch.float32, False, {"LUT": True, "SPLIT_K": 1}),
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# one layer, SPLIT_K from 1 to more slices than its 22 words (normalized to 22 slices of one word)
SPLIT_SHAPE = (2, 50, 700, 3)
SPLITS = [1, 2, 3, 5, 22, 1000]


def make_inputs(k, out, inf, rows, x_dtype, scale_dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(k, out, inf, generator=gen) > 0.5, 1.0, -1.0)
    g = (torch.rand(k, out, generator=gen) + 0.1).to(scale_dtype)
    h = torch.randn(k, inf, generator=gen).to(scale_dtype)
    b = torch.randn(out, generator=gen).to(scale_dtype) if bias else None
    x = torch.randn(rows, inf, generator=gen).to(x_dtype)
    return x, sign_bits.pack_signs(signs), g, h, b


def _runs():
    """(run name, inputs, gemv_config) for the interpreter subprocess."""
    runs = []
    for i, (name, k, out, inf, rows, xdt, sdt, bias, cfg) in enumerate(CASES):
        runs.append((name, make_inputs(k, out, inf, rows, xdt, sdt, bias, seed=i), cfg))
    split_inputs = make_inputs(*SPLIT_SHAPE, torch.float32, torch.float32, True, seed=100)
    for s in SPLITS:
        runs.append((f"split{s}", split_inputs, {"SPLIT_K": s}))
    runs.append(("split_heuristic", split_inputs, None))
    runs.append(("split_heuristic_again", split_inputs, None))
    return runs


WORKER = textwrap.dedent("""
    import sys
    import torch
    from rabit.kernels.triton_gemv import rabit_linear_triton
    runs = torch.load(sys.argv[1])
    outputs = {name: rabit_linear_triton(*inputs, mode="gemv", gemv_config=cfg) for name, inputs, cfg in runs}
    torch.save(outputs, sys.argv[2])
""")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """{run name: (inputs, output of the Triton GEMV under the interpreter)}."""
    if not _triton_importable():
        pytest.skip("triton not installed")
    tmp = tmp_path_factory.mktemp("gemv")
    runs = _runs()
    torch.save(runs, tmp / "runs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-c", WORKER, str(tmp / "runs.pt"), str(tmp / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = torch.load(tmp / "out.pt")
    return {name: (inputs, outputs[name]) for name, inputs, _ in runs}


def reference(inputs):
    x, packed, g, h, b = inputs
    return rabit_linear_reference(x.double(), packed, g.double(), h.double(), None if b is None else b.double(),
                                  compute_dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gemv_matches_reference(interpreted, case):
    name, xdt = case[0], case[5]
    inputs, y = interpreted[name]
    ref = reference(inputs)
    assert y.dtype == xdt and y.shape == ref.shape
    assert rel_err(y, ref) < TOL[xdt], name


def test_forced_splits_agree(interpreted):
    """Every SPLIT_K gives the reference's result (to fp32 rounding); one past the word count is normalized to one
    word per slice, so it is the same launch as SPLIT_K = 22; the float32 partials make repeated calls equal."""
    inputs = interpreted["split1"][0]
    ref = reference(inputs)
    ys = {s: interpreted[f"split{s}"][1] for s in SPLITS}
    for s, y in ys.items():
        assert rel_err(y, ref) < 1e-6, s
        assert torch.allclose(y, ys[1], rtol=1e-5, atol=1e-5 * ys[1].abs().max().item()), s
    assert torch.equal(ys[1000], ys[22])
    assert torch.equal(interpreted["split_heuristic"][1], interpreted["split_heuristic_again"][1])


# ------------------------------------------------------------------ heuristic (no triton needed)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 12])
@pytest.mark.parametrize("out,inf", [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (576, 1536),
                                     (5, 7)])
def test_launch_params_heuristic(rows, out, inf):
    words = sign_bits.padded_in(inf) // 32
    c = gemv_launch_params(rows, out, words, 2, 132)
    bm, bn, bw, split, wps = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_W"], c["SPLIT_K"], c["WPS"]
    assert bm == min(1 << (rows - 1).bit_length(), GEMV_MAX_ROWS)
    assert bn % 16 == 0 and bm * bn * bw * 32 <= 8192          # whole tiles; bounded accumulators
    assert wps % bw == 0 and split * wps >= words > (split - 1) * wps   # every word once, no empty slice
    programs = -(-out // bn) * split * -(-rows // bm)
    if split > 1:
        assert programs <= 2 * 4 * 132                             # about GEMV_PROGRAMS_PER_SM per SM
        assert wps * bn * 2 * 4 >= 4096                            # each slice reads a few KB
    if (out, inf, rows) == (4096, 4096, 1):
        assert (split, wps, bn, programs) == (5, 28, 32, 640)


def test_launch_params_forced_and_validated():
    c = gemv_launch_params(1, 4096, 128, 2, 132, (("SPLIT_K", 1000), ("num_warps", 8)))
    assert (c["SPLIT_K"], c["WPS"], c["num_warps"]) == (32, 4, 8)     # one 4-word block per slice
    assert gemv_launch_params(1, 4096, 128, 2, 132, (("SPLIT_K", 1),))["WPS"] == 128
    for bad in [(("SPLIT_K", 0),), (("BLOCK_N", 8),), (("BLOCK_W", 3),), (("splitk", 2),)]:
        with pytest.raises(ValueError):
            gemv_launch_params(1, 4096, 128, 2, 132, bad)
