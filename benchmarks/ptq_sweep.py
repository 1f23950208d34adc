"""Sweep the initialization options that the paper leaves open (alpha_in, alpha_out, ISVID rounds T).

Selection is done on WikiText-2 *validation* perplexity (never on the test split), on the first
`--windows` windows of `--seq-len` tokens; calibration statistics come from random windows of the same split.
Writes one JSON line per configuration.

    python benchmarks/ptq_sweep.py --out docs/data/ptq_sweep.jsonl
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch

from rabit import RaBiTConfig, collect_channel_stats, find_linear_layers, quantize_
from rabit.data import calibration_batch, eval_tokens
from rabit.eval.perplexity import perplexity
from rabit.models import DEFAULT_MODEL, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--alpha-in", default="0,0.25,0.5,1")
    ap.add_argument("--alpha-out", default="0,0.25,0.5")
    ap.add_argument("--rounds", default="4")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    tokens = eval_tokens(tok, "wikitext2-valid")
    calib = calibration_batch(tok, "wikitext2-valid", args.calib_samples, args.calib_len)
    stats = collect_channel_stats(model, find_linear_layers(model, RaBiTConfig()), calib)
    grid = itertools.product([float(a) for a in args.alpha_in.split(",")],
                             [float(a) for a in args.alpha_out.split(",")],
                             [int(r) for r in args.rounds.split(",")])
    out = open(args.out, "a") if args.out else None
    for a_in, a_out, rounds in grid:
        cfg = RaBiTConfig(init="isvid", isvid_rounds=rounds, precondition=(a_in, a_out) != (0.0, 0.0),
                          alpha_in=a_in, alpha_out=a_out)
        t0 = time.time()
        q = quantize_(copy.deepcopy(model), cfg, stats=stats)
        init_s = time.time() - t0
        ppl = perplexity(q, tokens, args.seq_len, max_windows=args.windows)
        row = dict(alpha_in=a_in, alpha_out=a_out, rounds=rounds, valid_ppl=ppl, init_seconds=init_s,
                   windows=args.windows, seq_len=args.seq_len, calib=f"{args.calib_samples}x{args.calib_len}")
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
        del q


if __name__ == "__main__":
    main()
