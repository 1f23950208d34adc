"""Decoding step times of the benchmark Llama (`rabit bench decode`'s shape, lm_head packed) after a short and a
long prompt, in one process: tokens/s over 128 timed tokens and the median step time of the first and last 10
steps, for prompts of --prompts tokens in turn (docs/RESULTS.md section 32).

    OMP_WAIT_POLICY=ACTIVE python benchmarks/decode_prompt_length.py --backend cpu_int8 --prompts 16,128,16,128
"""
import argparse
import statistics

import torch

from rabit.cli.bench import BENCH_SHAPE, make_random_llama, packed_copy
from rabit.generate import StaticDecoder, decode_tokens
from rabit.packed_layer import PackedRaBiTLinear

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--backend", default="cpu_int8")
ap.add_argument("--prompts", default="16,128,16,128", help="comma list of prompt lengths, run in this order")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

torch.set_num_threads(args.threads)
model = packed_copy(make_random_llama(**BENCH_SHAPE, seed=0, max_positions=4096), quantize_head=True)
for m in model.modules():
    if isinstance(m, PackedRaBiTLinear):
        m.backend = args.backend
for pl in (int(p) for p in args.prompts.split(",")):
    prompt = torch.randint(3, BENCH_SHAPE["vocab"], (1, pl), generator=torch.Generator().manual_seed(0))
    res = decode_tokens(StaticDecoder(model, pl + 130), prompt, 129)
    st = res.step_times
    print(f"prompt {pl}: {len(st) / res.decode_s:.1f} tokens/s; steps at positions {pl}-{pl + 9}: "
          f"{statistics.median(st[:10]) * 1e3:.2f} ms, last 10: {statistics.median(st[-10:]) * 1e3:.2f} ms",
          flush=True)
