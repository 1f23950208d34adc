"""Per-call cost of the ways to reach the native packed kernel, on a tiny layer (the kernel itself ~free):

    PYTHONPATH=src python benchmarks/dispatch_overhead.py [--reps 30] [--calls 500]

the cached plan alone, ``kernels.rabit_linear`` (eager, no grad: the path the layer and the decoders take), the
registered operator ``torch.ops.rabit.packed_linear`` through the dispatcher, and a ``PackedRaBiTLinear`` call.
Interleaved repetitions, CPU time of this process (robust to other load on the machine), medians in microseconds
and the ratio to the plan alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from rabit import kernels  # noqa: E402
from rabit.kernels import cpu  # noqa: E402
from rabit.packed_layer import PackedRaBiTLinear  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--calls", type=int, default=500)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    layer = PackedRaBiTLinear(64, 64, num_paths=2, backend="cpu")
    layer.g.fill_(1)
    layer.h.fill_(1)
    P, g, h = layer.packed, layer.g, layer.h
    x = torch.randn(1, 1, 64)
    plan = cpu._plan_for(P, g, h, None)
    ways = {"plan": lambda: plan(x, 1),
            "rabit_linear": lambda: kernels.rabit_linear(x, P, g, h, None, backend="cpu", threads=1),
            "torch.ops op": lambda: torch.ops.rabit.packed_linear(x, P, g, h, None, "cpu", 1),
            "module": lambda: layer(x)}
    times = {k: [] for k in ways}
    with torch.inference_mode():
        for fn in ways.values():
            for _ in range(a.calls):
                fn()
        for _ in range(a.reps):
            for k, fn in ways.items():
                t = time.process_time()
                for _ in range(a.calls):
                    fn()
                times[k].append((time.process_time() - t) / a.calls * 1e6)
    base = statistics.median(times["plan"])
    print("| call | median us | x plan |\n|---|---|---|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
