"""Replay the block stage's time budget on recorded runs: each block's time per row is taken from a run's
blocks/progress.json (seconds and rows of each block, --solve seconds of fixed solves), scaled to other rows as
rows^p (--exponent; benchmarks/block_rows_time.py measures it), and each policy decides the rows block by block as
BlockReconstruction would. Prints, per run and policy, the seconds used against the budget and the rows chosen.
An in-sample replay (the same machine speeds decide and are replayed), to compare policies, not to predict.

    python benchmarks/budget_replay.py RUN:BUDGET_S [RUN:BUDGET_S ...] [--exponent 1.2]   (docs/RESULTS.md section 42)
"""
import argparse
import json
import statistics
from pathlib import Path

from rabit.train.blockwise import block_time_model, budget_rows

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("runs", nargs="+", help="run folder:the block stage's budget in seconds (from the job's log)")
ap.add_argument("--exponent", type=float, default=1.2, help="a block's non-solve seconds grow as rows^p")
ap.add_argument("--solve", type=float, default=3.0, help="seconds of a block's solves (any rows)")
ap.add_argument("--capture", type=float, default=5.0, help="seconds before the first block (input capture)")
args = ap.parse_args()


def cost(rows: int) -> float:
    return rows * (rows / 256) ** (args.exponent - 1)


def policy(same_rows: bool, max_cut: float, use_median: bool = True):
    def decide(timings, rows, remaining, left):
        chosen = [t for t in timings if t[2] == rows] if same_rows else timings
        chosen = chosen if use_median else chosen[-1:]
        fixed, per_row = block_time_model(chosen)
        return budget_rows(rows, remaining, left, fixed, per_row, 4, max_cut=max_cut)
    return decide


POLICIES = {"latest block (section 41)": policy(False, 1.0, use_median=False),
            "median, all blocks": policy(False, 1.0),
            "median, blocks at the current rows": policy(True, 1.0),
            "median at the current rows, a quarter at a time (now)": policy(True, 0.25)}

for item in args.runs:
    folder, budget = item.rsplit(":", 1)
    budget = float(budget)
    records = json.loads((Path(folder) / "blocks" / "progress.json").read_text())["records"]
    speeds = [(r["seconds"] - args.solve) / cost(r["rows"]) for r in records]
    print(f"{folder}: budget {budget:.0f} s, recorded rows {sorted({r['rows'] for r in records}, reverse=True)}")
    for name, decide in POLICIES.items():
        used, rows, timings, chosen = args.capture, records[0]["rows"], [], []
        for i, speed in enumerate(speeds):
            seconds = args.solve + speed * cost(rows)
            used += seconds
            chosen.append(rows)
            timings.append((args.solve, seconds, rows))
            rows = decide(timings, rows, len(speeds) - i - 1, budget - used)
        print(f"  {name:55s} {used:5.0f} s ({used / budget:4.0%})  rows: mean {statistics.mean(chosen):5.1f}, "
              f"last {chosen[-1]}")
