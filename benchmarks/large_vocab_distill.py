"""Peak memory and tokens/s of one distillation step (teacher + student forward, student backward) with the full
logits materialized ("plain") vs the KL computed from the last hidden states chunk by chunk ("fused",
rabit.train.fused_head), on a large-vocabulary model shape.

Default shape: Gemma 3 270M's widths and 262,144-token vocabulary with 2 of its 18 layers (random weights; the
vocabulary-sized tensors are what differs between the two paths, the depth only adds the same to both).
Each path runs in its own process; peak memory is the process RSS sampled every 2 ms during the steps, minus the
RSS before them (models, optimizer-free).

    python benchmarks/large_vocab_distill.py --seq-len 512 --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from rabit import RaBiTConfig, quantize_
    from rabit.train.losses import batch_distillation_loss
    from rabit.train.optim import prepare_student

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = Gemma3TextConfig(vocab_size=args.vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=args.layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=2048,
                           sliding_window=512, layer_types=["sliding_attention"] * (args.layers - 1) + ["full_attention"])
    teacher = Gemma3ForCausalLM(cfg).eval()
    student = quantize_(__import__("copy").deepcopy(teacher), RaBiTConfig(precondition=False, init="svid",
                                                                          isvid_rounds=0)).train()
    prepare_student(student)
    batch = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    fused = args.mode == "fused"

    def step():
        loss = batch_distillation_loss(teacher, student, batch, 0.0, 1.0, 256, autocast=args.bf16, fused_head=fused)
        loss.total.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.kl.detach())

    step()   # warm-up (allocator, first-call costs)
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    times, kls = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        kls.append(step())
        times.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    return {"mode": args.mode, "peak_extra_mb": (max(peak[0], _rss()) - base) / 1e6,
            "tokens_per_s": args.seq_len / statistics.median(times), "kl": kls[-1], "step_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--mode", choices=("plain", "fused"), default=None, help="(internal) run one path here")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for mode in ("plain", "fused"):
        cmd = [sys.executable, __file__, "--mode", mode, "--vocab", str(args.vocab), "--layers", str(args.layers),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--bf16"] if args.bf16 else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| path | peak extra memory (MB) | tokens/s | KL |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_extra_mb']:.0f} | {r['tokens_per_s']:.1f} | {r['kl']:.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
