"""Wall-clock cost of one training checkpoint (Trainer.save) of the default model, and the bytes it writes.

--dcp: the multi-process trainer's checkpoint instead (DistributedTrainer.save, DCP, in a 1-process gloo group).

A checkpoint is written every --save-every steps while the job trains; with frozen latents (the job's default
distillation) a step takes ~1 s on 2 cores, so a checkpoint's seconds are training time lost. Prints one JSON line:
the median and each of --reps saves, the bytes of the checkpoint folder and of the shared fixed-tensor file.
Runs on any rabit version with Trainer.save (compare two checkouts by running this in each).

    python benchmarks/checkpoint_cost.py [--reps 7] [--train-latents] [--dcp] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rabit import RaBiTConfig
from rabit.train import Trainer, TrainConfig, make_student


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--train-latents", action="store_true", help="latents train (Muon state is saved too)")
    ap.add_argument("--dcp", action="store_true", help="DistributedTrainer's DCP checkpoint (a 1-process group)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    from rabit.models import load_model

    teacher, _ = load_model(args.model)
    teacher.eval().requires_grad_(False)
    student = make_student(teacher, RaBiTConfig(init="naive", precondition=False))
    rows = torch.randint(0, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=1000, train_latents=args.train_latents, autocast=False)
    with tempfile.TemporaryDirectory(dir=args.dir) as run:
        if args.dcp:
            import os

            from rabit.train import distributed as D

            for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()), RANK="0", WORLD_SIZE="1",
                             LOCAL_RANK="0").items():
                os.environ.setdefault(k, v)
            trainer = D.DistributedTrainer(teacher, student, rows, cfg, run, D.init_distributed("cpu"),
                                           progress=False)
        else:
            trainer = Trainer(teacher, student, rows, cfg, run, progress=False)
        times = []
        for i in range(args.reps):
            trainer.step = 10 * (i + 1)
            t0 = time.perf_counter()
            path = trainer.save()
            times.append(time.perf_counter() - t0)
        root = Path(run) / ("dcp" if args.dcp else "checkpoints")
        shared = sum(folder_bytes(p) if p.is_dir() else p.stat().st_size for p in root.glob("fixed-*"))
        print(json.dumps({"median_s": round(statistics.median(times), 3), "first_s": round(times[0], 3),
                          "seconds": [round(t, 3) for t in times], "checkpoint_bytes": folder_bytes(path),
                          "shared_fixed_bytes": shared, "train_latents": args.train_latents, "dcp": args.dcp,
                          "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
