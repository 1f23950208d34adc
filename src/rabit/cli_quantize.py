"""`rabit quantize`: the main job. Calibrate, initialize (ISVID + preconditioning), distill from the
full-precision teacher for a token budget, evaluate perplexity before and after, and save the 2-bit model.

Everything lands in one run folder (default runs/<model>-<mode>):

    run.json            what this run is (model, RaBiT and training settings, data); checked on --resume
    log.jsonl           one line per optimizer step (losses, grad norm, learning rates, tokens/s)
    checkpoints/        the latest checkpoint (see rabit.train.checkpoint)
    evals.json          perplexities measured before training (reused when resuming)
    loss.png            loss curves
    summary.json/.md    FP vs 2-bit perplexity, time, tokens
    model.safetensors   the trained student's state dict (+ rabit_config.json)
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import INITS, LATENT_INITS, MODES, STES, RaBiTConfig
from .models import DEFAULT_MODEL, cache_root

# Defaults sized for the default model on 2 CPU cores (see docs/TRAINING.md for the measurements).
DEFAULT_TOKENS = 40_960
DEFAULT_SEQ_LEN = 512
DEFAULT_LATENT_LR = 3e-3
DEFAULT_SCALE_LR = 1e-3
# KL only: at 24k tokens on SmolLM2, gamma 0 reached perplexity 411 vs 486 (relative hidden loss, gamma 10) and
# 801 (the paper's Llama recipe, MSE with gamma 100); docs/RESULTS.md section 2.
DEFAULT_GAMMA = 0.0
DEFAULT_EVAL_WINDOWS = 16
DEFAULT_GRAD_ACCUM = 4
DEFAULT_SAVE_EVERY = 10

# Files a run writes (the only ones --overwrite removes; anything else in the folder is left alone).
RUN_FILES = ("run.json", "log.jsonl", "evals.json", "loss.png", "summary.json", "summary.md",
             "model.safetensors", "rabit_config.json")
RUN_DIRS = ("checkpoints", "quantized")
# run.json keys that may change between a run and its --resume (they do not affect the trained model).
NON_IDENTITY = ("eval", "save_every", "keep_checkpoints", "progress", "version")
# Training settings added after version 1 of run.json, with the value older runs implicitly used.
ADDED_TRAIN_SETTINGS = {"hidden_loss": "mse"}
# Data settings added later, likewise (runs before BOS followed the tokenizer never started sequences with BOS).
ADDED_DATA_SETTINGS = {"bos": False}


def add_parser(sub):
    p = sub.add_parser(
        "quantize", help="compress a causal LM to 2 bits: calibrate, initialize, distill, evaluate, save",
        description="Compress a causal LM to 2 bits with RaBiT: calibrate, initialize (ISVID + "
                    "preconditioning), distill from the full-precision model for a token budget, "
                    "evaluate perplexity before and after, and save the result. With no arguments, "
                    f"runs on {DEFAULT_MODEL} with defaults sized for ~15 minutes on 2 CPU cores.")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or local Hugging Face folder (default: {DEFAULT_MODEL}, offline)")
    g.add_argument("--out", default=None, help="run folder (default: runs/<model>-<mode>)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds another run (removes that run's files only)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--keep-fp32", action="store_true",
                   help="store the unquantized tensors (embeddings, head, norms) of the saved model in fp32 "
                        "(default: 16 bits, the source checkpoint's dtype or bf16)")
    g.add_argument("--embed-bits", type=int, choices=(8, 4), default=None,
                   help="also quantize the embedding and full-precision output head of the saved model group-wise "
                        "to 8 or 4 bits (default: keep them in 16 bits; see docs/RESULTS.md for the cost)")
    g.add_argument("--embed-group-size", type=int, default=64, help="values per scale with --embed-bits (default: 64)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, usually the number of cores)")

    q = p.add_argument_group("RaBiT layers")
    q.add_argument("--mode", choices=MODES, default="coupled",
                   help="coupled = RaBiT (one shared latent), independent = residual QAT, frozen = "
                        "independent with all but the last path frozen (default: coupled)")
    q.add_argument("--num-paths", type=int, default=2, help="binary paths per layer = bits per weight (default: 2)")
    q.add_argument("--init", choices=INITS, default="isvid", help="path initialization (default: isvid)")
    q.add_argument("--isvid-rounds", type=int, default=RaBiTConfig.isvid_rounds,
                   help=f"Gauss-Seidel rounds of iterative residual SVID (default: {RaBiTConfig.isvid_rounds})")
    q.add_argument("--svid-power-iters", type=int, default=RaBiTConfig.svid_power_iters)
    q.add_argument("--no-precondition", action="store_true", help="skip activation/gradient preconditioning")
    q.add_argument("--alpha-in", type=float, default=RaBiTConfig.alpha_in)
    q.add_argument("--alpha-out", type=float, default=RaBiTConfig.alpha_out)
    q.add_argument("--ste", choices=STES, default="identity", help="straight-through estimator (default: identity)")
    q.add_argument("--ste-clip", type=float, default=RaBiTConfig.ste_clip)
    q.add_argument("--latent-init", choices=LATENT_INITS, default="weight",
                   help="coupled mode: start the latent from the original weight or the reconstruction")
    q.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="module-name regex kept in full precision (repeatable; default: embed, lm_head)")

    d = p.add_argument_group("data")
    d.add_argument("--train-data", default="wikitext2-valid",
                   help="training corpora, comma-separated: built-in names (wikitext2-valid, austen), .txt/.jsonl "
                        "files or folders, hf:NAME[:CONFIG][:SPLIT] (default: wikitext2-valid)")
    d.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="training sequence length (default: 512)")
    d.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the training text")
    d.add_argument("--val-sequences", type=int, default=4,
                   help="held-out sequences for the before/after distillation loss (0: skip; default: 4)")
    from .bos import add_bos_args

    add_bos_args(d, "training, calibration and perplexity sequences")
    d.add_argument("--calib-data", default=None, help="calibration corpus (default: the first --train-data)")
    d.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (default: 16)")
    d.add_argument("--calib-len", type=int, default=512, help="calibration sequence length (default: 512)")

    t = p.add_argument_group("distillation")
    t.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"training token budget (default: {DEFAULT_TOKENS:,}, ~10 minutes of training on 2 CPU "
                        "cores with the default model)")
    t.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default: 1)")
    t.add_argument("--grad-accum", type=int, default=DEFAULT_GRAD_ACCUM,
                   help=f"micro-batches per optimizer step (default: {DEFAULT_GRAD_ACCUM}; Muon's orthogonalization "
                        "costs about 1.6 micro-batches of 512 tokens on CPU, so fewer, larger steps are faster)")
    t.add_argument("--latent-lr", type=float, default=DEFAULT_LATENT_LR,
                   help=f"Muon learning rate of the latent weights, AdamW-matched RMS (default: {DEFAULT_LATENT_LR:g})")
    t.add_argument("--scale-lr", type=float, default=DEFAULT_SCALE_LR,
                   help=f"AdamW learning rate of scales and norms (default: {DEFAULT_SCALE_LR:g})")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    t.add_argument("--latent-weight-decay", type=float, default=0.0, help="Muon weight decay (default: 0)")
    t.add_argument("--warmup", type=float, default=0.05,
                   help="warm-up: a fraction of the steps if < 1, else a number of steps (default: 0.05)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor (default: 0.1)")
    t.add_argument("--gamma", type=float, default=DEFAULT_GAMMA,
                   help="weight of the per-block hidden-state term (default: 0, logits KL only, which trained best "
                        "on SmolLM2 at CPU budgets, see docs/RESULTS.md; the paper uses 100 for Llama, 0 for Gemma 3)")
    t.add_argument("--hidden-loss", choices=("mse", "relative"), default="mse",
                   help="hidden-state term: mse (the paper's) or relative (per-token ||s-t||^2/||t||^2, every "
                        "token and block weighted equally; use a gamma around 1-10) (default: mse)")
    t.add_argument("--temperature", type=float, default=1.0, help="KL temperature (default: 1)")
    t.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: off)")
    t.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                   help="bf16 autocast (default: on where the device has native bf16)")
    t.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--save-every", type=int, default=DEFAULT_SAVE_EVERY,
                   help=f"checkpoint every N steps (default: {DEFAULT_SAVE_EVERY}; also at the end)")
    t.add_argument("--muon-ns-steps", type=int, default=5,
                   help="Newton-Schulz iterations in Muon (default: 5; fewer is faster, less orthogonal)")
    t.add_argument("--teacher-bf16", action="store_true",
                   help="run a bf16 copy of the teacher (more memory; no faster than autocast on CPU)")
    t.add_argument("--seed", type=int, default=0)

    q.add_argument("--no-init-cache", dest="init_cache", action="store_false",
                   help="always calibrate and initialize from scratch (default: reuse initialized paths from "
                        "~/.cache/rabit/init when the model, init settings and calibration data are the same)")

    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-data", default="wikitext2-test", help="perplexity corpus (default: wikitext2-test)")
    e.add_argument("--eval-seq-len", type=int, default=2048, help="perplexity window (default: 2048)")
    e.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS,
                   help=f"evaluate the first N windows (default: {DEFAULT_EVAL_WINDOWS}; 0 = the whole corpus, "
                        "~13 min per model on 2 CPU cores)")
    e.add_argument("--eval-bos", action="store_true",
                   help="prefix each perplexity window with BOS even where --bos / the tokenizer says not to")
    e.add_argument("--skip-init-eval", action="store_true",
                   help="do not measure the perplexity of the initialized model before training")
    from .train.distributed import add_distributed_args

    add_distributed_args(p)
    return p


# ----------------------------------------------------------------------------------------- helpers
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _slug(name: str) -> str:
    base = Path(name.rstrip("/")).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _validate_args(args) -> None:
    checks = [("--tokens", args.tokens, 1), ("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
              ("--grad-accum", args.grad_accum, 1), ("--save-every", args.save_every, 1),
              ("--calib-samples", args.calib_samples, 1), ("--calib-len", args.calib_len, 2),
              ("--eval-seq-len", args.eval_seq_len, 2), ("--eval-windows", args.eval_windows, 0),
              ("--val-sequences", args.val_sequences, 0), ("--num-paths", args.num_paths, 1)]
    for flag, value, low in checks:
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")


def _rabit_config(args) -> RaBiTConfig:
    return RaBiTConfig(num_paths=args.num_paths, mode=args.mode, init=args.init, isvid_rounds=args.isvid_rounds,
                       precondition=not args.no_precondition, alpha_in=args.alpha_in, alpha_out=args.alpha_out,
                       ste=args.ste, ste_clip=args.ste_clip, latent_init=args.latent_init,
                       exclude=tuple(args.exclude) if args.exclude else None,
                       svid_power_iters=args.svid_power_iters)


def _sources(spec: str) -> list[str]:
    out = [s.strip() for s in spec.split(",") if s.strip()]
    if not out:
        raise ValueError("no training corpus given")
    return out


def _run_state(out: Path) -> str:
    """'missing', 'empty', 'run' (holds run.json) or 'foreign' (other files)."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / "run.json").exists():
        return "run"
    return "foreign" if any(out.iterdir()) else "empty"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k in NON_IDENTITY:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every run.json setting that differs and defines the run."""
    # A run written before a setting existed ran with that setting's default.
    a = {**{f"train.{k}": v for k, v in ADDED_TRAIN_SETTINGS.items()},
         **{f"data.{k}": v for k, v in ADDED_DATA_SETTINGS.items()}, **_flatten(old)}
    b = _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _option_strings() -> set[str]:
    import argparse

    quantize = add_parser(argparse.ArgumentParser(add_help=False).add_subparsers())
    return {o for a in quantize._actions for o in a.option_strings}


def different_run_error(out: Path, old: dict, new: dict) -> ValueError | None:
    """The error for a folder that holds another run, naming the settings that differ and, where a flag sets
    one, the flags that would reproduce the stored run (defaults may have changed since it started)."""
    changes = _identity_changes(old, new)
    if not changes:
        return None
    flags = _option_strings()
    hint = []
    for key, was, _ in changes:
        flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        if flag in flags and isinstance(was, (int, float, str)) and not isinstance(was, bool):
            hint.append(f"{flag} {was}")
    msg = f"{out} holds a different run ({'; '.join(f'{k}: {x!r} -> {y!r}' for k, x, y in changes[:6])})"
    if hint:
        msg += f"; to continue that run pass its settings: --resume {' '.join(hint)}"
    return ValueError(msg + "; or use another --out, or --overwrite to replace it")


def _model_fingerprint(model) -> str:
    """SHA-256 over the model's parameter names, shapes and bytes (stable across loads)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fp_ppl_cached(model, key: dict, compute) -> tuple[float, bool]:
    """FP perplexity from ~/.cache/rabit/ppl (keyed by model, corpus, window, windows, BOS), else compute."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_root() / "ppl" / f"{digest}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and isinstance(cached.get("ppl"), float):
            return cached["ppl"], True
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    value = compute()
    try:
        from .train.checkpoint import atomic_write_json

        atomic_write_json(path, {"key": key, "ppl": value})
    except OSError as e:
        _say(f"(could not cache the FP perplexity in {path}: {e})")
    return value, False


def save_student(student, out: Path, tokenizer, base_model: str, keep_fp32: bool = False,
                 embed_bits: int | None = None, embed_group_size: int = 64) -> list[Path]:
    """Save the trained student: a plain safetensors state dict (the exact training state), plus the packed
    format (unquantized tensors in 16 bits unless keep_fp32; embedding and head group-quantized to embed_bits,
    which converts `student` in place), whose size per component is printed."""
    from .atomic_io import atomic_save_safetensors, atomic_write_json
    from .train.checkpoint import dedup_state_dict

    cfg = getattr(student, "rabit_config", None)
    unique, aliases = dedup_state_dict(student.state_dict())
    meta = {"format": "rabit-state-dict", "base_model": base_model, "aliases": json.dumps(aliases),
            "rabit_config": cfg.to_json() if cfg is not None else "{}"}
    atomic_save_safetensors(unique, out / "model.safetensors", metadata=meta)
    if cfg is not None:
        atomic_write_json(out / "rabit_config.json", cfg.to_dict())
    written = [out / "model.safetensors"]
    # ---- packed 2-bit export: the single call site for rabit.serialization (built separately) ----
    try:
        from .serialization import save_quantized
    except ImportError:
        save_quantized = None
    if save_quantized is not None:
        from .serialization import size_report
        from .storage import format_size_report

        if embed_bits:
            from .embedquant import quantize_embeddings_

            quantize_embeddings_(student, embed_bits, embed_group_size)
        save_quantized(student, out / "quantized", tokenizer, dtype=torch.float32 if keep_fp32 else None)
        written.append(out / "quantized")
        _say(format_size_report(size_report(out / "quantized")))
    return written


def _initialized_student(teacher, rcfg: RaBiTConfig, calib, autocast: bool, progress: bool, use_cache: bool):
    """The calibrated and initialized student, with its paths reused from (or saved to) the init cache.

    Returns (student, whether the paths came from the cache)."""
    from . import init_cache
    from .quantize import find_linear_layers, rabit_layers
    from .train.trainer import make_student

    if not use_cache:
        return _calibrate_and_initialize(teacher, rcfg, calib, autocast, progress), False
    calib_desc = None
    if calib is not None:
        calib_desc = {"tokens_sha256": hashlib.sha256(calib.to(torch.int64).numpy().tobytes()).hexdigest(),
                      "shape": list(calib.shape), "autocast": bool(autocast)}
    key = init_cache.init_key(_model_fingerprint(teacher), rcfg, calib_desc)
    path = init_cache.cache_path(cache_root() / "init", key)
    # Runs started together (rabit ablate --jobs) wait for the first one's initialization instead of repeating it.
    with init_cache.lock(path):
        student = make_student(teacher, rcfg, initialize=False)
        if init_cache.load_paths(path, rabit_layers(student), find_linear_layers(teacher, rcfg), key):
            return student, True
        del student
        recorder = init_cache.PathRecorder()
        student = _calibrate_and_initialize(teacher, rcfg, calib, autocast, progress, on_init=recorder)
        try:
            recorder.save(path, key)
        except OSError as e:
            _say(f"(could not write the init cache {path}: {e})")
    return student, False


def check_save_options(args, teacher) -> None:
    """Refuse a save option that cannot apply to this model before training, not after."""
    if getattr(args, "embed_bits", None):
        from .embedquant import check_group_size

        check_group_size(teacher.get_input_embeddings().embedding_dim, args.embed_group_size)


def bos_choices(args, tokenizer):
    """(BOS of training and calibration sequences, BOS of perplexity windows), each a rabit.bos.BosChoice: the
    tokenizer's rule unless --bos / --no-bos; --eval-bos forces BOS in evaluation only."""
    from .bos import resolve_bos

    train = resolve_bos(tokenizer, getattr(args, "bos", None))
    return train, (resolve_bos(tokenizer, True) if args.eval_bos else train)


