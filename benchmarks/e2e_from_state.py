"""End-to-end distillation from a saved student (benchmarks/refine_inputs.py or block_stage_probe.py write
one), with `rabit quantize`'s training settings unless overridden; then WikiText-2 test perplexity (first 16
windows of 2048) and Austen's Persuasion (first 8). Optionally a scale-only phase (latents frozen) after it.

    python benchmarks/e2e_from_state.py /tmp/exp/corr1.safetensors --out /tmp/exp/e_corr1 --steps 20
    (docs/RESULTS.md section 10 trained on WikiText-2 validation only: --data wikitext2-valid)

--mode independent starts standard residual QAT from a coupled state's paths (same signs and scales; one latent
per path, as RaBiTLinear.load_paths sets them); --correlations N adds rabit diagnose's path correlations on N
calibration rows before and after training (docs/RESULTS.md section 20).
"""
import argparse
import dataclasses
import json
import time

from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model

from rabit.data import eval_tokens, training_sequences
from rabit.eval.perplexity import perplexity
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.train.trainer import Trainer, make_student
from rabit.layer import RaBiTLinear


def student_mode(model):
    return next(m.mode for m in model.modules() if isinstance(m, RaBiTLinear))


def convert_mode(teacher, student, config):
    """A student of config.mode starting from `student`'s paths (scales, signs); latents from the teacher's weights."""
    import torch

    other = make_student(teacher, config, initialize=False)
    other.load_state_dict({k: v for k, v in student.state_dict().items() if ".latent" not in k}, strict=False)
    t_mods = dict(teacher.named_modules())
    src = dict(student.named_modules())
    with torch.no_grad():
        for name, mod in other.named_modules():
            if isinstance(mod, RaBiTLinear):
                mod.load_paths(src[name].paths(), t_mods[name].weight.float())
    return other


def correlations(rows):
    from rabit.data import calibration_batch
    from rabit.diagnose import path_correlations, summarize

    calib = calibration_batch(tok, spec.data.sources, rows, spec.data.seq_len, seed=12345)
    return summarize(path_correlations(student, teacher, calib))

spec = JobSpec()
t, o = spec.train, spec.train.optim
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("state", help="student state (safetensors)")
ap.add_argument("--out", required=True, help="writes OUT.json, OUT.safetensors and the run folder OUT.run")
ap.add_argument("--steps", type=int, default=spec.steps)
ap.add_argument("--scale-steps", type=int, default=0, help="then this many steps with the latents frozen")
ap.add_argument("--data", default=",".join(spec.data.sources))
ap.add_argument("--mix", default=spec.data.mix, help="size or equal (rabit.data.training_sequences)")
ap.add_argument("--latent-lr", type=float, default=o.latent_lr)
ap.add_argument("--scale-lr", type=float, default=o.scale_lr)
ap.add_argument("--grad-accum", type=int, default=t.grad_accum)
ap.add_argument("--seq-len", type=int, default=spec.data.seq_len, help="training sequence length")
ap.add_argument("--gamma", type=float, default=t.gamma)
ap.add_argument("--mode", default=spec.rabit.mode)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--warmup", type=float, default=spec.warmup, help="warm-up: a fraction of the steps if < 1, else steps")
ap.add_argument("--correlations", type=int, default=0,
                help="path correlations (rabit diagnose) on this many calibration rows, before and after")
ap.add_argument("--ns-steps", type=int, default=o.muon_ns_steps, help="Newton-Schulz iterations of Muon")
args = ap.parse_args()

teacher, tok = load_model(spec.model)
teacher.eval()
student = make_student(teacher, spec.rabit, initialize=False)
load_safetensors(student, args.state)
if args.mode != student_mode(student):
    # e.g. an independent-mode run from a coupled refined start: the same paths (signs and scales), each
    # path's latent set from them as RaBiTLinear.load_paths does for that mode
    student = convert_mode(teacher, student, dataclasses.replace(spec.rabit, mode=args.mode))
train, _ = training_sequences(tok, args.data.split(","), args.seq_len, val_fraction=spec.data.val_fraction,
                              seed=args.seed, mix=args.mix)


def config(steps, lr_scale):
    warmup = round(args.warmup * steps) if args.warmup < 1 else int(args.warmup)
    optim = dataclasses.replace(o, latent_lr=args.latent_lr, scale_lr=lr_scale, warmup_steps=max(1, warmup),
                                muon_ns_steps=args.ns_steps)
    # --steps trains the latents too, whatever the job's default (--scale-steps freezes them below)
    return dataclasses.replace(t, steps=steps, grad_accum=args.grad_accum, gamma=args.gamma, seed=args.seed,
                               save_every=10**6, optim=optim, train_latents=True)


res = {"args": vars(args)}
if args.correlations:
    res["correlations_before"] = correlations(args.correlations)
if args.steps:
    t0 = time.time()
    r = Trainer(teacher, student, train, config(args.steps, args.scale_lr), f"{args.out}.run", progress=False).train()
    res["train"] = {"seconds": time.time() - t0, "tokens_per_second": r.tokens_per_second, "last": r.last}
if args.scale_steps:
    t0 = time.time()
    scale_cfg = dataclasses.replace(config(args.scale_steps, args.scale_lr), train_latents=False)
    r = Trainer(teacher, student, train, scale_cfg, f"{args.out}.run/scales", progress=False).train()
    res["scales"] = {"seconds": time.time() - t0, "tokens_per_second": r.tokens_per_second, "last": r.last}
for p in student.parameters():
    p.requires_grad_(False)
student.eval()
if args.correlations:
    res["correlations_after"] = correlations(args.correlations)
res["wikitext2_test"] = perplexity(student, eval_tokens(tok, "wikitext2-test"), 2048, None, 16)
res["persuasion"] = perplexity(student, eval_tokens(tok, "austen-persuasion"), 2048, None, 8)
print(json.dumps({k: v for k, v in res.items() if k not in ("train", "scales")}), flush=True)
with open(f"{args.out}.json", "w") as f:
    json.dump(res, f, indent=1)
save_model(student, f"{args.out}.safetensors")
