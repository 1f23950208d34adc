"""Perplexity after initialization + the block stage's refinement alone (no training), for one choice of
BlockConfig.refine_inputs (docs/RESULTS.md section 11). Saves the student as NAME.safetensors for
benchmarks/e2e_from_state.py.

    python benchmarks/refine_inputs.py --inputs corrected --rounds 1 --samples 16 --out /tmp/exp/corr1
"""
import argparse
import dataclasses
import json
import time

from safetensors.torch import save_model

from rabit.cli.quantize import _initialized_student
from rabit.data import calibration_batch, eval_tokens
from rabit.eval.perplexity import perplexity
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.train.blockwise import REFINE_INPUTS, BlockReconstruction

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--inputs", choices=REFINE_INPUTS, default="corrected")
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--samples", type=int, default=16, help="refinement sequences (of --seq-len tokens)")
ap.add_argument("--seq-len", type=int, default=None, help="block-stage sequence length (default: the job's)")
ap.add_argument("--data", default=None, help="corpora of the block stage (default: the job's training mix)")
ap.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 2048")
ap.add_argument("--ood-windows", type=int, default=8, help="Persuasion windows of 2048")
ap.add_argument("--epochs", type=int, default=0, help="block training after the refinement (0: none)")
ap.add_argument("--block-samples", type=int, default=None, help="block training sequences (default: --samples)")
ap.add_argument("--latent-lr", type=float, default=None, help="block training latent lr (0: scales and norms only)")
ap.add_argument("--scale-lr", type=float, default=None, help="block training scale lr")
ap.add_argument("--target-damp", type=float, default=None, help="ridge of the refinement targets (default: the job's)")
ap.add_argument("--metric-damp", type=float, default=None, help="damping of the refinement's metric H (default: the job's)")
ap.add_argument("--no-act-order", dest="act_order", action="store_false",
                help="round the refinement's signs in natural column order (default: GPTQ's act order)")
ap.add_argument("--block-bf16", action=argparse.BooleanOptionalAction, default=None,
                help="the stage's forward passes under bf16 autocast (default: the job's, native bf16 CPUs)")
ap.add_argument("--alpha-out", type=float, default=None, help="the initialization's output-importance exponent")
ap.add_argument("--out", required=True, help="writes OUT.json and OUT.safetensors")
args = ap.parse_args()

spec = JobSpec()
teacher, tok = load_model(spec.model)
teacher.eval()
d = spec.data
calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, seed=spec.train.seed)
if args.alpha_out is not None:
    spec.rabit.alpha_out = args.alpha_out
t0 = time.time()
student, cached = _initialized_student(teacher, spec.rabit, calib, False, False, True)
res = {"args": vars(args), "init_seconds": time.time() - t0, "init_cached": cached}
cfg = dataclasses.replace(spec.blocks, refine_inputs=args.inputs, refine_rounds=args.rounds,
                          refine_samples=args.samples, epochs=args.epochs, act_order=args.act_order,
                          seq_len=args.seq_len or spec.blocks.seq_len,
                          target_damp=spec.blocks.target_damp if args.target_damp is None else args.target_damp,
                          metric_damp=spec.blocks.metric_damp if args.metric_damp is None else args.metric_damp,
                          samples=max(args.samples, args.block_samples or spec.blocks.samples),
                          autocast=args.block_bf16,
                          latent_lr=spec.blocks.latent_lr if args.latent_lr is None else args.latent_lr,
                          scale_lr=spec.blocks.scale_lr if args.scale_lr is None else args.scale_lr)
rows = calibration_batch(tok, args.data.split(",") if args.data else d.sources, cfg.samples, cfg.seq_len,
                         seed=spec.train.seed + 1)
t0 = time.time()
records = BlockReconstruction(teacher, student, rows, cfg, run_dir=None, progress=False).run()
res["block_seconds"] = time.time() - t0
res["block_loss"] = [r.loss_after for r in records]
res["refine_ratio"] = [r.refine_ratio for r in records]
res["wikitext2_test"] = perplexity(student, eval_tokens(tok, "wikitext2-test"), 2048, None, args.windows)
res["persuasion"] = perplexity(student, eval_tokens(tok, "austen-persuasion"), 2048, None, args.ood_windows)
print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}), flush=True)
with open(f"{args.out}.json", "w") as f:
    json.dump(res, f, indent=1)
for p in student.parameters():
    p.requires_grad_(False)
save_model(student, f"{args.out}.safetensors")
