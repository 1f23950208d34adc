"""Perplexity in fp32 against bf16 autocast: seconds per window and the figure, for the full-precision model and
(optionally) the 2-bit student of a `rabit quantize` run folder, alternating so that drift hits both alike.

    python benchmarks/eval_dtype.py --windows 4 --rounds 2                # the default model, fp32 / bf16 x 2
    python benchmarks/eval_dtype.py --run runs/demo --windows 16 --rounds 1  # that run's trained student

docs/RESULTS.md section 26 (why `rabit quantize` evaluates under bf16 autocast where training does).
"""
import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rabit.config import RaBiTConfig
from rabit.data import eval_tokens
from rabit.eval.perplexity import perplexity_of, window_nlls
from rabit.models import DEFAULT_MODEL, load_model
from rabit.train.trainer import make_student


def run_student(run: Path, teacher):
    """The trained student of a run folder, as the job holds it (model.safetensors, aliases restored)."""
    cfg = RaBiTConfig.from_dict(json.loads((run / "rabit_config.json").read_text()))
    student = make_student(teacher, cfg, initialize=False)
    state = load_file(run / "model.safetensors")
    with safe_open(run / "model.safetensors", "pt") as f:
        for alias, target in json.loads(f.metadata().get("aliases", "{}")).items():
            state[alias] = state[target]
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{run}: the state does not fit the student (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return student


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--run", type=Path, default=None, help="a rabit quantize run folder: score its student")
    ap.add_argument("--corpus", default="wikitext2-test")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    teacher, tok = load_model(args.model)
    model = run_student(args.run, teacher) if args.run else teacher
    stream = eval_tokens(tok, args.corpus)
    print(f"{'student of ' + str(args.run) if args.run else args.model}, {args.corpus}, first {args.windows} "
          f"windows of 2048, {torch.get_num_threads()} threads")
    print("| precision | round | s / window | perplexity | first 4 windows |\n|---|---:|---:|---:|---:|")
    for r in range(args.rounds):
        for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            t0 = time.perf_counter()
            nll, count = window_nlls(model, stream, 2048, None, args.windows, autocast_dtype=dtype)
            sec = (time.perf_counter() - t0) / len(count)
            print(f"| {name} | {r + 1} | {sec:.2f} | {perplexity_of(nll, count):.4f} | "
                  f"{perplexity_of(nll, count, 4):.4f} |", flush=True)


if __name__ == "__main__":
    main()
