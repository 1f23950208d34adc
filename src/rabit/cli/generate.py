"""`rabit generate PATH --prompt "..."`: stream text from a (packed 2-bit or full-precision) model, report tokens/s."""
from __future__ import annotations

import sys
import time


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a saved model (static KV cache), print tokens/s")
    p.add_argument("path", help="a folder written by rabit.save_quantized / `rabit quantize`, or any HF model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens of the prompt and of the text so far less likely (greedy too): a "
                        "positive logit is divided by it, a negative one multiplied (default: 1, off)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (slow to compile on CPU; see docs/INFERENCE.md)")
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    from ..kernels import BACKENDS

    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="kernel backend of the packed layers; cpu_int8: int8 lookup tables for the one-token "
                        "steps (faster, relative error ~5e-3 per layer, a second copy of the sign planes in "
                        "memory; docs/INFERENCE.md)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--no-verify", action="store_true",
                   help="load a saved rabit folder without checking its checksums (at your own risk)")
    from ..bos import add_bos_args

    add_bos_args(p, "the prompt (without --chat)")
    return p


def run(args) -> int:
    import os

    # before torch allocates the model: its CPU allocator then puts large tensors on transparent huge pages, which
    # made the GEMVs of a decoding step 3-7% faster (docs/RESULTS.md section 16); read once, at the first allocation
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    from ..generate import generate
    from ..models import load_model
    from ..serialization import packed_layers

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.path, device=args.device, verify=not args.no_verify)
    for m in packed_layers(model).values():
        m.backend = args.backend
    load_s = time.perf_counter() - t0

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if not args.no_stream:
        write(args.prompt)
    res = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=None if args.no_stream else write,
                   compile=args.compile, chat=args.chat, stop_at_eos=not args.ignore_eos, add_bos=args.bos,
                   repetition_penalty=args.repetition_penalty)
    if args.no_stream:
        write(args.prompt + res.text)
    write("\n")
    r = res.result
    kind = "2-bit rabit" if packed_layers(model) else "full precision"
    from ..bos import resolve_bos

    bos = "chat template" if args.chat else resolve_bos(tok, args.bos).describe()
    print(f"[{kind}; load {load_s:.1f} s; prompt {r.prompt_tokens} tokens in {r.prefill_s * 1e3:.0f} ms; "
          f"{len(r.tokens)} new tokens; decode {r.tokens_per_s:.1f} tokens/s; {torch.get_num_threads()} threads; {bos}]",
          file=sys.stderr)
    return 0
