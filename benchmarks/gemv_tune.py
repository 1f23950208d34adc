"""Sweep the Triton GEMV's launch parameters on a GPU: device time and fraction of copy bandwidth per config.

    python benchmarks/gemv_tune.py --out gemv_tune.json [--budget-s 200] [--rows 1]

For each (out, in) shape of the gpu_check's gemv section, one row of fp16 x and 2 paths, it times the heuristic's
choice and every config of a grid (BLOCK_N x BLOCK_W x num_warps x SPLIT_K around the heuristic's; select-and-add,
SIGN_XOR or the lookup-table kernel) the same way as the check: a CUDA graph of back-to-back calls over weight
copies worth 4x the L2 cache. Configs whose accumulators per thread would spill (BLOCK_M*BLOCK_N*BLOCK_W*32, or
BLOCK_N*BLOCK_W*8 for the LUT kernel, over 32*num_warps threads > 64) are left out. Results are written after
every shape, so a run cut by --budget-s (or a timeout) keeps what it measured. The best config per shape is what
GEMV_BLOCKS / the split heuristic / the kernel choice should be set to.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import GEMV_SHAPES, kernel_seconds, random_packed_fast, rotation_copies  # noqa: E402


def grid(heur: dict, rows: int) -> list[dict]:
    """The configs to try, in a fixed shuffled order (a run cut short still samples the whole space)."""
    splits = sorted({max(1, int(heur["SPLIT_K"] * f)) for f in (0.25, 0.5, 1, 2, 4)})
    configs = []
    variants = ({"SIGN_XOR": False}, {"SIGN_XOR": True}, {"LUT": True})
    for bn, bw, warps, split, variant in itertools.product((16, 32, 64, 128), (1, 2, 4), (2, 4, 8), splits,
                                                           variants):
        # accumulators per thread: BLOCK_M x BLOCK_N x 32 inputs per word, or one per 4-bit group with the LUT
        per_word = 8 if variant.get("LUT") else 32 * heur["BLOCK_M"]
        per_thread = bn * bw * per_word / (32 * warps)
        if 4 <= per_thread <= 64:
            configs.append({"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": warps, "SPLIT_K": split, **variant})
    random.Random(0).shuffle(configs)
    return configs


def main(argv=None) -> int:
    from rabit.kernels import triton_gemv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new configs after this long")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sms = triton_gemv.sm_count(dev)
    n = 1 << 28
    src, dst = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    copy_gbs = 2 * n / kernel_seconds([lambda: dst.copy_(src)], dev, 20)[0] / 1e9
    del src, dst
    report = {"device": torch.cuda.get_device_name(dev), "sms": sms, "copy_GBps": copy_gbs, "rows": args.rows,
              "triton": triton_gemv.triton.__version__, "shapes": []}
    t0 = time.perf_counter()
    shapes = sorted(GEMV_SHAPES, key=lambda s: -s[0] * s[1])   # 8192^2 (the target's shape) first
    for si, (out_f, in_f) in enumerate(shapes):
        per_shape = (args.budget_s - (time.perf_counter() - t0)) / (len(shapes) - si)
        x = torch.randn(args.rows, in_f, device=dev, dtype=torch.float16)
        probe = random_packed_fast(2, out_f, in_f, dev)
        nbytes = probe.packed.numel() + 2 * (probe.g.numel() + probe.h.numel())
        layers = [probe] + [random_packed_fast(2, out_f, in_f, dev, seed=i)
                            for i in range(1, rotation_copies(nbytes, dev))]
        words = probe.packed.shape[2]
        heur = triton_gemv.gemv_launch_params(args.rows, out_f, words, 2, sms)
        ref = torch.nn.functional.linear(x.float(), probe.unpacked_weight(torch.float32))
        results = []
        shape_start = time.perf_counter()
        for cfg in [None, *grid(heur, args.rows)]:
            if time.perf_counter() - shape_start > per_shape:
                break
            calls = [lambda m=m: triton_gemv.rabit_linear_triton(x, m.packed, m.g, m.h, mode="gemv",
                                                                gemv_config=cfg) for m in layers]
            try:
                with torch.inference_mode():
                    y = calls[0]()
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    t = kernel_seconds(calls, dev, args.iters, repeats=3)[0]
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                results.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            gbs = (nbytes + (in_f + out_f) * 2) / t / 1e9
            results.append({"config": cfg or "heuristic", "launch": triton_gemv.gemv_launch_params(
                args.rows, out_f, words, 2, sms, tuple(sorted((cfg or {}).items()))), "us": t * 1e6,
                "GBps": gbs, "fraction_of_copy": gbs / copy_gbs, "rel_error": err})
        ok = [r for r in results if "us" in r]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        report["shapes"].append({"out": out_f, "in": in_f, "configs_timed": len(ok), "heuristic": ok[0] if ok else
                                 None, "best": best, "results": results})
        print(f"{out_f}x{in_f}: {len(ok)} configs; heuristic {ok[0]['us']:.1f} us "
              f"({ok[0]['fraction_of_copy']:.1%}); best {best['us']:.1f} us ({best['fraction_of_copy']:.1%}) "
              f"{best['config']}" if ok else f"{out_f}x{in_f}: nothing timed", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        del layers, probe
        torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
