"""End-to-end training variants from one finished block stage: the job's pipeline (rotation, initialization from
the cache, the block stage resumed from a copy of a run folder's blocks/, so no block is refined again), then a
fixed number of the job's frozen-latent distillation steps with the given overrides, the held-out loss before and
after, WikiText-2 test (16 windows of 2048) and Austen's Persuasion (8 windows, not trained on). One JSON line per
run on stdout and appended to --jsonl. Every variant of a comparison starts from the same paths and sees the same
rows in the same order; only what is overridden differs.

    python benchmarks/train_from_blocks.py --blocks RUN/blocks --seed 0 --steps 200 --scale-lr 1.5e-4 --tag lr1.5e-4
    (docs/RESULTS.md section 44; RUN: a `rabit quantize --job-minutes 13 --seed S` run folder)

--head-lr trains the full-precision output head as well (a model whose head is not tied to its embeddings, as
after the job's rotation), in an AdamW group of its own at that rate; the job has no such option (section 44
measured it). A blocks/ folder written before a BlockConfig field existed gets that field at today's default in
its copy, so that the stage still resumes.
"""
import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from rabit.cli import quantize as job
from rabit.data import eval_tokens, training_sequences
from rabit.job import JobSpec
from rabit.train import optim
from rabit.train import trainer as trainer_module

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--blocks", required=True, help="a finished block stage's folder (RUN/blocks) of the same --seed")
ap.add_argument("--seed", type=int, default=0, help="the run's --seed (rotation, rows, training order)")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--scale-lr", type=float, default=None, help="default: the job's")
ap.add_argument("--min-lr-ratio", type=float, default=None, help="default: the job's")
ap.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the job's)")
ap.add_argument("--head-lr", type=float, default=0.0, help="also train the output head at this rate (0: frozen)")
ap.add_argument("--tag", required=True)
ap.add_argument("--jsonl", default="train_from_blocks.jsonl")
args = ap.parse_args()


def train_head_too(head_lr: float) -> None:
    """Make the trainer leave the untied output head trainable, in an AdamW group of its own at head_lr."""
    prepare = trainer_module.prepare_student

    def prepare_with_head(model, **kw):
        prepare(model, **kw)
        head = model.get_output_embeddings()
        if head.weight is model.get_input_embeddings().weight:
            raise SystemExit("--head-lr: the model's head is tied to its embeddings")
        head.weight.requires_grad_(True)
        return optim.split_parameters(model)

    init = optim.Optimizers.__init__

    def init_with_head_group(self, split, config, total_steps):
        init(self, split, config, total_steps)
        group = self.adamw.param_groups[0]
        head = [p for p in group["params"] if p.ndim == 2]
        group["params"] = [p for p in group["params"] if p.ndim != 2]
        self.adamw.add_param_group({"params": head, "base_lr": head_lr})
        self.apply_schedule()

    def apply_schedule(self):
        f = self.factor()
        for key, opt in self.named().items():
            for group in opt.param_groups:
                group["lr"] = group.get("base_lr", self._base[key]) * f

    trainer_module.prepare_student = prepare_with_head
    optim.Optimizers.__init__ = init_with_head_group
    optim.Optimizers.apply_schedule = apply_schedule


if args.head_lr:
    train_head_too(args.head_lr)
spec = JobSpec()
spec.train = dataclasses.replace(spec.train, seed=args.seed)
teacher, tok = job.load_teacher(spec, "cpu")
d = spec.data
seq_len = args.seq_len or d.seq_len
# the held-out rows (and the block stage's rows, which avoid them) are the job's, at its sequence length; the corpus
# is split again only for another --seq-len (whose training rows may then overlap those held-out rows)
train, val = training_sequences(tok, d.sources, d.seq_len, val_fraction=d.val_fraction, seed=args.seed, mix=d.mix)
if seq_len != d.seq_len:
    train, _ = training_sequences(tok, d.sources, seq_len, val_fraction=d.val_fraction, seed=args.seed, mix=d.mix)
held_out = job.held_out_rows(spec, val)
student, _ = job._initialized_student(teacher, spec.rabit, None, True, False, True)

work = Path(tempfile.mkdtemp(prefix="train_from_blocks-"))
try:
    shutil.copytree(args.blocks, work / "blocks")
    progress = work / "blocks" / "progress.json"
    saved = json.loads(progress.read_text())
    today = json.loads(json.dumps(spec.blocks.to_dict()))
    saved["identity"]["config"] = {**{k: v for k, v in today.items() if k not in saved["identity"]["config"]},
                                   **saved["identity"]["config"]}
    progress.write_text(json.dumps(saved))
    # skip_init: the stage's own 4-window evaluation is not run (ppl is never called)
    job._block_stage(dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, skip_init=True)), teacher,
                     student, tok, work, {}, None, False, False, time_budget=1e9, avoid=held_out)

    tcfg = spec.train_config(True)
    o = tcfg.optim
    if args.scale_lr is not None:
        o = dataclasses.replace(o, scale_lr=args.scale_lr)
    if args.min_lr_ratio is not None:
        o = dataclasses.replace(o, min_lr_ratio=args.min_lr_ratio)
    tcfg = dataclasses.replace(tcfg, steps=args.steps, save_every=10**6, optim=o)
    tr = trainer_module.Trainer(teacher, student, train, tcfg, work / "train", progress=False)
    before = tr.evaluate(held_out)
    t0 = time.time()
    tr.train()
    seconds = time.time() - t0
    after = tr.evaluate(held_out)
    tr.teacher_run = None
    scorer = job.JobPerplexity(spec, eval_tokens(tok, spec.eval.data), None, "", False, autocast=True)
    wikitext, _ = scorer.full(student, "2-bit")
    ood = {}
    job._out_of_domain(spec, teacher, student, tok, ood, False, None, True)
finally:
    shutil.rmtree(work, ignore_errors=True)
record = {"tag": args.tag, "seed": args.seed, "steps": args.steps, "seq_len": seq_len,
          "scale_lr": tcfg.optim.scale_lr, "min_lr_ratio": tcfg.optim.min_lr_ratio, "head_lr": args.head_lr,
          "held_out_kl": [before["kl"], after["kl"]], "train_seconds": round(seconds, 1),
          "wikitext2": wikitext, "ood": ood["ood"]["final"], "ood_fp": ood["ood"]["fp"]}
print(json.dumps(record), flush=True)
with open(args.jsonl, "a") as f:
    f.write(json.dumps(record) + "\n")
