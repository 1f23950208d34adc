"""Size and cost of the saved model's storage options on a real model (default: SmolLM2-135M-Instruct).

For each option (unquantized tensors in fp32 / 16 bits / embedding+head group-quantized to 8 or 4 bits):
* the perplexity of the full-precision model with that embedding/head (isolates the embedding quantization error
  from the 2-bit layers'),
* the folder size of the 2-bit model saved with it (layers initialized with SVID, no training: the size does not
  depend on training) and its size per component,
* the greedy decode speed of that folder (median of --repeats runs of --new-tokens tokens).

    python benchmarks/embed_storage.py --windows 4 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rabit import RaBiTConfig, quantize_
from rabit.data import eval_tokens
from rabit.embedquant import quantize_embeddings_
from rabit.eval.perplexity import perplexity
from rabit.generate import generate
from rabit.models import DEFAULT_MODEL, load_model
from rabit.serialization import load_quantized, save_quantized, size_report
from rabit.storage import format_size_report

OPTIONS = {"fp32": dict(dtype=torch.float32, bits=None), "16-bit": dict(dtype=None, bits=None),
           "embed 8-bit": dict(dtype=None, bits=8), "embed 4-bit": dict(dtype=None, bits=4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--windows", type=int, default=4, help="2048-token wikitext2-test windows for perplexity")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tok = load_model(args.model)
    tokens = eval_tokens(tok, "wikitext2-test")
    rows = {}
    for name, opt in OPTIONS.items():
        fp = copy.deepcopy(model)
        if opt["dtype"] is None:   # what a 16-bit file holds: every float tensor rounded to bf16
            with torch.no_grad():
                for t in fp.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(t.to(torch.bfloat16).float())
        if opt["bits"]:
            quantize_embeddings_(fp, opt["bits"], args.group_size)
        t0 = time.time()
        rows[name] = {"fp_ppl_with_this_embedding": perplexity(fp, tokens, 2048, None, args.windows)}
        print(f"{name}: FP perplexity {rows[name]['fp_ppl_with_this_embedding']:.3f} ({time.time() - t0:.0f} s)",
              flush=True)
        del fp
    q = quantize_(copy.deepcopy(model), RaBiTConfig(precondition=False, init="svid", isvid_rounds=0))
    with tempfile.TemporaryDirectory() as tmp:
        for name, opt in OPTIONS.items():
            m = copy.deepcopy(q)
            if opt["bits"]:
                quantize_embeddings_(m, opt["bits"], args.group_size)
            folder = save_quantized(m, Path(tmp) / name.replace(" ", "_"), tok, dtype=opt["dtype"])
            rep = size_report(folder)
            print(f"{name}: {format_size_report(rep)}; folder {rep['folder_bytes'] / 2**20:.1f} MiB", flush=True)
            loaded = load_quantized(folder)
            speeds = []
            for _ in range(args.repeats):
                r = generate(loaded, tok, "The history of the city", max_new_tokens=args.new_tokens,
                             stop_at_eos=False)
                speeds.append(r.tokens_per_s)
            rows[name].update(file_bytes=rep["file_bytes"], folder_bytes=rep["folder_bytes"],
                              components=rep["components"], decode_tokens_per_s=statistics.median(speeds))
            del m, loaded
    print("\n| storage | FP perplexity with this embedding/head | file MB | folder MiB | embeddings MB | "
          "2-bit decode tokens/s |\n|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['fp_ppl_with_this_embedding']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
              f"{r['folder_bytes'] / 2**20:.1f} | {r['components']['embeddings'] / 1e6:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "windows": args.windows,
                                               "group_size": args.group_size, "rows": rows,
                                               "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
