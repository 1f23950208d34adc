"""How many binary weights changed sign during training, per path: saved rabit folders vs their initialization.

Compares the packed signs of each trained model with the signs its run started from (the init cache entry,
`~/.cache/rabit/init/<key>.safetensors`, which every run of the same init shares), summed over all quantized
layers. Answers "does the second path move more than the first, and does coupled training move it more than
independent training?".

    python benchmarks/sign_flips.py --init-cache ~/.cache/rabit/init/<key>.safetensors \
        runs/big131k/coupled-isvid+pre/quantized runs/big131k/independent-isvid+pre/quantized
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from rabit.init_cache import _unpack_signs
from rabit.sign_bits import unpack_signs


def init_signs(cache: Path) -> dict[str, torch.Tensor]:
    """layer name -> (k, out, in) signs of the initialization."""
    out: dict[str, list] = {}
    with safe_open(str(cache), "pt") as f:
        for key in sorted(f.keys()):
            if not key.endswith(".signs"):
                continue
            name, i, _ = key.rsplit(".", 2)
            in_features = f.get_slice(f"{name}.{i}.h").get_shape()[-1]
            out.setdefault(name, []).append((int(i), _unpack_signs(f.get_tensor(key), in_features)))
    return {n: torch.stack([s for _, s in sorted(v)]) for n, v in out.items()}


def flips(folder: Path, start: dict[str, torch.Tensor]) -> dict:
    changed = None
    only_later = None   # path i > 0 flipped while path 0 kept its sign
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name, s0 in start.items():
            k, out_f, in_f = s0.shape
            s = unpack_signs(f.get_tensor(f"{name}.packed"), out_f, in_f)
            diff = s != s0
            per_path = diff.flatten(1).sum(1)
            changed = per_path if changed is None else changed + per_path
            later = (diff[1:] & ~diff[0]).flatten(1).sum(1)
            only_later = later if only_later is None else only_later + later
            total += out_f * in_f
    return {"weights_per_path": total,
            "flipped_fraction": [c / total for c in changed.tolist()],
            "flipped_while_path1_kept": [c / total for c in only_later.tolist()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-cache", required=True, type=Path)
    ap.add_argument("folders", nargs="+", type=Path, help="saved rabit folders (a run's quantized/)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    start = init_signs(args.init_cache)
    rows = {}
    for folder in args.folders:
        rows[str(folder)] = r = flips(folder, start)
        print(f"{folder}: sign flips per path "
              + ", ".join(f"B{i + 1} {100 * x:.2f}%" for i, x in enumerate(r["flipped_fraction"]))
              + "; B2..Bk flipped while B1 kept: "
              + ", ".join(f"{100 * x:.2f}%" for x in r["flipped_while_path1_kept"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
