"""Cost of checking checksums when loading a packed 2-bit folder: load_quantized with verify=True vs verify=False.

Builds a packed folder with random sign planes and scales (the load does not depend on the values) for the
architecture of a model config, then loads it alternately with and without verification and reports medians.

    python benchmarks/load_verify.py                               # SmolLM2-135M-Instruct's architecture
    python benchmarks/load_verify.py --dtype bfloat16              # embeddings stored in bf16
    python benchmarks/load_verify.py --shape llama-7b --repeats 3  # Llama-2-7B's shapes (~2.2 GB folder)
    python benchmarks/load_verify.py --shape llama-7b --layers 8   # a slice of it, when disk or time is short

The page cache is warm after the first load, so this measures the hashing itself, not the disk: the cost a
user pays on every load of a folder already in memory (a cold load reads the file once either way).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000, untied head
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                     max_position_embeddings=4096),
}


def model_config(args):
    from transformers import AutoConfig, LlamaConfig

    if args.shape == "default":
        from rabit.models import default_model_folder

        cfg = AutoConfig.from_pretrained(default_model_folder())
    else:
        cfg = LlamaConfig(**SHAPES[args.shape])
    if args.layers:
        cfg.num_hidden_layers = args.layers
    return cfg


def random_packed_folder(cfg, path: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """A packed folder of `cfg`'s architecture (every decoder linear quantized, k = 2) with random contents."""
    from transformers import AutoModelForCausalLM

    from rabit.serialization import replace_with_packed_skeleton, save_quantized

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    qc = {"num_paths": 2, "scale_dtype": "float16", "modules": modules}
    replace_with_packed_skeleton(model, qc, device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()   # to_empty gives tied tensors separate storage
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.uint8:
                t.random_(0, 256, generator=gen)
            elif t.is_floating_point():
                t.normal_(0, 0.02, generator=gen)
    return save_quantized(model, path)


def time_loads(path: Path, repeats: int) -> dict:
    from rabit.integrity import check_model_folder
    from rabit.serialization import load_quantized

    load_quantized(path)   # warm the page cache and the imports
    wall = {"verify": [], "no_verify": [], "check_only": []}
    cpu = {k: [] for k in wall}
    for _ in range(repeats):
        for key, fn in (("verify", lambda: load_quantized(path, verify=True)),
                        ("no_verify", lambda: load_quantized(path, verify=False)),
                        ("check_only", lambda: check_model_folder(path))):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)   # all threads of this process
            del out
            gc.collect()   # models hold reference cycles: free them here, not inside the next timed call
    return {"wall": {k: statistics.median(v) for k, v in wall.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}, "runs": {"wall": wall, "cpu": cpu}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="default", choices=["default", *SHAPES])
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the unquantized tensors (embeddings, norms, head)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write the folder (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from rabit.integrity import verify_model_folder

    cfg = model_config(args)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="rabit-load-verify-"))
    try:
        t0 = time.perf_counter()
        path = random_packed_folder(cfg, root / "m", getattr(torch, args.dtype))
        save_s = time.perf_counter() - t0
        size = (path / "model.safetensors").stat().st_size
        assert verify_model_folder(path).ok
        res = time_loads(path, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    w, c = res["wall"], res["cpu"]
    # verify=True is the check followed by the verify=False load, so the check alone is the cost; the
    # difference of the two loads is shown too but is noisy on a shared machine
    out = {"shape": args.shape, "layers": cfg.num_hidden_layers, "dtype": args.dtype, "file_bytes": size,
           "save_s": save_s, "threads": torch.get_num_threads(), **res,
           "cost_wall": w["check_only"] / w["no_verify"], "cost_cpu": c["check_only"] / c["no_verify"]}
    print(f"{args.shape} ({cfg.num_hidden_layers} layers, {args.dtype} unquantized, {size / 2**20:.0f} MiB), "
          f"medians of {args.repeats}:\n"
          f"  wall: load {w['no_verify']:.3f} s without verification, {w['verify']:.3f} s with; the check alone "
          f"{w['check_only']:.3f} s = {100 * out['cost_wall']:.1f}% of the load ({size / 2**30 / w['check_only']:.2f} "
          f"GiB/s)\n"
          f"  CPU:  load {c['no_verify']:.3f} s without verification, {c['verify']:.3f} s with; the check alone "
          f"{c['check_only']:.3f} s = {100 * out['cost_cpu']:.1f}% of the load")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
