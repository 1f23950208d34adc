"""One packed layer called repeatedly (its sign bits stay in cache), 1 thread against 2, each call timed on its
own, medians: what threading and the software prefetch do to a cache-resident GEMV, as opposed to the streaming
GEMVs of a decoding step (benchmarks/decode_step_gemvs.py).

    OMP_WAIT_POLICY=active python benchmarks/gemv_threads.py --shapes 2048x2048,4096x4096,5632x2048
"""
import argparse
import statistics
import time

import torch

from rabit.kernels import cpu
from rabit.packed_layer import PackedRaBiTLinear

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--shapes", default="2048x2048,4096x4096,5632x2048", help="comma list of OUTxIN")
ap.add_argument("--calls", type=int, default=500)
ap.add_argument("--int8", action="store_true", help="the cpu_int8 tables instead of the exact ones")
args = ap.parse_args()

gen = torch.Generator().manual_seed(0)
for shape in args.shapes.split(","):
    out, inf = (int(v) for v in shape.lower().split("x"))
    m = PackedRaBiTLinear(inf, out, num_paths=2)
    m.packed.copy_(torch.randint(0, 256, m.packed.shape, dtype=torch.uint8, generator=gen))
    x = torch.randn(1, inf, generator=gen)
    plan = cpu.CpuLinearPlan(m.packed, m.g, m.h, None, lut8=args.int8)
    row = []
    for nt in (1, 2):
        for _ in range(50):
            plan(x, nt)
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            plan(x, nt)
            ts.append(time.perf_counter() - t0)
        row.append(f"{nt} thread(s) median {statistics.median(ts) * 1e6:.1f} us (min {min(ts) * 1e6:.1f})")
    print(f"{out}x{inf}: " + ", ".join(row))
