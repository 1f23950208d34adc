"""The time budget's timed steps, A/B from one post-block-stage state of the default job (docs/RESULTS.md
section 32): 'old' (the first 3 steps at a near-zero rate, as before) against 'new' (only the first; the next two
at the rates of a schedule sized from the first step's time). Same data and start; a fake clock makes both runs
choose the same number of steps. Then the held-out distillation loss and perplexity on the first 4 windows of
WikiText-2 test and of Persuasion.

    python benchmarks/budget_probe_ab.py {old,new} SEED [BLOCKS_DIR]

BLOCKS_DIR: a job's run folder's blocks/ (e.g. runs/demo/blocks of `make demo`) to resume the block stage from
(else it runs); the state after it is kept in /tmp/pab/postblock.safetensors for the next calls.
"""
import dataclasses, json, sys, shutil, time
from pathlib import Path
import torch
from safetensors.torch import save_model, load_model as load_st
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.data import calibration_batch, training_sequences, eval_tokens
from rabit.cli.quantize import _initialized_student
from rabit.train.blockwise import BlockReconstruction
from rabit.train.trainer import Trainer, make_student
from rabit.train import loop
from rabit.eval.perplexity import perplexity

arm, seed = sys.argv[1], int(sys.argv[2])
spec = JobSpec()
spec = dataclasses.replace(spec, job_minutes=13.0)
teacher, tok = load_model(spec.model); teacher.eval()
d = spec.data
Path("/tmp/pab").mkdir(exist_ok=True)
state = Path("/tmp/pab/postblock.safetensors")
if not state.exists():
    calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, seed=spec.train.seed, add_bos=False)
    student, cached = _initialized_student(teacher, spec.rabit, calib, False, False, True)
    print("init cached", cached, flush=True)
    run = Path("/tmp/pab/run"); run.mkdir(exist_ok=True)
    if not (run / "blocks").exists():
        if len(sys.argv) > 3:
            shutil.copytree(sys.argv[3], run / "blocks")
    rows = calibration_batch(tok, d.sources, spec.blocks.samples, spec.blocks.seq_len, seed=spec.train.seed + 1,
                             add_bos=False, mix=d.mix)
    t0 = time.time()
    BlockReconstruction(teacher, student, rows, spec.blocks, run_dir=run, progress=False).run()
    print("blocks", time.time() - t0, flush=True)
    save_model(student, str(state))
student = make_student(teacher, spec.rabit, initialize=False)
load_st(student, str(state))
train, val = training_sequences(tok, d.sources, d.seq_len, val_fraction=d.val_fraction, seed=seed, mix=d.mix,
                                add_bos=False)
tcfg = spec.train_config(False, budget_s=24.0)
tcfg = dataclasses.replace(tcfg, seed=seed, save_every=10**6)

class Clock:
    def __init__(self): self.now = 0.0
    def perf_counter(self):
        self.now += 0.25
        return self.now
loop.time = Clock()
if arm == "old":
    loop.DistillLoop._provisional_schedule = lambda self, *a: None
out = Path(f"/tmp/pab/{arm}{seed}"); shutil.rmtree(out, ignore_errors=True)
tr = Trainer(teacher, student, train, tcfg, out, progress=False)
val_rows = val[: d.val_sequences]
before = tr.evaluate(val_rows)
r = tr.train()
after = tr.evaluate(val_rows)
log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
for p in student.parameters(): p.requires_grad_(False)
student.eval()
res = {"arm": arm, "seed": seed, "steps": r.steps, "lrs": [x["lr_scale"] for x in log[:5]],
       "val_before": before, "val_after": after,
       "wt2_4": perplexity(student, eval_tokens(tok, "wikitext2-test"), 2048, None, 4),
       "persuasion_4": perplexity(student, eval_tokens(tok, "austen-persuasion"), 2048, None, 4)}
print(json.dumps(res), flush=True)
with open(f"/tmp/pab/{arm}{seed}.json", "w") as f: json.dump(res, f)
