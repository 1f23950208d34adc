"""Where along an evaluation window a 2-bit student loses to the full-precision model: mean next-token NLL of
both, per bucket of positions, over the first --windows windows of 2048 tokens of an evaluation text.

    python benchmarks/position_nll.py /tmp/exp/blk32_d01_s20.safetensors --windows 4
"""
import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_model as load_safetensors

from rabit.data import eval_tokens
from rabit.job import JobSpec
from rabit.models import load_model
from rabit.train.trainer import make_student

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("state", help="student state (safetensors) of the default model")
ap.add_argument("--windows", type=int, default=4)
ap.add_argument("--data", default="wikitext2-test")
ap.add_argument("--seq-len", type=int, default=2048)
args = ap.parse_args()

spec = JobSpec()
teacher, tok = load_model(spec.model)
teacher.eval()
student = make_student(teacher, spec.rabit, initialize=False)
load_safetensors(student, args.state)
student.eval()
tokens = eval_tokens(tok, args.data)
n = args.seq_len
edges = [e for e in (0, 128, 256, 512, 1024, 2048, 4096, 8192) if e < n] + [n]
nll = {}
for name, model in (("fp", teacher), ("2-bit", student)):
    total = torch.zeros(n - 1)
    with torch.no_grad():
        for w in range(args.windows):
            x = tokens[w * n:(w + 1) * n][None]
            total += F.cross_entropy(model(x).logits[0, :-1].float(), x[0, 1:], reduction="none")
    nll[name] = total / args.windows
print("| positions | FP NLL | 2-bit NLL | excess (nats) |\n|---|---:|---:|---:|")
for a, b in zip(edges[:-1], edges[1:]):
    fp, q = float(nll["fp"][a:b - 1].mean()), float(nll["2-bit"][a:b - 1].mean())
    print(f"| {a}-{b} | {fp:.3f} | {q:.3f} | {q - fp:.3f} |")
