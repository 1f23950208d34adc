"""Whether rabit's decoding speed changes within one process: the benchmark Llama of `rabit bench decode` (hidden
2048, 8 layers), packed, warmed up, then --runs timed runs of 128 tokens in the same process, each with its
tokens/s and the median, 90th percentile, minimum and maximum of its step times (ms); last, the anonymous huge
pages the process holds (the packed weights on 2 MB pages or not).

    THP_MEM_ALLOC_ENABLE=1 OMP_WAIT_POLICY=ACTIVE python benchmarks/decode_modes.py   # once per process
    python benchmarks/decode_modes.py --stream 40     # then 40 s of a plain 2-thread streaming read (GB/s)

docs/RESULTS.md section 26.
"""
import argparse
import time

import torch

from rabit.cli.bench import BENCH_SHAPE, _torch_run, make_random_llama, packed_copy
from rabit.generate import StaticDecoder, decode_tokens


def anon_huge_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stream(seconds: float) -> list[float]:
    """GB/s of 4 sums over a 256 MB fp32 tensor, repeated for `seconds`."""
    x = torch.ones(64 * 1024 * 1024)
    rates, end = [], time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        for _ in range(4):
            x.sum()
        rates.append(4 * x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stream", type=float, default=0.0, help="seconds of a streaming read after decoding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(BENCH_SHAPE)
    model = packed_copy(make_random_llama(**shape, seed=0, max_positions=4096), quantize_head=True)
    prompt = torch.randint(3, shape["vocab"], (1, 128), generator=torch.Generator().manual_seed(0))
    decoder = StaticDecoder(model, 128 + 128 + 2)
    _torch_run(decoder, prompt, 8)   # warm-up
    print("| run | tokens/s | median step ms | p90 | min | max |\n|---:|---:|---:|---:|---:|---:|")
    for r in range(args.runs):
        res = decode_tokens(decoder, prompt, 129)
        t = sorted(1e3 * s for s in res.step_times)
        print(f"| {r + 1} | {len(t) / res.decode_s:.1f} | {t[len(t) // 2]:.2f} | {t[int(len(t) * 0.9)]:.2f} | "
              f"{t[0]:.2f} | {t[-1]:.2f} |", flush=True)
    print(f"anonymous huge pages: {anon_huge_mb():.0f} MB")
    if args.stream:
        rates = sorted(stream(args.stream))
        print(f"streaming read, {len(rates)} samples: min {rates[0]:.1f}, median {rates[len(rates) // 2]:.1f}, "
              f"max {rates[-1]:.1f} GB/s")


if __name__ == "__main__":
    main()
