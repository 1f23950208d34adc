"""The preconditioning's calibration size against the state after the block stage (docs/RESULTS.md section 32):
the default job's initialization (its calibration drawn as the job draws it, N sequences of 512 tokens; no init
cache) and block stage, then perplexity on the first 4 windows of WikiText-2 test and of Persuasion.

    python benchmarks/calib_samples_probe.py N
"""
import dataclasses, json, sys, time
from pathlib import Path
import torch
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.data import calibration_batch, eval_tokens
from rabit.cli.quantize import _initialized_student
from rabit.train.blockwise import BlockReconstruction
from rabit.eval.perplexity import perplexity
n = int(sys.argv[1])
spec = JobSpec()
teacher, tok = load_model(spec.model); teacher.eval()
d = spec.data
t0 = time.time()
calib = calibration_batch(tok, d.calib_sources, n, d.calib_len, seed=spec.train.seed, add_bos=False)
student, cached = _initialized_student(teacher, spec.rabit, calib, False, False, False)
t_init = time.time() - t0
init_ppl = perplexity(student, eval_tokens(tok, "wikitext2-test"), 2048, None, 4)
rows = calibration_batch(tok, d.sources, spec.blocks.samples, spec.blocks.seq_len, seed=spec.train.seed + 1,
                         add_bos=False, mix=d.mix)
run = Path(f"/tmp/pab/cal{n}"); run.mkdir(exist_ok=True)
t0 = time.time()
recs = BlockReconstruction(teacher, student, rows, spec.blocks, run_dir=run, progress=False).run()
t_blocks = time.time() - t0
res = {"calib_samples": n, "init_s": t_init, "init_ppl4": init_ppl, "blocks_s": t_blocks,
       "block_loss_mean": sum(r.loss_after for r in recs) / len(recs),
       "blocks_ppl4": perplexity(student, eval_tokens(tok, "wikitext2-test"), 2048, None, 4),
       "persuasion4": perplexity(student, eval_tokens(tok, "austen-persuasion"), 2048, None, 4)}
print(json.dumps(res), flush=True)
