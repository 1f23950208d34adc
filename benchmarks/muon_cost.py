"""CPU time of Muon's Newton-Schulz orthogonalization for one model's latent shapes: bf16 vs fp32, interleaved.

    python benchmarks/muon_cost.py [--model SmolLM2-135M-Instruct] [--rounds 3] [--layers-measured 1]

Times one decoder block's latent matrices (q, k, v, o, gate, up, down shapes from the model's config) per
dtype, round after round (so the machine's load hits both alike), and scales the median by the number of
blocks: the Newton-Schulz CPU seconds of one optimizer step. CPU time = time.process_time (all threads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rabit.train.optim import newton_schulz

COEFFS = (3.4445, -4.7750, 2.0315)


def latent_shapes(config) -> list[tuple[int, int]]:
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ns-steps", default="5", help="comma-separated Newton-Schulz step counts to compare")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoConfig

    from rabit.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    shapes = latent_shapes(config)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    variants = [(dt, int(n)) for dt in args.dtypes.split(",") for n in args.ns_steps.split(",")]
    times: dict[str, list[float]] = {f"{dt}/{n}": [] for dt, n in variants}
    for _ in range(args.rounds):
        for dt, n in variants:
            t = time.process_time()
            for g in grads:
                newton_schulz(g, COEFFS, n, 1e-7, getattr(torch, dt))
            times[f"{dt}/{n}"].append(time.process_time() - t)
    blocks = config.num_hidden_layers
    rows = {k: {"block_cpu_s": statistics.median(v), "step_cpu_s": statistics.median(v) * blocks, "runs": v}
            for k, v in times.items()}
    print(f"{args.model}: {blocks} blocks, latent shapes per block {shapes}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds interleaved")
    print("| Newton-Schulz dtype / steps | CPU s per block | CPU s per optimizer step |")
    print("|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['block_cpu_s']:.2f} | {r['step_cpu_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "shapes": shapes, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