def _calibrate_and_initialize(teacher, rcfg: RaBiTConfig, calib, autocast: bool, progress: bool, on_init=None):
    from .train.trainer import make_student

    n_calib = "no calibration" if calib is None else f"{calib.shape[0]} x {calib.shape[1]} calibration tokens"
    _say(f"calibrating ({n_calib}) and initializing ({rcfg.init}) ...")
    return make_student(teacher, rcfg, calibration=calib, progress=progress, calib_autocast=autocast,
                        on_init=on_init)


def finish_run(args, out: Path, student, tokenizer, evals: dict, eval_desc: str, final: float, result,
               val_after: dict | None, autocast: bool, wall0: float, world_size: int = 1,
               extra: dict | None = None) -> int:
    """The end of a run (one process or several): save the student, plot the losses, write and print the
    summary. `extra` adds keys to summary.json (the distributed path adds memory figures)."""
    from .train.checkpoint import atomic_write_json
    from .train.report import plot_losses, summary_markdown
    from .train.trainer import StepLog

    written = save_student(student, out, tokenizer, args.model, keep_fp32=getattr(args, "keep_fp32", False),
                           embed_bits=getattr(args, "embed_bits", None),
                           embed_group_size=getattr(args, "embed_group_size", 64))
    rows = StepLog.read(out / "log.jsonl")
    procs = f" ({world_size} processes)" if world_size > 1 else ""
    plot_losses(rows, out / "loss.png", gamma=args.gamma,
                title=f"RaBiT {args.mode} k={args.num_paths}: {args.model}{procs}")
    train_seconds = sum(r.get("seconds", 0.0) for r in rows)
    summary = {
        "model": args.model, "mode": args.mode, "num_paths": args.num_paths, "out": str(out),
        **({"world_size": world_size} if world_size > 1 else {}),
        "eval": {"description": eval_desc, "fp": evals.get("fp"), "init": evals.get("init"), "final": final},
        "train": {"steps": result.steps, "tokens": result.tokens, "seconds": train_seconds,
                  "tokens_per_second": result.tokens / train_seconds if train_seconds else None,
                  "session_tokens_per_second": result.tokens_per_second, "resumed_from": result.resumed_from,
                  "bf16": autocast, "val_before": evals.get("val_before"), "val_after": val_after,
                  "last": result.last},
        **(extra or {}),
        "init_seconds": evals.get("init_seconds"),
        "wall_seconds": time.time() - wall0,
        "files": [str(p) for p in written] + [str(out / "loss.png"), str(out / "log.jsonl")],
    }
    atomic_write_json(out / "summary.json", summary)
    md = summary_markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)
    print(f"saved {', '.join(str(p) for p in written)}; loss curves in {out / 'loss.png'}")
    return 0


