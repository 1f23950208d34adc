"""Time of the native one-token attention (rabit.kernels.decode_ops_cpu.attend_one) for the 8 layers of
`rabit bench decode`'s Llama (16 heads, 4 KV heads, head size 128) at several positions: medians of 20 calls per
layer set, with the caches warm (just read) and cold (a 64 MB write in between). Includes the Python call
(~20 us a layer).

    python benchmarks/attend_one_time.py
"""
import statistics
import time

import torch

from rabit.kernels import decode_ops_cpu as ops

torch.manual_seed(0)
H, KV, D, L = 16, 4, 128, 8
max_len = 258
kcs = [torch.randn(KV, max_len, D) for _ in range(L)]
vcs = [torch.randn(KV, max_len, D) for _ in range(L)]
q, k, v = torch.randn(H, D), torch.randn(KV, D), torch.randn(KV, D)
cos, sin = torch.randn(D), torch.randn(D)
big = torch.empty(64 << 20, dtype=torch.uint8)


def layers(pos):
    for i in range(L):
        ops.attend_one(q, k, v, kcs[i], vcs[i], pos, 0, cos, sin, D ** -0.5)


for pos in (16, 64, 128, 192, 255):
    warm, cold = [], []
    for _ in range(20):
        layers(pos)
        t = time.perf_counter()
        layers(pos)
        warm.append(time.perf_counter() - t)
        big.fill_(1)   # evict the caches
        t = time.perf_counter()
        layers(pos)
        cold.append(time.perf_counter() - t)
    print(f"position {pos}: 8 layers {statistics.median(warm) * 1e3:.3f} ms warm, "
          f"{statistics.median(cold) * 1e3:.3f} ms cold")
