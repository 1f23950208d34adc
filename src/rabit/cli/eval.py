"""`rabit eval PATH`: perplexity on named corpora and zero-shot tasks (lm-eval) of a model, as a table + JSON."""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from ..atomic_io import atomic_write_json
from ..models import DEFAULT_MODEL

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def add_parser(sub):
    p = sub.add_parser(
        "eval", help="perplexity and zero-shot accuracy (lm-eval) of a full-precision or 2-bit model",
        description="Evaluate a model folder (full precision or saved by rabit) or a model name: perplexity on "
                    "corpora and zero-shot lm-eval tasks. The model object itself is evaluated (packed 2-bit "
                    "kernels for rabit folders). Writes a table to the screen and a JSON file; never writes "
                    "into the model folder.")
    p.add_argument("path", nargs="?", default=DEFAULT_MODEL,
                   help=f"model folder, saved rabit folder, or model name (default: {DEFAULT_MODEL})")
    p.add_argument("--ppl", default="wikitext2-test", metavar="CORPORA",
                   help="comma list of corpora for perplexity: built-in names (wikitext2-test, wikitext2-valid, "
                        "austen), .txt/.jsonl files or folders, hf:NAME[:CONFIG][:SPLIT]; 'none' to skip "
                        "(default: wikitext2-test)")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window length (default: 2048)")
    from ..bos import add_bos_args

    add_bos_args(p, "each perplexity window")
    p.add_argument("--max-windows", type=int, default=None,
                   help="perplexity on the first N windows of each corpus only")
    p.add_argument("--tasks", default="", metavar="TASKS",
                   help="comma list of zero-shot lm-eval tasks (globs allowed). 'piqa' is shipped and runs "
                        "offline; other lm-eval tasks need their dataset cached or the hub reachable")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="extra folder of lm-eval task YAML files (repeatable)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N examples of each task (quick runs)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for zero-shot tasks (default: 8)")
    p.add_argument("--ppl-batch-size", type=int, default=1,
                   help="perplexity windows per forward pass (default: 1; logits are windows x seq-len x vocab)")
    p.add_argument("--zeroshot-backend", choices=["auto", "lm-eval", "native"], default="auto",
                   help="lm-eval (HFLM around our model), native (our PIQA scorer, same protocol; piqa only), "
                        "or auto: lm-eval when installed (default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights dtype for full-precision models (default: float32)")
    p.add_argument("--offline", action="store_true",
                   help="never contact the Hugging Face hub (sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the results (default: ./rabit-eval-<model>.json)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-verify", action="store_true",
                   help="load a saved rabit folder without checking its checksums (at your own risk)")
    return p


def _slug(path: str) -> str:
    name = Path(path.rstrip("/\\")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def set_offline() -> None:
    """Never contact the Hugging Face hub from here on (also for libraries that read the flags at import)."""
    import sys

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def _validate(args) -> tuple[list[str], list[str]]:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.ppl_batch_size < 1:
        raise ValueError(f"--ppl-batch-size must be >= 1, got {args.ppl_batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    corpora = [] if args.ppl.strip().lower() in ("", "none") else [c.strip() for c in args.ppl.split(",")
                                                                      if c.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not corpora and not tasks:
        raise ValueError("nothing to evaluate: give --ppl corpora and/or --tasks")
    return corpora, tasks


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def print_table(result: dict) -> None:
    ppl = result.get("perplexity") or {}
    if ppl:
        bos = "BOS + " if result["bos"] else ""
        print(f"\nPerplexity ({bos}{result['seq_len']}-token windows)\n")
        print("| corpus | windows | PPL |\n|---|---:|---:|")
        for name, r in ppl.items():
            print(f"| {name} | {r['windows']} | {r['ppl']:.3f} |")
    tasks = result.get("tasks") or {}
    if tasks:
        metrics = []
        for r in tasks.values():
            metrics += [k for k in r if not k.endswith("_stderr") and k not in ("n", "n_total", "backend")
                        and k not in metrics]
        print("\nZero-shot" + (f" (first {result['limit']} examples per task)" if result.get("limit") else "")
              + "\n")
        print("| task | n | " + " | ".join(metrics) + " |\n|---|---:|" + "---:|" * len(metrics))
        for name, r in tasks.items():
            cells = []
            for m in metrics:
                v, se = r.get(m), r.get(f"{m}_stderr")
                cells.append(_fmt(v) + (f" ± {se:.4f}" if isinstance(se, float) and not math.isnan(se) else ""))
            print(f"| {name} | {r.get('n', '')} | " + " | ".join(cells) + " |")


def run(args) -> int:
    corpora, tasks = _validate(args)
    if args.offline:
        set_offline()
    import torch

    from ..data import eval_tokens
    from ..eval.perplexity import perplexity
    from ..models import is_rabit_folder, load_model, resolve_model_path

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, DTYPES[args.dtype])
    out_path = Path(args.json) if args.json else Path.cwd() / f"rabit-eval-{_slug(args.path)}.json"

    # Bad task names / unreachable task data fail here, before the (slow) model load.
    prepared = None
    if tasks:
        from ..eval.zeroshot import prepare_tasks

        print(f"preparing tasks: {', '.join(tasks)}", flush=True)
        prepared = prepare_tasks(tasks, args.zeroshot_backend, include_paths=args.include_path)

    t0 = time.time()
    model, tok = load_model(args.path, dtype=dtype, device=device, verify=not args.no_verify)
    resolved = resolve_model_path(args.path)
    kind = "rabit" if Path(resolved).is_dir() and is_rabit_folder(resolved) else "hf"
    print(f"loaded {args.path} ({kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
          f"as tensors) in {time.time() - t0:.1f} s on {device}", flush=True)
    from ..bos import resolve_bos

    bos_choice = resolve_bos(tok, args.bos)
    bos = bos_choice.token_id
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and args.seq_len + (1 if bos is not None else 0) > max_pos and corpora:
        print(f"warning: --seq-len {args.seq_len} exceeds the model's max_position_embeddings {max_pos}",
              flush=True)

    result = dict(model=args.path, resolved_path=str(resolved), kind=kind, device=device, dtype=args.dtype,
                  seq_len=args.seq_len, bos=bos is not None, bos_source=bos_choice.source, max_windows=args.max_windows, limit=args.limit,
                  num_fewshot=args.num_fewshot, perplexity={}, tasks={})
    for corpus in corpora:
        t0 = time.time()
        tokens = eval_tokens(tok, corpus)
        windows = tokens.numel() // args.seq_len
        if args.max_windows is not None:
            windows = min(windows, args.max_windows)
        value = perplexity(model, tokens, args.seq_len, bos, args.max_windows, batch_size=args.ppl_batch_size,
                           progress=True)
        result["perplexity"][corpus] = dict(ppl=value, windows=windows, tokens=windows * args.seq_len,
                                            seconds=time.time() - t0)
        print(f"{corpus}: perplexity {value:.3f} ({windows} windows, {time.time() - t0:.1f} s)", flush=True)
    if prepared is not None:
        from ..eval.zeroshot import evaluate_tasks

        t0 = time.time()
        result["tasks"] = evaluate_tasks(model, tok, prepared, limit=args.limit, num_fewshot=args.num_fewshot,
                                         batch_size=args.batch_size, seed=args.seed)
        result["tasks_seconds"] = time.time() - t0
    print_table(result)
    atomic_write_json(out_path, result, allow_nan=True, sort_keys=False)
    print(f"\nwrote {out_path}")
    return 0
