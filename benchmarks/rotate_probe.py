"""Write a rotated copy of a model as a Hugging Face folder (rabit.rotation.rotate_): the same function, with the
norms folded into the layers and the residual stream (and, by default, each head's values) rotated.

docs/RESULTS.md section 35's first rotated runs quantized such a folder with the rotation off in the job:

    python benchmarks/rotate_probe.py --out /tmp/rot/smollm2-rot --no-values
    rabit quantize --model /tmp/rot/smollm2-rot --no-rotate --tokens 12800 ...

The folder stores fp32 weights and an output head of its own (a head tied to the embeddings is untied).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-values", action="store_true", help="rotate the residual stream only")
    args = ap.parse_args()
    from rabit.models import load_model
    from rabit.rotation import rotate_

    model, tok = load_model(args.model)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = model(ids).logits
    rotate_(model, seed=args.seed, values=not args.no_values)
    with torch.no_grad():
        new = model(ids).logits
    print(f"relative logit change after the rotation: {((new - ref).norm() / ref.norm()).item():.2e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
