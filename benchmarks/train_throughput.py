"""Training throughput of coupled / independent / frozen RaBiT on the same machine, interleaved.

One student per mode is built from the same teacher; then, round after round, each mode trains one optimizer
step in turn, so that whatever else the machine is doing affects every mode alike. Reports the median step
time and tokens/s per mode, its ratio to coupled, and the optimizer-state bytes.

    python benchmarks/train_throughput.py --rounds 5 [--model SmolLM2-135M-Instruct] [--json out.json]

Throughput does not depend on the initialization, so the students use the fast "naive" one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from rabit import RaBiTConfig
from rabit.data import training_sequences
from rabit.models import DEFAULT_MODEL, load_model
from rabit.train.distributed import optimizer_state_bytes
from rabit.train.optim import OptimConfig
from rabit.train.trainer import StepLog, Trainer, TrainConfig, make_student

MODES = ("coupled", "independent", "frozen")


def trainer_state_bytes(trainer: Trainer) -> int:
    return sum(optimizer_state_bytes(o) for o in (trainer.optim.muon, trainer.optim.adamw) if o is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=5, help="optimizer steps per mode (the first is warm-up)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    teacher, tok = load_model(args.model)
    train, _ = training_sequences(tok, ["wikitext2-valid"], args.seq_len, val_fraction=0.05, seed=0)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            student = make_student(teacher, RaBiTConfig(mode=mode, init="naive", precondition=False))
            cfg = TrainConfig(steps=1, grad_accum=args.grad_accum, save_every=10**9,
                              optim=OptimConfig(latent_lr=3e-3, scale_lr=1e-3))
            trainers[mode] = Trainer(teacher, student, train, cfg, f"{tmp}/{mode}", progress=False)
        t0 = time.time()
        for _ in range(args.rounds):
            for mode, tr in trainers.items():
                tr.cfg.steps = tr.step + 1
                tr.train()  # one step (plus a checkpoint, which is not part of the step time)
        rows = {}
        for mode, tr in trainers.items():
            secs = [r["seconds"] for r in StepLog.read(tr.run_dir / "log.jsonl")][1:]  # drop warm-up
            med = statistics.median(secs)
            rows[mode] = {"median_step_seconds": med, "tokens_per_s": tr.tokens_per_step / med,
                          "steps_timed": len(secs), "optimizer_state_bytes": trainer_state_bytes(tr)}
    base = rows.get("coupled", next(iter(rows.values())))
    print(f"{args.model}, {args.grad_accum} x {args.seq_len} tokens per step, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds interleaved ({time.time() - t0:.0f} s)")
    print("| mode | median step (s) | tokens/s | vs coupled | optimizer state (MB) |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['median_step_seconds']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['optimizer_state_bytes'] / 1e6:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
