"""A block's time against its calibration rows: the block stage (BlockConfig defaults, the job's rotation) on the
first --blocks decoder blocks of the default model at each of --rows, alternating, --rounds times. Prints one JSON
line per stage run: each block's seconds and the seconds in its refinement's solves (the time budget's "fixed"
part, BlockReconstruction._solve_seconds). The time budget models a block as fixed + per-row x rows
(rabit.train.blockwise.block_time_model); this checks that model on one machine state. --attention alternates
RABIT_ATTENTION settings as well (e.g. torch auto: torch's attention kernel against the native one), and --fp32 runs
the passes in fp32 as CPUs without native bf16 do.

    python benchmarks/block_rows_time.py --rows 256 128 64 --rounds 2 --blocks 4    (docs/RESULTS.md section 42)
    python benchmarks/block_rows_time.py --rows 256 --fp32 --attention torch auto   (docs/RESULTS.md section 50)
"""
import argparse
import copy
import dataclasses
import json
import os
import time

from rabit.train.blockwise import BlockReconstruction

from _job_blocks import job_blocks

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--rows", type=int, nargs="+", default=[256, 128, 64])
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--blocks", type=int, default=4, help="decoder blocks to run")
ap.add_argument("--attention", nargs="+", default=[None], help="RABIT_ATTENTION settings to alternate")
ap.add_argument("--fp32", action="store_true", help="no bf16 autocast in the stage's passes")
args = ap.parse_args()

spec, teacher, student, pool = job_blocks(args.blocks, max(args.rows))
for rnd in range(args.rounds):
    for rows in args.rows:
        for setting in args.attention:
            if setting is not None:
                os.environ["RABIT_ATTENTION"] = setting
            cfg = dataclasses.replace(spec.blocks, samples=rows, refine_samples=rows,
                                      autocast=False if args.fp32 else spec.blocks.autocast)
            stage = BlockReconstruction(teacher, copy.deepcopy(student), pool[:rows], cfg, run_dir=None,
                                        progress=False, time_budget=1e9)   # never cut: it records the blocks' timings
            t0 = time.time()
            records = stage.run()
            print(json.dumps({"round": rnd, "rows": rows, "attention": setting, "autocast": stage.autocast,
                              "stage_seconds": round(time.time() - t0, 2),
                              "block_seconds": [round(t, 2) for _, t, _ in stage._timings],
                              "solve_seconds": [round(s, 2) for s, _, _ in stage._timings],
                              "loss_after": [round(r.loss_after, 5) for r in records]}), flush=True)
