"""Micro-benchmarks of the RaBiT kernels (used by benchmarks/bench_gemv.py and the CLI).

``run_gemv_bench`` times, interleaved in one loop (so all three see the same machine state, including the L3
being flushed by the large fp32 matmul):
  * the packed 2-bit GEMV: a ``PackedRaBiTLinear`` (fp16 scales) called on a (1, in) fp32 input, Python
    overhead included (what a model sees),
  * ``F.linear`` with a dense fp32 weight of the same shape,
  * ``dst.copy_(src)`` of as many bytes as the kernel must read (packed signs + fp16 scales + x),
and reports medians, the speedup over fp32 and the achieved bytes/s against the copy's.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))   # (out, in)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_gemv_bench(shapes=DEFAULT_SHAPES, num_paths: int = 2, threads: int | None = 2, runs: int = 30,
                   warmup: int = 5, backend: str = "cpu", scale_dtype: torch.dtype = torch.float16,
                   seed: int = 0) -> list[dict]:
    """Batch-1 GEMV benchmark; returns one dict per (out, in) shape (times in microseconds, rates in GB/s)."""
    from .kernels import select_backend
    from .packed_layer import PackedRaBiTLinear

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rows = []
    try:
        gen = torch.Generator().manual_seed(seed)
        for out_f, in_f in shapes:
            layer = PackedRaBiTLinear(in_f, out_f, num_paths=num_paths, scale_dtype=scale_dtype, backend=backend)
            layer.packed.copy_(torch.randint(0, 256, layer.packed.shape, dtype=torch.uint8, generator=gen))
            layer.g.copy_(torch.rand(num_paths, out_f, generator=gen) + 0.5)
            layer.h.copy_(torch.rand(num_paths, in_f, generator=gen) + 0.5)
            packed, g, h = layer.packed, layer.g, layer.h
            x = torch.randn(1, in_f, generator=gen)
            w = torch.randn(out_f, in_f, generator=gen)
            nbytes = (packed.numel() + g.numel() * g.element_size() + h.numel() * h.element_size()
                      + x.numel() * x.element_size())
            src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=gen)
            dst = torch.empty_like(src)
            used = select_backend(x, backend)

            def k_fn():
                layer(x)

            def l_fn():
                F.linear(x, w)

            def c_fn():
                dst.copy_(src)

            with torch.inference_mode():
                for _ in range(warmup):
                    k_fn(), l_fn(), c_fn()
                tk, tl, tc = [], [], []
                for _ in range(runs):
                    tk.append(_timed(k_fn))
                    tl.append(_timed(l_fn))
                    tc.append(_timed(c_fn))
            mk, ml, mc = (statistics.median(v) for v in (tk, tl, tc))
            nk, nl, nc = (min(v) for v in (tk, tl, tc))
            rows.append(dict(
                out_features=out_f, in_features=in_f, num_paths=num_paths, backend=used,
                threads=torch.get_num_threads(), runs=runs, bytes=nbytes,
                rabit_us=mk * 1e6, linear_fp32_us=ml * 1e6, copy_us=mc * 1e6,
                speedup_vs_fp32=ml / mk,
                rabit_gbps=nbytes / mk / 1e9, copy_gbps=nbytes / mc / 1e9,
                fraction_of_copy=mc / mk,
                # best run of each (least disturbed by other processes on a shared machine)
                rabit_min_us=nk * 1e6, linear_fp32_min_us=nl * 1e6, copy_min_us=nc * 1e6,
                speedup_vs_fp32_min=nl / nk, rabit_min_gbps=nbytes / nk / 1e9, copy_min_gbps=nbytes / nc / 1e9,
                fraction_of_copy_min=nc / nk,
            ))
            del w, layer, packed, src, dst
    finally:
        torch.set_num_threads(old_threads)
    return rows


def format_markdown(rows: list[dict], include_min: bool = True) -> str:
    """Medians; with include_min a second table from the best run of each (same runs)."""
    head = ("| out x in | k | backend | threads | rabit (us) | fp32 F.linear (us) | speedup | bytes read (MB) "
            "| rabit GB/s | copy (us) | copy GB/s | % of copy |")
    sep = "|" + "---|" * 12
    out = []
    for suffix, title in (("", "median of {runs} interleaved runs"), ("_min", "best of {runs} runs")):
        if suffix and not include_min:
            break
        lines = [f"{title.format(runs=rows[0]['runs'] if rows else 0)}:", "", head, sep]
        for r in rows:
            us = lambda key: r[key.replace("_us", f"{suffix}_us")]  # noqa: E731
            lines.append(
                f"| {r['out_features']}x{r['in_features']} | {r['num_paths']} | {r['backend']} | {r['threads']} "
                f"| {us('rabit_us'):.1f} | {us('linear_fp32_us'):.1f} | {r['speedup_vs_fp32' + suffix]:.1f}x "
                f"| {r['bytes'] / 1e6:.2f} | {r['rabit' + suffix + '_gbps']:.1f} | {us('copy_us'):.1f} "
                f"| {r['copy' + suffix + '_gbps']:.1f} | {100 * r['fraction_of_copy' + suffix]:.0f}% |")
        out.append("\n".join(lines))
    return "\n\n".join(out)
