"""Time of the native one-token attention (rabit.kernels.decode_ops_cpu.attend_one) for the 8 layers of
`rabit bench decode`'s Llama (16 heads, 4 KV heads, head size 128) at several positions: medians of 20 calls per
layer set, with the caches warm (just read) and cold (a 64 MB write in between). Includes the Python call
(~20 us a layer). --threads: the attention's OpenMP threads over KV heads (a list runs each in turn).

    OMP_WAIT_POLICY=ACTIVE python benchmarks/attend_one_time.py --threads 1,2
"""
import argparse
import statistics
import time

import torch

from rabit.kernels import decode_ops_cpu as ops

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", default="1", help="comma list of thread counts")
args = ap.parse_args()
torch.manual_seed(0)
H, KV, D, L = 16, 4, 128, 8
max_len = 258
kcs = [torch.randn(KV, max_len, D) for _ in range(L)]
vcs = [torch.randn(KV, max_len, D) for _ in range(L)]
q, k, v = torch.randn(H, D), torch.randn(KV, D), torch.randn(KV, D)
cos, sin = torch.randn(D), torch.randn(D)
big = torch.empty(64 << 20, dtype=torch.uint8)


def layers(pos, nt):
    for i in range(L):
        ops.attend_one(q, k, v, kcs[i], vcs[i], pos, 0, cos, sin, D ** -0.5, threads=nt)


for pos in (16, 64, 128, 192, 255):
    for nt in (int(t) for t in args.threads.split(",")):
        warm, cold = [], []
        for _ in range(20):
            layers(pos, nt)
            t = time.perf_counter()
            layers(pos, nt)
            warm.append(time.perf_counter() - t)
            big.fill_(1)   # evict the caches
            t = time.perf_counter()
            layers(pos, nt)
            cold.append(time.perf_counter() - t)
        print(f"position {pos}, {nt} thread(s): 8 layers {statistics.median(warm) * 1e3:.3f} ms warm, "
              f"{statistics.median(cold) * 1e3:.3f} ms cold", flush=True)
