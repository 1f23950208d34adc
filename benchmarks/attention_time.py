"""Causal attention's forward without gradient: torch's SDPA (its CPU flash kernel) against the native kernel
(rabit.kernels.attention_cpu), on the default model's attention shapes (9 query heads, 3 key heads, head size 64) at
the lengths the job uses: one 2048-token perplexity window, 16 rows of 512 tokens (a block-stage batch) and one row
of 256 (the teacher in a frozen-latent training step). Then one 2048-token forward of the whole default model (under
bf16 autocast, and in fp32 as CPUs without native bf16 run it), without and with rabit.kernels.attention's
fast_attention(). Medians of --reps calls after one warm-up; the variants alternate. The attention calls time every
native path this CPU runs for each dtype (AVX-512 BF16, AVX2; --isa picks), the model's forward the one
fast_attention() takes.

    python benchmarks/attention_time.py [--reps 7] [--threads 2] [--isa avx2] [--dtype fp32]
                                                                                  (docs/RESULTS.md sections 48-50)
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rabit.kernels import attention, attention_cpu

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--no-model", action="store_true", help="only the attention calls, not the default model's forward")
ap.add_argument("--isa", action="append", help="native paths to time (default: all but scalar that this CPU runs)")
ap.add_argument("--dtype", action="append", choices=["bf16", "fp32"],
                help="input dtypes to time (default both: bf16, what bf16 autocast runs; fp32, what CPUs without "
                     "native bf16 run)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
dtypes = args.dtype or list(DTYPES)


def medians(fns: dict) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


gen = torch.Generator().manual_seed(0)
for name in dtypes:
    dtype = DTYPES[name]
    runnable = attention_cpu.available_isas(dtype)
    isas = [i for i in args.isa if i in runnable] if args.isa else [i for i in runnable if i != "scalar"]
    print(f"\n{name} inputs: native paths {', '.join(isas) or 'none'} (fast_attention takes "
          f"{attention.kernel_isa(dtype)}); {args.threads} threads")
    print("| shape (batch, heads / key heads, T, head size) | torch SDPA ms | " +
          " | ".join(f"{i} ms | speed-up" for i in isas) + " |")
    print("|---|---|" + "---|---|" * len(isas))
    for b, t in ((1, 2048), (16, 512), (1, 256)):
        q = torch.randn(b, t, 9, 64, generator=gen).to(dtype).transpose(1, 2)
        k = torch.randn(b, t, 3, 64, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(b, t, 3, 64, generator=gen).to(dtype).transpose(1, 2)
        fns = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        for i in isas:
            fns[i] = lambda i=i: attention_cpu.causal_attention(q, k, v, isa=i)
        m = medians(fns)
        print(f"| ({b}, 9 / 3, {t}, 64) | {m['torch']:.1f} | " +
              " | ".join(f"{m[i]:.1f} | {m['torch'] / m[i]:.2f}x" for i in isas) + " |")

if not args.no_model:
    from rabit.models import load_model

    model, _ = load_model()
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), generator=gen)
    for name in dtypes:
        def forward(autocast=name == "bf16"):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(input_ids=ids, use_cache=False)

        def fast():
            with attention.fast_attention():
                forward()
        m = medians({"torch": forward, "native": fast})
        how = "under bf16 autocast" if name == "bf16" else "in fp32"
        print(f"| the default model, one 2048-token window {how} | {m['torch']:.0f} | {m['native']:.0f} | "
              f"{m['torch'] / m['native']:.2f}x |")
