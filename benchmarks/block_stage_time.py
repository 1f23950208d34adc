"""Where the block stage's time goes: the job's initialization (from the init cache when it has it), then the job's
block stage (BlockConfig defaults) on the first --blocks decoder blocks of the default model, with the refinement's
functions timed by wrapping them. Prints one JSON line: the stage's seconds, the seconds inside refine_paths,
gptq_signs (a call with act order counts its inner call too), refit_scales and output_error, and each block's
relative loss (to compare two versions of the code: the same losses mean the same result).

    python benchmarks/block_stage_time.py --blocks 4          (docs/RESULTS.md section 30)
"""
import argparse
import functools
import json
import time

from rabit.cli.quantize import _initialized_student
from rabit.data import calibration_batch
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.ops import refine
from rabit.train import blockwise
from rabit.train.blockwise import BlockReconstruction

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--blocks", type=int, default=4, help="decoder blocks to run (0: all)")
args = ap.parse_args()

seconds: dict[str, float] = {}


def timed(module, name):
    f = getattr(module, name)

    @functools.wraps(f)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
    setattr(module, name, wrapper)
    return wrapper


for fn in ("gptq_signs", "refit_scales", "output_error"):
    timed(refine, fn)
blockwise.refine_paths = timed(refine, "refine_paths")   # blockwise imported it by name

spec = JobSpec()
teacher, tok = load_model(spec.model)
teacher.eval()
d = spec.data
calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, seed=spec.train.seed)
student, cached = _initialized_student(teacher, spec.rabit, calib, False, False, True)
rows = calibration_batch(tok, d.sources, spec.blocks.samples, spec.blocks.seq_len, seed=spec.train.seed + 1)
if args.blocks:
    teacher.model.layers = teacher.model.layers[:args.blocks]
    student.model.layers = student.model.layers[:args.blocks]
t0 = time.time()
records = BlockReconstruction(teacher, student, rows, spec.blocks, run_dir=None, progress=False).run()
print(json.dumps({"init_from_cache": cached, "block_seconds": round(time.time() - t0, 2),
                  **{k: round(v, 2) for k, v in seconds.items()},
                  "block_loss": [r.loss_after for r in records]}))
