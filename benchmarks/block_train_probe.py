"""Block training after the refinement: the job's block stage (BlockConfig defaults, the job's rotation and
initialization) on the first --blocks decoder blocks of the default model, once per setting EPOCHS:LATENT_LR:SCALE_LR
(0:0:0 is the refinement alone, today's default). Prints one JSON line per setting: each block's relative loss
after its refinement ("before" training) and after the stage ("after"), the median per-token loss after, and the
block's seconds. Every setting starts from the same initialized student and the same rows, so the refinement is
the same and only the training differs.

    python benchmarks/block_train_probe.py --blocks 4 0:0:0 1:0:1e-4 1:1e-4:1e-4    (docs/RESULTS.md section 51)
"""
import argparse
import copy
import dataclasses
import json
import time

from rabit.train.blockwise import BlockReconstruction

from _job_blocks import job_blocks


def setting(text: str) -> tuple[int, float, float]:
    try:
        epochs, latent_lr, scale_lr = text.split(":")
        return int(epochs), float(latent_lr), float(scale_lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCHS:LATENT_LR:SCALE_LR, got {text!r}") from None


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("settings", type=setting, nargs="+", help="EPOCHS:LATENT_LR:SCALE_LR, e.g. 1:1e-4:1e-4")
ap.add_argument("--blocks", type=int, default=4, help="decoder blocks to run")
ap.add_argument("--rows", type=int, default=256, help="calibration rows of the stage (trained and refined on)")
args = ap.parse_args()

spec, teacher, student, pool = job_blocks(args.blocks, args.rows)
for epochs, latent_lr, scale_lr in args.settings:
    cfg = dataclasses.replace(spec.blocks, samples=args.rows, refine_samples=args.rows, epochs=epochs,
                              latent_lr=latent_lr, scale_lr=scale_lr)
    stage = BlockReconstruction(teacher, copy.deepcopy(student), pool, cfg, run_dir=None, progress=False,
                                time_budget=1e9)
    t0 = time.time()
    records = stage.run()
    print(json.dumps({"epochs": epochs, "latent_lr": latent_lr, "scale_lr": scale_lr,
                      "stage_seconds": round(time.time() - t0, 1),
                      "loss_refined": [round(r.loss_before, 4) for r in records],
                      "loss_after": [round(r.loss_after, 4) for r in records],
                      "median_after": [round(r.loss_after_median, 4) for r in records],
                      "block_seconds": [round(r.seconds, 1) for r in records]}), flush=True)
