"""Where a batch-1 decoding step's time goes on the CPU: the packed GEMVs of one step (every linear of the
benchmark Llama of `rabit bench decode`, called in decoding order on random inputs, so that the 115 MB of sign
bits stream from memory as they do when decoding) for each code path of the native kernel (exact fp32 tables and
the int8 tables of the "cpu_int8" backend), and the rest of a step (norms, RoPE, attention, the Python loop)
with the GEMVs replaced by stubs. Medians over interleaved rounds in one process.

    python benchmarks/decode_step_gemvs.py --isas avx512vbmi,avx512,avx2,scalar --threads 2
"""
import argparse
import statistics
import time

import torch

import rabit.kernels as kernels
from rabit.cli.bench import BENCH_SHAPE, _torch_run, make_random_llama, packed_copy
from rabit.generate import StaticDecoder
from rabit.kernels import cpu
from rabit.packed_layer import PackedRaBiTLinear
from stub_plan import StubPlan

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--isas", default="auto", help="comma list of auto, avx512vbmi, avx512, avx2, scalar")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--passes", type=int, default=10, help="passes over the step's layers per round")
args = ap.parse_args()

torch.set_num_threads(args.threads)
model = packed_copy(make_random_llama(**BENCH_SHAPE, seed=0, max_positions=4096), quantize_head=True)
layers = [m for m in model.modules() if isinstance(m, PackedRaBiTLinear)]
xs = [torch.randn(1, m.in_features) for m in layers]
nbytes = sum(m.packed.numel() for m in layers)
cfgs = [(isa, lut8) for isa in args.isas.split(",") for lut8 in (False, True)]
plans = {c: [cpu.CpuLinearPlan(m.packed, m.g, m.h, None, isa=c[0], lut8=c[1]) for m in layers] for c in cfgs}
times = {c: [] for c in cfgs}
with torch.inference_mode():
    for _ in range(args.rounds):
        for c in cfgs:
            for _ in range(args.passes):
                t0 = time.perf_counter()
                for plan, x in zip(plans[c], xs):
                    plan(x, args.threads)
                times[c].append(time.perf_counter() - t0)
print(f"{len(layers)} packed GEMVs per step, {nbytes / 1e6:.1f} MB of sign bits, {args.threads} threads, "
      f"CPU kernel ISA {cpu.isa()}")
print("| code path | tables | GEMVs per step | GB/s |\n|---|---|---:|---:|")
for (isa, lut8), v in times.items():
    m = statistics.median(v)
    print(f"| {isa} | {'int8' if lut8 else 'fp32 (exact)'} | {m * 1e3:.2f} ms | {nbytes / m / 1e9:.1f} |")


# the rest of a step: the decoder with every packed GEMV replaced by a stub returning zeros (both ways the decoder
# reaches the kernel: the prepared plan it calls per token, and rabit_linear under torch.compile)
real, real_plan = kernels.rabit_linear, cpu.CpuLinearPlan
kernels.rabit_linear = lambda x, packed, g, h, bias=None, **kw: x.new_zeros(*x.shape[:-1], g.shape[-1])
cpu.CpuLinearPlan = StubPlan
try:
    prompt = torch.randint(3, BENCH_SHAPE["vocab"], (1, 128), generator=torch.Generator().manual_seed(0))
    dec = StaticDecoder(model, 128 + 128 + 2)
    _torch_run(dec, prompt, 8)
    rest = statistics.median(1e3 / _torch_run(dec, prompt, 128) for _ in range(3))
finally:
    kernels.rabit_linear, cpu.CpuLinearPlan = real, real_plan
print(f"rest of a step (GEMVs stubbed): {rest:.2f} ms")
