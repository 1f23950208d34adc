"""Batch-1 GEMV: packed 2-bit RaBiT CPU kernel vs fp32 F.linear vs a memory copy of the same bytes.

    PYTHONPATH=src python benchmarks/bench_gemv.py [--runs 30] [--threads 2] [--k 2] [--shapes 4096x4096,...]

Prints a markdown table (medians over --runs interleaved runs).  Targets: >= 8x faster than fp32 F.linear and
>= 60% of the copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rabit.bench import DEFAULT_SHAPES, format_markdown, run_gemv_bench  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=2, help="number of binary paths")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in DEFAULT_SHAPES),
                    help="comma-separated OUTxIN")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
    rows = run_gemv_bench(shapes, num_paths=a.k, threads=a.threads, runs=a.runs, warmup=a.warmup,
                          backend=a.backend)
    if rows:
        from rabit.kernels import cpu
        if rows[0]["backend"] == "cpu":
            print(f"CPU kernel ISA: {cpu.isa()}, OpenMP: {cpu.has_openmp()}")
    print(format_markdown(rows))
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
