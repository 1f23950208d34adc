"""Quality against training time in one frozen-latent distillation run: from a saved student (written by
benchmarks/refine_inputs.py), `rabit quantize`'s end-to-end settings with the latents frozen for --steps steps,
scored on WikiText-2 test (first 16 windows of 2048) and Austen's Persuasion (first 8, never trained on) after
each step count in --eval-at and at the end. The learning-rate schedule spans all --steps, so an intermediate
point is not what a run ending there would give (its rate has not decayed yet); the end point is.

    python benchmarks/budget_curve.py /tmp/exp/blk32_resid.safetensors --steps 240 --eval-at 40,80,160 \\
        --out /tmp/exp/curve240 [--plot docs/budget_curve.png]
"""
import argparse
import dataclasses
import json
import time

from safetensors.torch import load_model as load_safetensors

from rabit.data import eval_tokens, training_sequences
from rabit.eval.perplexity import perplexity
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.train.trainer import Trainer, make_student

spec = JobSpec()
t = spec.train
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("state", help="student state (safetensors)")
ap.add_argument("--out", required=True, help="writes OUT.json and the run folder OUT.run")
ap.add_argument("--steps", type=int, default=spec.steps)
ap.add_argument("--eval-at", default="", help="comma-separated step counts to score before the end")
ap.add_argument("--grad-accum", type=int, default=t.grad_accum)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--offset-seconds", type=float, default=0.0,
                help="time spent before this phase (initialization + block stage), added to the plot's x axis")
ap.add_argument("--start-json", default=None,
                help="the refine_inputs.py JSON that wrote the state: its perplexities are the step-0 point "
                     "(instead of scoring the start again)")
ap.add_argument("--plot", default=None, help="also write this PNG")
args = ap.parse_args()

teacher, tok = load_model(spec.model)
teacher.eval()
student = make_student(teacher, spec.rabit, initialize=False)
load_safetensors(student, args.state)
train, _ = training_sequences(tok, spec.data.sources, spec.data.seq_len, val_fraction=spec.data.val_fraction,
                              seed=args.seed, mix=spec.data.mix)
wiki, ood = eval_tokens(tok, "wikitext2-test"), eval_tokens(tok, "austen-persuasion")
warmup = round(spec.warmup * args.steps) if spec.warmup < 1 else int(spec.warmup)
cfg = dataclasses.replace(t, steps=args.steps, grad_accum=args.grad_accum, seed=args.seed, save_every=10**6,
                          train_latents=False, optim=dataclasses.replace(t.optim, warmup_steps=max(1, warmup)))
eval_at = {int(s) for s in args.eval_at.split(",") if s}
points, clock = [], {"eval": 0.0, "start": time.time()}


def score(steps: int) -> None:
    t0 = time.time()
    was = student.training
    student.eval()
    row = {"steps": steps, "tokens": steps * cfg.grad_accum * cfg.batch_size * spec.data.seq_len,
           "train_seconds": t0 - clock["start"] - clock["eval"],
           "wikitext2_test": perplexity(student, wiki, 2048, None, 16),
           "persuasion": perplexity(student, ood, 2048, None, 8)}
    student.train(was)
    clock["eval"] += time.time() - t0
    points.append(row)
    print(json.dumps(row), flush=True)


def before_step(trainer, step_no):
    if step_no - 1 in eval_at:
        score(step_no - 1)


if args.start_json:
    with open(args.start_json) as f:
        start = json.load(f)
    points.append({"steps": 0, "tokens": 0, "train_seconds": 0.0, "wikitext2_test": start["wikitext2_test"],
                   "persuasion": start["persuasion"], "from": args.start_json})
else:
    score(0)
clock["start"], clock["eval"] = time.time(), 0.0
Trainer(teacher, student, train, cfg, f"{args.out}.run", progress=False, step_callback=before_step).train()
score(args.steps)
with open(f"{args.out}.json", "w") as f:
    json.dump({"args": vars(args), "points": points}, f, indent=1)

if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [(p["train_seconds"] + args.offset_seconds) / 60 for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(minutes, [p["wikitext2_test"] for p in points], "o-", label="WikiText-2 test (trained domain)")
    ax.plot(minutes, [p["persuasion"] for p in points], "s-", label="Persuasion (not trained on)")
    ax.set_xlabel("minutes (initialization + block stage + distillation, 2 CPU cores)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"2-bit SmolLM2-135M, frozen-latent distillation,\n{args.steps}-step schedule", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