# --------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from .train.distributed import maybe_distributed

    status = maybe_distributed(args)  # --nproc N, or launched by torchrun: the FSDP2 path
    if status is not None:
        return status
    from .data import eval_tokens, training_sequences
    from .eval.perplexity import perplexity
    from .models import load_model, resolve_model_path
    from .train.checkpoint import CheckpointError, atomic_write_json, latest_checkpoint, read_json
    from .train.optim import OptimConfig
    from .train.trainer import Trainer, TrainConfig, make_student, native_bf16

    wall0 = time.time()
    _validate_args(args)
    rcfg = _rabit_config(args)
    out = Path(args.out) if args.out else Path("runs") / f"{_slug(args.model)}-{args.mode}"
    state = _run_state(out)  # read-only look at the folder; nothing is written before all checks pass
    if args.resume and state != "run":
        raise FileNotFoundError(f"--resume: {out} holds no run to resume")
    if state == "foreign" and not args.overwrite:
        raise ValueError(f"{out} is not empty and holds no rabit run; choose another --out or pass --overwrite "
                         "(only the files a run writes would be replaced)")
    old_run = None
    if state == "run":
        try:
            old_run = json.loads((out / "run.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            if not args.overwrite:
                raise ValueError(f"{out / 'run.json'} is unreadable ({e}); pass --overwrite to start over") from None
    progress = not args.no_progress
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")

    # ---- model, data, budget: every failure here leaves the run folder untouched
    _say(f"loading {args.model} ...")
    teacher, tok = load_model(args.model, device=str(device))
    check_save_options(args, teacher)
    train_bos, eval_bos = bos_choices(args, tok)
    sources = _sources(args.train_data)
    train, val = training_sequences(tok, sources, args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
                                    add_bos=train_bos.use)
    calib_sources = _sources(args.calib_data) if args.calib_data else sources[:1]
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    steps = args.tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"--tokens {args.tokens} is smaller than one optimizer step "
                         f"({args.batch_size} x {args.grad_accum} x {args.seq_len} = {tokens_per_step} tokens)")
    warmup = int(round(args.warmup * steps)) if args.warmup < 1 else int(args.warmup)
    autocast = native_bf16(device) if args.bf16 is None else args.bf16
    tcfg = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, gamma=args.gamma,
                       hidden_loss=args.hidden_loss, temperature=args.temperature, autocast=autocast,
                       gradient_checkpointing=args.gradient_checkpointing, max_grad_norm=args.max_grad_norm,
                       save_every=args.save_every, seed=args.seed, teacher_bf16=args.teacher_bf16,
                       optim=OptimConfig(latent_lr=args.latent_lr, scale_lr=args.scale_lr,
                                         weight_decay=args.weight_decay,
                                         latent_weight_decay=args.latent_weight_decay,
                                         muon_ns_steps=args.muon_ns_steps,
                                         warmup_steps=min(warmup, steps), min_lr_ratio=args.min_lr_ratio))
    tcfg.validate()
    eval_desc = (f"{args.eval_data}, " + (f"the first {args.eval_windows} windows of {args.eval_seq_len} tokens "
                 f"({args.eval_windows * args.eval_seq_len:,} tokens; --eval-windows 0 for the whole corpus)"
                 if args.eval_windows else f"all windows of {args.eval_seq_len} tokens")
                 + (", BOS-prefixed" if eval_bos.use else ""))
    run_info = {
        "format": "rabit-quantize-run", "version": 1, "model": args.model,
        "model_path": str(resolve_model_path(args.model)), "rabit_config": rcfg.to_dict(),
        "train": tcfg.to_dict(), "tokens": steps * tokens_per_step,
        "data": {"train": sources, "seq_len": args.seq_len, "val_fraction": args.val_fraction,
                 "train_sequences": int(train.shape[0]), "calib": calib_sources,
                 "calib_samples": args.calib_samples, "calib_len": args.calib_len, "bos": train_bos.use},
        "eval": {"data": args.eval_data, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
                 "bos": eval_bos.use, "val_sequences": args.val_sequences, "skip_init": args.skip_init_eval},
    }
    run_info = json.loads(json.dumps(run_info))
    if old_run is not None and not args.overwrite:
        err = different_run_error(out, old_run, run_info)
        if err is not None:
            raise err
        if not args.resume:
            raise ValueError(f"{out} already holds this run; pass --resume to continue it or --overwrite to "
                             "start over")
    ck_path = latest_checkpoint(out) if args.resume else None  # raises CheckpointError when damaged
    if args.resume and ck_path is not None:
        from .train.checkpoint import verify_checkpoint

        verify_checkpoint(ck_path)  # report a corrupt checkpoint before any other work
    eval_stream = eval_tokens(tok, args.eval_data)
    if eval_stream.numel() < args.eval_seq_len:
        raise ValueError(f"--eval-data {args.eval_data} has {eval_stream.numel()} tokens, fewer than one "
                         f"window of {args.eval_seq_len}")

    # ---- all checks passed: prepare the folder
    if args.overwrite and state in ("run", "foreign"):
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run.json", run_info)
    _say(f"run folder: {out}")
    _say(f"training: {steps} steps x {tokens_per_step} tokens = {steps * tokens_per_step:,} tokens from "
         f"{', '.join(sources)} ({train.shape[0]} sequences of {args.seq_len}), bf16 autocast "
         f"{'on' if autocast else 'off'}, mode {args.mode}, k={args.num_paths}, {train_bos.describe()}")

    bos = eval_bos.token_id
    windows = args.eval_windows or None

    def ppl(model, what):
        _say(f"perplexity of the {what} model on {eval_desc} ...")
        return perplexity(model, eval_stream, args.eval_seq_len, bos, windows, progress=progress)

    evals_path = out / "evals.json"
    evals = {}
    if args.resume and evals_path.exists():
        try:
            evals = read_json(evals_path, "evaluation record")
        except CheckpointError as e:
            _say(f"({e}; measuring again)")
            evals = {}
    from .data import tokenizer_fingerprint

    if "fp" not in evals:
        t0 = time.time()
        key = {"model": _model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tok),
               "corpus": args.eval_data, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
               "bos": bos, "dtype": "float32"}
        fp, hit = _fp_ppl_cached(teacher, key, lambda: ppl(teacher, "full-precision"))
        evals["fp"] = fp
        evals["fp_seconds"] = time.time() - t0
        _say(f"full precision: perplexity {fp:.3f}" + (" (cached)" if hit else ""))
        atomic_write_json(evals_path, evals)

    # ---- student: from the checkpoint, or calibrated and initialized
    if ck_path is not None:
        _say(f"resuming from {ck_path}")
        student = make_student(teacher, rcfg, initialize=False)
    else:
        calib = None
        if rcfg.precondition:
            from .data import calibration_batch

            calib = calibration_batch(tok, calib_sources, args.calib_samples, args.calib_len, seed=args.seed,
                                      add_bos=train_bos.use)
        t0 = time.time()
        student, cached = _initialized_student(teacher, rcfg, calib, autocast, progress, args.init_cache)
        evals["init_seconds"] = time.time() - t0
        evals["init_cached"] = cached
        _say(f"initialized in {evals['init_seconds']:.0f} s" + (" (paths from the init cache)" if cached else ""))
        if not args.skip_init_eval and "init" not in evals:
            evals["init"] = ppl(student, f"{args.num_paths}-bit initialized")
            _say(f"{args.num_paths}-bit after initialization: perplexity {evals['init']:.3f}")
        atomic_write_json(evals_path, evals)
    student.to(device)

    trainer = Trainer(teacher, student, train, tcfg, out, progress=progress)
    if ck_path is not None:
        trainer.resume()
        _say(f"resumed at step {trainer.step} of {steps}")
    val_rows = val[: args.val_sequences] if args.val_sequences and val.shape[0] else None
    if val_rows is not None and "val_before" not in evals:
        evals["val_before"] = trainer.evaluate(val_rows)
        atomic_write_json(evals_path, evals)
    result = trainer.train()
    val_after = trainer.evaluate(val_rows) if val_rows is not None else None
    trainer.teacher_run = None  # free the bf16 teacher copy before evaluation

    final = ppl(student, f"{args.num_paths}-bit distilled")
    _say(f"{args.num_paths}-bit after distillation: perplexity {final:.3f}")
    return finish_run(args, out, student, tok, evals, eval_desc, final, result, val_after, autocast, wall0,
                      extra={"bos": {"train": train_bos.to_dict(), "eval": eval_bos.to_dict()}})
