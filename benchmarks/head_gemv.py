"""One decoding step of an output head (one input row), by storage: fp32 and bf16 ``F.linear``, and the
group-quantized 8- and 4-bit heads of ``--embed-bits`` through the native kernel (``rabit.kernels.groupwise_linear``)
and through the dequantize-in-chunks path they used before it. Medians of --repeats calls, interleaved rounds;
ratios against fp32 ``F.linear`` of the same run. "bf16 kernel" is the native bf16-weight GEMV that decodes a packed
folder's bf16 head (``rabit.kernels.bf16_cpu``). Shapes: Gemma 3 270M's head (262,144 x 640) and SmolLM2-135M's
(49,152 x 576) by default.

    python benchmarks/head_gemv.py --threads 2 --json /tmp/head.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from rabit.embedquant import _DECODE_CHUNK_ROWS, dequantize_groupwise, quantize_groupwise
from rabit.kernels import bf16_cpu, groupwise_linear


def _chunked_dequant(x, codes, scales, bits, group):
    """The path the quantized head took for one token before the kernel (512-row chunks, fp32 GEMV each)."""
    outs = [F.linear(x, dequantize_groupwise(codes[i:i + _DECODE_CHUNK_ROWS], scales[i:i + _DECODE_CHUNK_ROWS],
                                             bits, group)) for i in range(0, codes.shape[0], _DECODE_CHUNK_ROWS)]
    return torch.cat(outs, dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="262144x640,49152x576", help="comma-separated ROWSxCOLS")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-old", action="store_true", help="skip the slow dequantize-in-chunks path")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    for shape in a.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(rows, cols, generator=gen) * 0.02
        x = torch.randn(1, cols, generator=gen)
        q = {bits: quantize_groupwise(w, bits, a.group) for bits in (8, 4)}
        wb, xb = w.bfloat16(), x.bfloat16()
        engines = {"fp32 F.linear": lambda: F.linear(x, w), "bf16 F.linear": lambda: F.linear(xb, wb)}
        if bf16_cpu.is_available():   # the decoder's bf16 head: weights widened exactly, x kept in fp32
            engines["bf16 kernel"] = lambda: bf16_cpu.bf16_linear_cpu(x, wb, num_threads=a.threads)
        for bits, (c, s) in q.items():
            engines[f"int{bits} kernel"] = lambda c=c, s=s, bits=bits: groupwise_linear(x, c, s, bits, a.group)
            if not a.no_old:
                engines[f"int{bits} dequantize-in-chunks (before)"] = \
                    lambda c=c, s=s, bits=bits: _chunked_dequant(x, c, s, bits, a.group)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(a.rounds):   # interleaved rounds: drift in the machine's load hits every engine alike
            for name, fn in engines.items():
                fn()
                n = a.repeats if "before" not in name else max(1, a.repeats // 3)
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["fp32 F.linear"])
        ref = F.linear(x, w)
        for name, ts in times.items():
            med = statistics.median(ts)
            bytes_read = {"fp32": 4, "bf16": 2, "int8": 1 + 2 / a.group, "int4": 0.5 + 2 / a.group}[name[:4]] * rows * cols
            err = float((engines[name]().float() - ref).abs().max() / ref.abs().max())
            r = {"shape": shape, "engine": name, "median_ms": med * 1e3, "speedup_vs_fp32": base / med,
                 "GB_per_s": bytes_read / med / 1e9, "max_rel_error": err}
            results.append(r)
            print(f"{shape:>12} {name:<40} {med * 1e3:9.2f} ms  {base / med:5.2f}x fp32  "
                  f"{r['GB_per_s']:6.1f} GB/s  err {err:.1e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "group": a.group, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
