"""`rabit ptq`: post-training initialization only (no training) and FP vs 2-bit perplexity."""
from __future__ import annotations

import copy
import json
import time

import torch

import dataclasses

from ..config import RaBiTConfig
from ..job import DataSpec, EvalSpec, JobSpec
from ..models import load_model

# PTQ has no training to amortize it: twice the calibration sequences of `rabit quantize` (measured cheap).
PTQ_CALIB_SAMPLES = 32


def add_parser(sub):
    d = JobSpec()
    p = sub.add_parser("ptq", help="initialize a 2-bit model without training and compare perplexity with FP")
    p.add_argument("--model", default=d.model)
    p.add_argument("--methods", default="isvid+pre",
                   help="comma list of: naive, svid, isvid, isvid+pre (default: isvid+pre)")
    p.add_argument("--num-paths", type=int, default=d.rabit.num_paths)
    p.add_argument("--isvid-rounds", type=int, default=d.rabit.isvid_rounds)
    p.add_argument("--alpha-in", type=float, default=d.rabit.alpha_in)
    p.add_argument("--alpha-out", type=float, default=d.rabit.alpha_out)
    p.add_argument("--calib-source", default=d.data.train)
    p.add_argument("--calib-samples", type=int, default=PTQ_CALIB_SAMPLES)
    p.add_argument("--calib-len", type=int, default=d.data.calib_len)
    p.add_argument("--eval-source", default=d.eval.data)
    p.add_argument("--seq-len", type=int, default=d.eval.seq_len)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    from ..bos import add_bos_args

    add_bos_args(p, "calibration sequences and evaluation windows")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


METHODS = {
    "naive": dict(init="naive", precondition=False),
    "svid": dict(init="svid", precondition=False),
    "isvid": dict(init="isvid", precondition=False),
    "isvid+pre": dict(init="isvid", precondition=True),
}


def job_from_args(args) -> JobSpec:
    """The JobSpec `rabit ptq` works from (RaBiT, calibration and evaluation settings; no training)."""
    return JobSpec(model=args.model,
                   rabit=RaBiTConfig(num_paths=args.num_paths, isvid_rounds=args.isvid_rounds, alpha_in=args.alpha_in,
                                     alpha_out=args.alpha_out),
                   data=DataSpec(calib=args.calib_source, calib_samples=args.calib_samples, calib_len=args.calib_len),
                   eval=EvalSpec(data=args.eval_source, seq_len=args.seq_len, windows=args.max_windows or 0,
                                 bos=args.bos))


def run(args) -> int:
    from ..data import calibration_batch, eval_tokens
    from ..eval.perplexity import perplexity
    from ..quantize import collect_channel_stats, find_linear_layers, quantize_

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    spec = job_from_args(args)
    ev, d = spec.eval, spec.data
    torch.manual_seed(0)
    model, tok = load_model(spec.model)
    tokens = eval_tokens(tok, ev.data)
    from ..bos import resolve_bos

    bos_choice = resolve_bos(tok, getattr(args, "bos", None))
    bos = bos_choice.token_id
    print(bos_choice.describe(), flush=True)
    ppl = lambda m: perplexity(m, tokens, ev.seq_len, bos, ev.windows or None, progress=True)
    rows = []
    t0 = time.time()
    fp = ppl(model)
    rows.append(dict(method="full precision", ppl=fp, seconds=time.time() - t0))
    print(f"full precision: perplexity {fp:.3f}", flush=True)
    stats = None
    for m in methods:
        cfg = dataclasses.replace(spec.rabit, **METHODS[m])
        if cfg.precondition and stats is None:
            calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, add_bos=bos_choice.use)
            stats = collect_channel_stats(model, find_linear_layers(model, cfg), calib, progress=True)
        t0 = time.time()
        q = quantize_(copy.deepcopy(model), cfg, stats=stats)
        init_s = time.time() - t0
        value = ppl(q)
        rows.append(dict(method=m, ppl=value, init_seconds=init_s, config=cfg.to_dict()))
        print(f"{m} (k={cfg.num_paths}, {cfg.num_paths} bits/weight): perplexity {value:.3f} "
              f"(init {init_s:.1f} s)", flush=True)
        del q
    print("\n| method | WikiText-2 PPL |\n|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, seq_len=args.seq_len, max_windows=args.max_windows,
                           eval_source=args.eval_source, calib_samples=args.calib_samples,
                           calib_len=args.calib_len, rows=rows), f, indent=2)
    return 0
