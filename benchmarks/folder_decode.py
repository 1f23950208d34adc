"""Batch-1 decoding speed of a saved model folder, as `rabit generate` runs it (StaticDecoder), with a prompt of
--prompt-len random tokens and --new-tokens timed greedy tokens; one figure per run of this script (run it once
per engine and round, interleaved with the other engines, e.g. `llama-bench -p 0 -n 128 -d 128 -t 2 -r 1`).

    OMP_WAIT_POLICY=active THP_MEM_ALLOC_ENABLE=1 python benchmarks/folder_decode.py runs/demo/quantized --backend cpu
"""
import argparse

import torch

from rabit.cli.bench import _torch_run
from rabit.generate import StaticDecoder
from rabit.kernels import BACKENDS
from rabit.models import load_model
from rabit.serialization import packed_layers

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("folder")
ap.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

torch.set_num_threads(args.threads)
model, _ = load_model(args.folder)
for m in packed_layers(model).values():
    m.backend = args.backend
prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
dec = StaticDecoder(model, args.prompt_len + args.new_tokens + 2)
_torch_run(dec, prompt, min(8, args.new_tokens))
print(f"{args.backend}: {_torch_run(dec, prompt, args.new_tokens):.1f} tokens/s")
