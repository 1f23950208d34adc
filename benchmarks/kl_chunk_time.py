"""Time of the distillation KL over the vocabulary for one chunk of logits: the PyTorch reference
(rabit.train.losses._kl_chunk_reference) against the native kernel (rabit.kernels.kl_cpu), with a fresh gradient
tensor and with one reused buffer, on 1 and 2 threads. Random logits of the default model's shape (a 256-token
chunk of a 49,152-token vocabulary, as the fused head's), medians of --reps calls after one warm-up.

    python benchmarks/kl_chunk_time.py [--rows 256] [--vocab 49152] [--reps 7]     (docs/RESULTS.md section 34)
"""
import argparse
import statistics
import time

import torch

from rabit.kernels import kl_cpu
from rabit.train.losses import _kl_chunk_reference

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--rows", type=int, default=256)
ap.add_argument("--vocab", type=int, default=49152)
ap.add_argument("--reps", type=int, default=7)
args = ap.parse_args()

gen = torch.Generator().manual_seed(0)
s = torch.randn(args.rows, args.vocab, generator=gen) * 3
t = s + torch.randn(args.rows, args.vocab, generator=gen) * 3
buf = torch.empty(args.rows, args.vocab)


def median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


for threads in (1, 2):
    torch.set_num_threads(threads)
    ref = median_ms(lambda: _kl_chunk_reference(s, t, 1.0, True))
    fresh = median_ms(lambda: kl_cpu.kl_rows(s, t, 1.0, True, threads=threads))
    reused = median_ms(lambda: kl_cpu.kl_rows(s, t, 1.0, True, threads=threads, out=buf))
    loss_only = median_ms(lambda: kl_cpu.kl_rows(s, t, 1.0, False, threads=threads))
    print(f"{threads} thread(s), {args.rows} x {args.vocab}: reference {ref:.1f} ms, native {fresh:.1f} ms "
          f"(fresh gradient), {reused:.1f} ms (reused buffer), {loss_only:.1f} ms (loss only); "
          f"{ref / reused:.1f}x")
