"""What the int8 lookup tables of the "cpu_int8" backend cost in quality: teacher-forced decoding, one token per
step through rabit.generate.StaticDecoder (the path `rabit generate` takes), with the exact "cpu" backend and with
"cpu_int8", over the first --tokens tokens of each evaluation text. Reports each backend's perplexity, the KL
divergence of the int8 next-token distribution from the exact one and how often their top-1 tokens agree.

    python benchmarks/lut8_quality.py runs/demo/quantized --tokens 1024 --json /tmp/lut8_quality.json
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from rabit.data import eval_tokens
from rabit.generate import StaticDecoder
from rabit.models import load_model
from rabit.serialization import packed_layers

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("folder", help="a packed folder written by `rabit quantize` / save_quantized")
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--data", default="wikitext2-test,austen-persuasion")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--json", default=None)
args = ap.parse_args()

torch.set_num_threads(args.threads)
model, tok = load_model(args.folder)
layers = packed_layers(model)
if not layers:
    raise SystemExit(f"{args.folder} holds no packed 2-bit layers")


def step_logits(ids: torch.Tensor, backend: str) -> tuple[torch.Tensor, float]:
    for m in layers.values():
        m.backend = backend
    dec = StaticDecoder(model, ids.numel() + 1)
    t0 = time.perf_counter()
    rows = [dec.prefill(ids[None, :1])[0, -1]]
    for t in ids[1:-1]:
        rows.append(dec.step(int(t))[0, -1])
    return torch.stack(rows).float(), time.perf_counter() - t0


report = {"folder": args.folder, "tokens": args.tokens, "texts": {}}
with torch.inference_mode():
    for name in args.data.split(","):
        ids = eval_tokens(tok, name)[:args.tokens]
        target = ids[1:]
        (exact, t_exact), (int8, t_int8) = step_logits(ids, "cpu"), step_logits(ids, "cpu_int8")
        lp_e, lp_q = F.log_softmax(exact, -1), F.log_softmax(int8, -1)
        row = {"ppl_cpu": F.nll_loss(lp_e, target).exp().item(), "ppl_cpu_int8": F.nll_loss(lp_q, target).exp().item(),
               "kl_int8_from_cpu": (lp_e.exp() * (lp_e - lp_q)).sum(-1).mean().item(),
               "top1_agreement": (exact.argmax(-1) == int8.argmax(-1)).float().mean().item(),
               "seconds_cpu": t_exact, "seconds_cpu_int8": t_int8}
        report["texts"][name] = row
        print(name, json.dumps({k: round(v, 5) for k, v in row.items()}), flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
