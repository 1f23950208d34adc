"""`rabit quantize`: the main job. Rotate (where supported), initialize (ISVID; preconditioned by calibration
statistics on an unrotated model), refine block by block, distill from the full-precision teacher for a token
budget, evaluate perplexity after each stage, and save the 2-bit model.

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

import contextlib
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..config import RaBiTConfig
from ..job import JobSpec
from ..models import DEFAULT_MODEL
from ..paths import cache_root
from .options import add_job_arguments, job_from_args


def add_parser(sub):
    p = sub.add_parser(
        "quantize", help="compress a causal LM to 2 bits: rotate, initialize, refine, distill, evaluate, save",
        description="Compress a causal LM to 2 bits with RaBiT: rotate the residual stream (where supported), "
                    "initialize (ISVID), refine block by block, distill from the full-precision model for a "
                    "token budget, evaluate perplexity after each stage, and save the result. With no arguments, "
                    f"runs on {DEFAULT_MODEL} with defaults sized for 15-20 minutes on 2 CPU cores.")
    add_job_arguments(p)
    return p


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Within one job (`run`) the teacher is frozen and asked for its fingerprint up to four times (FP perplexity,
# initialization cache, the out-of-domain plan and score), 0.5-0.6 s of hashing each on the default model: remembered
# per model object for the job's duration only (a model changed between jobs, even through `.data`, is hashed anew).
_JOB_FINGERPRINTS: dict[int, tuple[object, str]] | None = None


@contextlib.contextmanager
def remembered_fingerprints():
    """Within the `with` statement each model is hashed once (so its weights must not change there, as in a job)."""
    global _JOB_FINGERPRINTS
    outer = _JOB_FINGERPRINTS
    _JOB_FINGERPRINTS = {} if outer is None else outer
    try:
        yield
    finally:
        _JOB_FINGERPRINTS = outer


def _model_fingerprint(model) -> str:
    """SHA-256 over the model's parameter names, shapes and bytes (stable across loads)."""
    memo = _JOB_FINGERPRINTS
    if memo is not None and id(model) in memo and memo[id(model)][0] is model:
        return memo[id(model)][1]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    if memo is not None:
        memo[id(model)] = (model, digest)   # the model itself is kept, so that its id cannot be reused meanwhile
    return digest


def _fp_ppl_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "ppl" / f"{digest}.json"


def _fp_ppl_lookup(key: dict) -> float | None:
    """The cached FP perplexity under key, or None."""
    try:
        cached = json.loads(_fp_ppl_path(key).read_text())
        if cached.get("key") == key and isinstance(cached.get("ppl"), float):
            return cached["ppl"]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return None


def _fp_ppl_cached(model, key: dict, compute) -> tuple[float, bool]:
    """FP perplexity from ~/.cache/rabit/ppl (keyed by model, corpus, window, windows, BOS), else compute."""
    cached = _fp_ppl_lookup(key)
    if cached is not None:
        return cached, True
    value = compute()
    path = _fp_ppl_path(key)
    try:
        from ..train.checkpoint import atomic_write_json

        atomic_write_json(path, {"key": key, "ppl": value})
    except OSError as e:
        _say(f"(could not cache the FP perplexity in {path}: {e})")
    return value, False


def eval_autocast_dtype(autocast: bool) -> torch.dtype | None:
    return torch.bfloat16 if autocast else None


def eval_dtype_key(autocast: bool) -> str:
    """The precision part of a cached FP perplexity's key."""
    return "bf16-autocast" if autocast else "float32"


def eval_description(spec: JobSpec, bos_prefixed: bool, autocast: bool) -> str:
    """How the job's perplexities are measured, for the log and the summary."""
    ev = spec.eval
    return (ev.description() + (", BOS-prefixed" if bos_prefixed and not ev.bos else "")
            + (", under bf16 autocast" if autocast else ""))


def record_eval_autocast(evals: dict, autocast: bool) -> bool:
    """Whether this run's perplexities are measured under bf16 autocast: a resumed run keeps what its first session
    measured in (evals.json without the key: fp32, as every run did before the choice existed)."""
    if "fp" in evals and "eval_autocast" not in evals:
        evals["eval_autocast"] = False
    return bool(evals.setdefault("eval_autocast", autocast))


class JobPerplexity:
    """The job's perplexity measurements on one corpus. The full-precision and the final model are scored on
    spec.eval.windows; the intermediate stages (after initialization, after the block stage, before the scale-only
    phase) on the first spec.eval.stage_windows only, which costs a fraction of it (each 2048-token window is
    ~9 s of a 2-core CPU for the default model). The FP and final models' figures on those same first windows come
    free with their full evaluation, so every stage can be compared on equal windows."""

    def __init__(self, spec: JobSpec, stream: torch.Tensor, bos: int | None, description: str, progress: bool,
                 say=None, autocast: bool = False):
        ev = spec.eval
        self.spec, self.stream, self.bos, self.description, self.progress = spec, stream, bos, description, progress
        self.autocast = autocast  # bf16 autocast (EvalSpec.autocast), for every model this scorer measures
        self.say = say or _say
        self.windows = ev.windows or None
        # None: the stages are scored like the final model (stage_windows 0, or not fewer than the final windows)
        self.stage_windows = ev.stage_windows if 0 < ev.stage_windows < self.final_windows() else None
        self.window_seconds: float | None = None   # seconds per window of the latest evaluation (job budget)

    def record_windows(self, evals: dict) -> None:
        """Note in evals the windows its stages are scored on; a run resumed from before stage windows existed
        scored them on all windows."""
        evals.setdefault("stage_windows", None if ("init" in evals or "blocks" in evals) else self.stage_windows)

    def _nlls(self, model, what: str, windows: int | None):
        from ..eval.perplexity import window_nlls

        ev = self.spec.eval
        where = (self.description if windows == self.windows
                 else f"{ev.data}, the first {windows} windows of {ev.seq_len} tokens")
        self.say(f"perplexity of the {what} model on {where} ...")
        t0 = time.perf_counter()
        nll, count = window_nlls(model, self.stream, self.spec.eval.seq_len, self.bos, windows,
                                 progress=self.progress, autocast_dtype=eval_autocast_dtype(self.autocast))
        if count:   # one scored-token count per window
            self.window_seconds = (time.perf_counter() - t0) / len(count)
        return nll, count

    def final_windows(self) -> int:
        """Windows the final model is scored on."""
        available = max(self.stream.numel() // self.spec.eval.seq_len, 1)
        return min(self.windows or available, available)

    def full(self, model, what: str) -> tuple[float, float | None]:
        """(perplexity on the evaluation windows, perplexity on the first stage windows or None)."""
        from ..eval.perplexity import perplexity_of

        nll, count = self._nlls(model, what, self.windows)
        return perplexity_of(nll, count), (perplexity_of(nll, count, self.stage_windows)
                                           if self.stage_windows else None)

    def stage(self, model, what: str) -> float:
        """Perplexity of an intermediate stage (on the stage windows)."""
        if self.stage_windows is None:
            return self.full(model, what)[0]
        from ..eval.perplexity import perplexity_of

        return perplexity_of(*self._nlls(model, what, self.stage_windows))

    def fp(self, teacher, tokenizer) -> tuple[float, float | None, bool]:
        """(FP perplexity, FP perplexity on the stage windows, whether both came from the cache)."""
        from ..data import tokenizer_fingerprint

        ev = self.spec.eval
        base = {"model": _model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tokenizer),
                "corpus": ev.data, "seq_len": ev.seq_len, "bos": self.bos, "dtype": eval_dtype_key(self.autocast)}
        measured = {}

        def full():
            measured["v"] = self.full(teacher, "full-precision")
            return measured["v"][0]

        fp, hit = _fp_ppl_cached(teacher, {**base, "windows": ev.windows}, full)
        if self.stage_windows is None:
            return fp, None, hit
        # from the full pass just made, else (the full figure was cached) a pass over the stage windows only
        fp_stage, hit_stage = _fp_ppl_cached(
            teacher, {**base, "windows": self.stage_windows},
            lambda: measured["v"][1] if measured else self.stage(teacher, "full-precision"))
        return fp, fp_stage, hit and hit_stage


def save_student(student, out: Path, tokenizer, base_model: str, keep_fp32: bool = False,
                 embed_bits: int | None = None, embed_group_size: int = 64) -> list[Path]:
    """Save the trained student: a plain safetensors state dict (the exact training state, with checksums), plus
    the packed format (unquantized tensors in 16 bits unless keep_fp32; embedding and head group-quantized to
    embed_bits, which converts `student` in place), whose size per component is printed."""
    from ..atomic_io import atomic_save_safetensors, atomic_write_json
    from ..integrity import checksum_metadata
    from ..serialization import save_quantized, size_report
    from ..storage import format_size_report
    from ..train.checkpoint import dedup_state_dict

    cfg = getattr(student, "rabit_config", None)
    unique, aliases = dedup_state_dict(student.state_dict())
    meta = {"format": "rabit-state-dict", "base_model": base_model, "aliases": json.dumps(aliases),
            "rabit_config": cfg.to_json() if cfg is not None else "{}"}
    atomic_save_safetensors(unique, out / "model.safetensors", metadata={**meta, **checksum_metadata(unique)})
    if cfg is not None:
        atomic_write_json(out / "rabit_config.json", cfg.to_dict())
    if embed_bits:
        from ..embedquant import quantize_embeddings_

        quantize_embeddings_(student, embed_bits, embed_group_size)
    save_quantized(student, out / "quantized", tokenizer, dtype=torch.float32 if keep_fp32 else None)
    _say(format_size_report(size_report(out / "quantized")))
    return [out / "model.safetensors", out / "quantized"]


def load_teacher(spec: JobSpec, device: str, say=None):
    """(teacher, tokenizer): the full-precision model, rotated (rabit.rotation) when the job asks for it. Every
    process and stage that rebuilds the student from the source model must come through here, so that it gets the
    same weights."""
    from ..models import load_model

    teacher, tok = load_model(spec.model, device=device)
    from ..rotation import rotate_, unsupported_reason

    reason = unsupported_reason(teacher)
    if spec.rotate is None:     # the default: wherever the architecture allows it
        spec.rotate = reason is None
        spec.resolve_batch()    # the scales' default learning rate follows the rotation
        if reason is not None and say is not None:
            say(f"no rotation of the residual stream: {reason}")
    if spec.rotate:
        if say is not None:
            say(f"rotating the residual stream{' and the attention values' if spec.rotate_values else ''} "
                f"(seed {spec.train.seed}) ...")
        rotate_(teacher, seed=spec.train.seed, values=spec.rotate_values)
    return teacher, tok


def sample_teacher_sources(spec: JobSpec, teacher, tokenizer, device, progress: bool, say=_say) -> None:
    """Resolve every `teacher[:TOKENS]` training source to its sampled text (rabit.teacher_text), from the cache or
    sampled now from `teacher` (as the job will use it: rotated where it is)."""
    from ..teacher_text import teacher_corpus
    from ..train.trainer import native_bf16

    wanted = spec.data.teacher_sources()
    if not wanted:
        return
    t0 = time.time()
    autocast = native_bf16(torch.device(device)) if spec.train.autocast is None else spec.train.autocast
    fingerprint = _model_fingerprint(teacher)
    for source, tokens in wanted.items():
        path = teacher_corpus(teacher, tokenizer, tokens, fingerprint, seed=spec.train.seed, autocast=autocast,
                              progress=progress, say=say)
        spec.data.sampled[source] = str(path)
    say(f"teacher text ready in {time.time() - t0:.0f} s")


def check_save_options(spec: JobSpec, teacher) -> None:
    """Refuse a save option that cannot apply to this model before training, not after."""
    if spec.run.embed_bits:
        from ..embedquant import check_group_size

        check_group_size(teacher.get_input_embeddings().embedding_dim, spec.run.embed_group_size)


def bos_choices(spec: JobSpec, tokenizer):
    """(BOS of training and calibration sequences, BOS of perplexity windows), each a rabit.bos.BosChoice: the
    tokenizer's rule unless --bos / --no-bos; --eval-bos forces BOS in evaluation only."""
    from ..bos import resolve_bos

    train = resolve_bos(tokenizer, spec.data.bos)
    return train, (resolve_bos(tokenizer, True) if spec.eval.bos else train)


def _initialized_student(teacher, rcfg: RaBiTConfig, calib, autocast: bool, progress: bool, use_cache: bool):
    """The calibrated and initialized student, with its paths reused from (or saved to) the init cache.

    Returns (student, whether the paths came from the cache)."""
    from .. import init_cache
    from ..quantize import find_linear_layers, rabit_layers
    from ..train.trainer import make_student

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


def _calibrate_and_initialize(teacher, rcfg: RaBiTConfig, calib, autocast: bool, progress: bool, on_init=None):
    from ..train.trainer import make_student

    n_calib = "no calibration" if calib is None else f"{calib.shape[0]} x {calib.shape[1]} calibration tokens"
    _say(f"calibrating ({n_calib}) and initializing ({rcfg.init}) ...")
    return make_student(teacher, rcfg, calibration=calib, progress=progress, calib_autocast=autocast,
                        on_init=on_init)


# --job-minutes: training gets at least a tenth of the budget, at most a minute of it, even past the budget
JOB_MIN_TRAIN_SHARE = 0.10
JOB_MIN_TRAIN_SECONDS = 60.0
# saving both formats and the plots: 3 s for the default model on an AMX Xeon (docs/RESULTS.md section 42), 1-2 s on
# Zen 5 (sections 47, 48); twice the slowest, the rest of the old 15 s goes to training
JOB_SAVE_SECONDS = 6.0
# the evaluations after training ran at 1.05-1.7x the seconds per window the block stage's evaluation took (the
# machine's slow stretches; docs/RESULTS.md section 42): the reserve takes a quarter more, so that the job ends on time
JOB_EVAL_MARGIN = 1.25
JOB_UNKNOWN_RESERVE = 0.10       # the share of the budget set aside when no evaluation has been timed
# the share of the budget the block stage leaves to training: its rows shrink when the stage would take more
JOB_BLOCK_TRAIN_SHARE = 0.30


def job_training_seconds(spec: JobSpec, evals: dict, elapsed: float, window_seconds: float | None,
                         final_windows: int, ood_fp_windows: int | None = None) -> float:
    """--job-minutes: the training time that leaves room for what follows training, decided once per run (stored
    in evals, so that a resumed run keeps its first session's schedule).

    What follows is estimated from the latest perplexity evaluation's seconds per window: the final model's
    windows, the out-of-domain windows of the 2-bit model and ood_fp_windows of the full-precision one (0 when its
    figure is cached; None: as many as the 2-bit model's, the cautious guess) and the held-out loss (teacher and
    student on --val-sequences rows), plus saving.
    """
    if "job_train_seconds" in evals:
        return float(evals["job_train_seconds"])
    budget = 60.0 * spec.job_minutes
    reserve = job_reserve_seconds(spec, window_seconds, final_windows, ood_fp_windows)
    seconds = max(budget - elapsed - reserve, job_min_train_seconds(budget))
    evals["job_train_seconds"] = seconds
    evals["job_reserve_seconds"] = reserve
    return seconds


def job_reserve_seconds(spec: JobSpec, window_seconds: float | None, final_windows: int,
                        ood_fp_windows: int | None = None) -> float:
    """The seconds --job-minutes keeps for what follows training (job_training_seconds)."""
    ev, d = spec.eval, spec.data
    if not window_seconds:
        return JOB_UNKNOWN_RESERVE * 60.0 * spec.job_minutes
    val_windows = 2 * d.val_sequences * d.seq_len / max(ev.seq_len, 1)
    fp_windows = ev.ood_windows if ood_fp_windows is None else ood_fp_windows
    windows = final_windows + ev.ood_windows + fp_windows + val_windows
    return JOB_EVAL_MARGIN * window_seconds * windows + JOB_SAVE_SECONDS


def job_block_seconds(spec: JobSpec, elapsed: float, scorer: "JobPerplexity",
                      ood_fp_windows: int | None = None) -> float:
    """--job-minutes: the block stage's time budget (BlockReconstruction's time_budget; its rows shrink to fit):
    what the job leaves after its evaluations (the block stage's own and the final ones) and JOB_BLOCK_TRAIN_SHARE
    of the budget kept for training."""
    budget = 60.0 * spec.job_minutes
    windows = 0 if spec.eval.skip_init else (scorer.stage_windows or scorer.final_windows())
    stage_eval = (scorer.window_seconds or 0.0) * windows
    reserve = job_reserve_seconds(spec, scorer.window_seconds, scorer.final_windows(), ood_fp_windows)
    train = max(JOB_BLOCK_TRAIN_SHARE * budget, job_min_train_seconds(budget))
    return max(budget - elapsed - reserve - stage_eval - train, 0.0)


def job_min_train_seconds(budget_s: float) -> float:
    return min(JOB_MIN_TRAIN_SECONDS, JOB_MIN_TRAIN_SHARE * budget_s)


def say_job_budget(spec: JobSpec, evals: dict, elapsed: float, say=_say) -> None:
    seconds = evals["job_train_seconds"]
    budget = 60.0 * spec.job_minutes
    late = elapsed + evals.get("job_reserve_seconds", 0.0) + job_min_train_seconds(budget) > budget
    say(f"job budget: {elapsed / 60:.1f} of {spec.job_minutes:g} minutes used before training; training gets "
        f"{seconds / 60:.1f} minutes, ~{evals.get('job_reserve_seconds', 0.0) / 60:.1f} kept for the final "
        "evaluation" + (" (the budget is spent: training its minimum, the job will end late)" if late else ""))


def finish_run(spec: JobSpec, out: Path, student, tokenizer, evals: dict, eval_desc: str, final: float, result,
               val_after: dict | None, autocast: bool, wall0: float, world_size: int = 1,
               extra: dict | None = None) -> int:
    """The end of a run (one process or several): save the student, plot the losses, write and print the
    summary. `extra` adds keys to summary.json (the distributed path adds memory figures)."""
    from ..train.checkpoint import atomic_write_json
    from ..train.report import plot_losses, summary_markdown
    from ..train.trainer import StepLog

    t = time.time()
    written = save_student(student, out, tokenizer, spec.model, keep_fp32=spec.run.keep_fp32,
                           embed_bits=spec.run.embed_bits, embed_group_size=spec.run.embed_group_size)
    rows = StepLog.read(out / "log.jsonl")
    procs = f" ({world_size} processes)" if world_size > 1 else ""
    rc = spec.rabit
    plot_losses(rows, out / "loss.png", gamma=spec.train.gamma,
                title=f"RaBiT {rc.mode} k={rc.num_paths}: {spec.model}{procs}")
    end = evals.setdefault("end_seconds", {})
    end["save"] = time.time() - t
    train_seconds = sum(r.get("seconds", 0.0) for r in rows)
    summary = {
        "model": spec.model, "mode": rc.mode, "num_paths": rc.num_paths, "out": str(out),
        **({"world_size": world_size} if world_size > 1 else {}),
        **({"rotation": {"seed": spec.train.seed, "values": spec.rotate_values}} if spec.rotate else {}),
        "eval": {"description": eval_desc, "fp": evals.get("fp"), "init": evals.get("init"),
                 "blocks": evals.get("blocks"), "e2e": evals.get("e2e"), "final": final, "ood": evals.get("ood"),
                 # the intermediate stages' windows, with the FP and final models on them (None: all windows)
                 "stage_windows": evals.get("stage_windows"), "fp_stage": evals.get("fp_stage"),
                 "final_stage": evals.get("final_stage")},
        "stages": {"init_seconds": evals.get("init_seconds"), "blocks_seconds": evals.get("blocks_seconds"),
                   "e2e_seconds": train_seconds,
                   "scale_seconds": (evals.get("scale_phase") or {}).get("seconds"),
                   "scale_tokens": (evals.get("scale_phase") or {}).get("tokens"),
                   # after training: each part's seconds, and what --job-minutes kept for them
                   "end_seconds": end, "job_reserve_seconds": evals.get("job_reserve_seconds")},
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
    if "job_reserve_seconds" in evals:
        _say(f"job budget: {sum(end.values()):.0f} s after training ({evals['job_reserve_seconds']:.0f} s kept: "
             + ", ".join(f"{k.replace('_', '-')} {v:.0f} s" for k, v in end.items()) + ")")
    md = summary_markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)
    print(f"saved {', '.join(str(p) for p in written)}; loss curves in {out / 'loss.png'}")
    return 0

# --------------------------------------------------------------------------------------------- run
def run(args) -> int:
    import os

    # before the first tensor: PyTorch's CPU allocator then puts large tensors (the (tokens, vocab) logits of the
    # distillation loss, activations) on transparent huge pages; a training step of the default model was 2-5 %
    # faster on a Zen 3 machine (docs/RESULTS.md section 34). Read once, at the first allocation; spawned ranks
    # inherit it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    spec = job_from_args(args)
    spec.validate()
    from .quantize_distributed import maybe_distributed

    with remembered_fingerprints():
        status = maybe_distributed(spec)  # --nproc N, or started by torchrun: the multi-process path
        if status is not None:
            return status
        return run_job(spec)


def run_job(spec: JobSpec) -> int:
    """The whole quantize job in this process (spec validated)."""
    from .. import run_folder
    from ..data import calibration_batch, eval_tokens, training_sequences
    from ..models import resolve_model_path
    from ..train.checkpoint import CheckpointError, atomic_write_json, latest_checkpoint, read_json, verify_checkpoint
    from ..train.loop import BUDGET_PROBE_STEPS
    from ..train.trainer import Trainer, make_student, native_bf16

    wall0 = time.time()
    rc, d, ev, rs = spec.rabit, spec.data, spec.eval, spec.run
    out = spec.out_dir
    state, old_run = run_folder.check_folder(out, rs.resume, rs.overwrite)  # reads only
    progress = rs.progress
    if rs.threads is not None:
        torch.set_num_threads(rs.threads)
    device = torch.device(rs.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")

    # ---- model, data, budget: every failure here leaves the run folder untouched
    _say(f"loading {spec.model} ...")
    teacher, tok = load_teacher(spec, str(device), _say)
    check_save_options(spec, teacher)
    train_bos, eval_bos = bos_choices(spec, tok)
    sample_teacher_sources(spec, teacher, tok, str(device), progress)
    sources = d.sources
    train, val = training_sequences(tok, sources, d.seq_len, val_fraction=d.val_fraction, seed=spec.train.seed,
                                    mix=d.mix,
                                    add_bos=train_bos.use)
    autocast = native_bf16(device) if spec.train.autocast is None else spec.train.autocast
    tcfg = spec.train_config(autocast)
    steps = tcfg.steps
    run_info = spec.run_record(str(resolve_model_path(spec.model)), int(train.shape[0]), autocast, train_bos.use,
                               eval_bos.use)
    run_folder.check_same_run(out, old_run, run_info, rs.resume, rs.overwrite)
    ck_path = latest_checkpoint(out) if rs.resume else None  # raises CheckpointError when damaged
    if ck_path is not None:
        verify_checkpoint(ck_path, checksums=rs.verify)  # report a corrupt checkpoint before any other work
    eval_stream = eval_tokens(tok, ev.data)
    if eval_stream.numel() < ev.seq_len:
        raise ValueError(f"--eval-data {ev.data} has {eval_stream.numel()} tokens, fewer than one "
                         f"window of {ev.seq_len}")

    # ---- all checks passed: prepare the folder
    run_folder.prepare(out, state, rs.overwrite, run_info)
    _say(f"run folder: {out}")
    if spec.job_minutes:
        budget = (f"what the job's {spec.job_minutes:g} minutes leave after the block stage, in steps chosen after "
                  f"timing the first {BUDGET_PROBE_STEPS},")
    elif spec.train_minutes:
        budget = f"{spec.train_minutes:g} minutes of steps (chosen after timing the first {BUDGET_PROBE_STEPS})"
    else:
        budget = f"{steps} steps"
    _say(f"training: {budget} x {spec.tokens_per_step} tokens"
         + ("" if spec.time_budgeted else f" = {steps * spec.tokens_per_step:,} tokens") + " from "
         f"{', '.join(d.declared_sources)} ({train.shape[0]} sequences of {d.seq_len}), bf16 autocast "
         f"{'on' if autocast else 'off'}, mode {rc.mode}, k={rc.num_paths}, "
         f"{'latents and scales' if tcfg.train_latents else 'scales and norms (latents frozen)'} train, "
         f"{train_bos.describe()}")

    bos = eval_bos.token_id
    evals_path = out / "evals.json"
    evals = {}
    if rs.resume and evals_path.exists():
        try:
            evals = read_json(evals_path, "evaluation record")
        except CheckpointError as e:
            _say(f"({e}; measuring again)")
            evals = {}
    eval_autocast = record_eval_autocast(evals, ev.autocast(autocast))
    eval_desc = eval_description(spec, eval_bos.use, eval_autocast)
    scorer = JobPerplexity(spec, eval_stream, bos, eval_desc, progress, autocast=eval_autocast)
    scorer.record_windows(evals)
    if "fp" not in evals:
        t0 = time.time()
        evals["fp"], evals["fp_stage"], hit = scorer.fp(teacher, tok)
        evals["fp_seconds"] = time.time() - t0
        _say(f"full precision: perplexity {evals['fp']:.3f}" + (" (cached)" if hit else ""))
        atomic_write_json(evals_path, evals)

    # ---- student: from the checkpoint, or calibrated and initialized
    if ck_path is not None:
        _say(f"resuming from {ck_path}")
        student = make_student(teacher, rc, initialize=False)
    else:
        calib = None
        if rc.precondition:
            calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, seed=spec.train.seed,
                                      add_bos=train_bos.use)
        t0 = time.time()
        student, cached = _initialized_student(teacher, rc, calib, autocast, progress, rs.init_cache)
        evals["init_seconds"] = time.time() - t0
        evals["init_cached"] = cached
        _say(f"initialized in {evals['init_seconds']:.0f} s" + (" (paths from the init cache)" if cached else ""))
        if not ev.skip_init and "init" not in evals:
            evals["init"] = scorer.stage(student, f"{rc.num_paths}-bit initialized")
            _say(f"{rc.num_paths}-bit after initialization: perplexity {evals['init']:.3f}")
        atomic_write_json(evals_path, evals)
    student.to(device)
    # the job's budget sets aside the FP out-of-domain windows the end of the job will run (none once cached)
    ood_fp = ood_fp_windows_to_run(spec, teacher, tok, bos, eval_autocast) if spec.job_minutes else None
    if spec.block_stage and ck_path is None:
        block_budget = job_block_seconds(spec, time.time() - wall0, scorer, ood_fp) if spec.job_minutes else None
        _block_stage(spec, teacher, student, tok, out, evals, scorer.stage, progress, train_bos.use, block_budget,
                     avoid=held_out_rows(spec, val))

    if spec.job_minutes:
        elapsed = time.time() - wall0
        budget_s = job_training_seconds(spec, evals, elapsed, scorer.window_seconds, scorer.final_windows(), ood_fp)
        atomic_write_json(evals_path, evals)
        say_job_budget(spec, evals, elapsed)
        tcfg = spec.train_config(autocast, budget_s=budget_s)
    trainer = Trainer(teacher, student, train, tcfg, out, progress=progress)
    if ck_path is not None:
        trainer.resume(verify=False)  # verified above
        _say(f"resumed at step {trainer.step} of "
             + ("a time budget still timing its first steps" if trainer.budget_pending() else f"{trainer.cfg.steps}"))
    val_rows = held_out_rows(spec, val)
    if val_rows is not None and "val_before" not in evals:
        evals["val_before"] = trainer.evaluate(val_rows)
        atomic_write_json(evals_path, evals)
    result = trainer.train()
    last = trainer  # the trainer of the last phase measures the held-out loss after training
    if spec.scale_steps > 0:
        if "e2e" not in evals:
            evals["e2e"] = scorer.stage(student, f"{rc.num_paths}-bit distilled (before the scale-only phase)")
            atomic_write_json(evals_path, evals)
        scales = Trainer(teacher, student, train, spec.scale_train_config(autocast), out / "scales",
                         progress=progress)
        if rs.resume:
            scales.resume(verify=rs.verify)
        _say(f"scale-only phase: {scales.cfg.steps} steps, latents frozen")
        evals["scale_phase"] = dataclasses.asdict(scales.train())
        atomic_write_json(evals_path, evals)
        trainer.teacher_run, last = None, scales
    # the seconds of each part of what follows training: the job's budget keeps a reserve for them
    end, t = {}, time.time()
    val_after = last.evaluate(val_rows) if val_rows is not None else None
    last.teacher_run = None  # free the bf16 teacher copy before evaluation
    end["held_out"], t = time.time() - t, time.time()

    final, evals["final_stage"] = scorer.full(student, f"{rc.num_paths}-bit distilled")
    _say(f"{rc.num_paths}-bit after distillation: perplexity {final:.3f}")
    end["final"], t = time.time() - t, time.time()
    _out_of_domain(spec, teacher, student, tok, evals, progress, bos, eval_autocast)
    end["ood"] = time.time() - t
    evals["end_seconds"] = end
    atomic_write_json(evals_path, evals)
    return finish_run(spec, out, student, tok, evals, eval_desc, final, result, val_after, autocast, wall0,
                      extra={"bos": {"train": train_bos.to_dict(), "eval": eval_bos.to_dict()}})


def held_out_rows(spec: JobSpec, val: torch.Tensor | None) -> torch.Tensor | None:
    """The validation rows the job measures its held-out loss on (--val-sequences of them), or None."""
    d = spec.data
    return val[: d.val_sequences] if val is not None and d.val_sequences and val.shape[0] else None


def _block_stage(spec: JobSpec, teacher, student, tok, out: Path, evals: dict, ppl, progress: bool,
                 add_bos: bool = False, time_budget: float | None = None, avoid: torch.Tensor | None = None) -> None:
    """Block-wise refinement / reconstruction of the initialized student, in place (resumes from <out>/blocks).
    time_budget: its seconds (--job-minutes: job_block_seconds), its rows cut to fit; None: no limit. avoid: the
    held-out rows, which its calibration windows do not overlap (the refinement fits its rows closely)."""
    from ..data import calibration_batch
    from ..train.blockwise import MIN_BUDGET_ROWS, BlockReconstruction, refine_rows
    from ..train.checkpoint import atomic_write_json

    b = spec.blocks
    # drawn from the training mix (apart from the held-out rows), with another seed than the initialization's
    rows = calibration_batch(tok, spec.data.sources, b.samples, b.seq_len, seed=spec.train.seed + 1, add_bos=add_bos,
                             mix=spec.data.mix, avoid=avoid)
    descent = f" + {b.descent_passes} sign-descent pass(es)" if b.descent_passes else ""
    what = (f"refinement ({b.refine_rounds} round(s){descent})" if b.refine_rounds else "") + \
        (f"{' + ' if b.refine_rounds else ''}training ({b.epochs} epoch(s))" if b.epochs else "")
    # the refinement's rows are drawn from the stage's samples: say so when it uses fewer than all of them
    refined, subset = refine_rows(b), ""
    if b.refine_rounds and refined < b.samples:
        subset = f" (the refinement on {refined} of them)"
    elif b.refine_rounds and refined < b.refine_samples:
        subset = f" (--refine-samples {b.refine_samples} capped by --block-samples)"
    stage = BlockReconstruction(teacher, student, rows, b, run_dir=out, progress=progress, time_budget=time_budget)
    limit = ""
    if stage.time_budget is not None:   # the stage takes no budget when its blocks train
        limit = (f"; {time_budget:.0f} s of the job's budget, fewer rows for the later blocks if it needs more "
                 f"(at least {min(MIN_BUDGET_ROWS, b.samples)})")
    _say(f"block-wise stage: {what or 'nothing to do'} on {b.samples} x {b.seq_len} tokens{subset}{limit} ...")
    records = stage.run()
    evals["blocks_seconds"] = sum(r.seconds for r in records)
    evals["blocks_rows"] = [r.rows for r in records]
    if any(r.rows is not None and r.rows < b.samples for r in records):
        _say(f"block-wise stage: rows cut to fit the time budget: {rows_summary([r.rows for r in records])}")
    undone = [r.block + 1 for r in records if r.reverted]
    evals["blocks_reverted"] = undone
    if undone:
        _say(f"block-wise stage: refinement undone at block(s) {', '.join(map(str, undone))}: it raised the "
             "block's loss on the guard rows (--refine-guard-rows)")
    evals["blocks_loss"] = {"before": [r.loss_before for r in records], "after": [r.loss_after for r in records],
                            "after_median": [r.loss_after_median for r in records]}
    before = sum(evals['blocks_loss']['before']) / len(records)
    after = sum(evals['blocks_loss']['after']) / len(records)
    losses = f"{before:.4f} -> {after:.4f} by training" if b.epochs else f"{after:.4f}"
    medians = [m for m in evals["blocks_loss"]["after_median"] if m is not None]
    # a few misplaced massive activations can dominate the mean over tokens; the median shows the typical token
    typical = f", median over tokens {statistics.mean(medians):.4f}" if medians else ""
    _say(f"block-wise stage done in {evals['blocks_seconds']:.0f} s ({b.loss} block loss, mean over blocks of the "
         f"mean over tokens: {losses}{typical})")
    if not spec.eval.skip_init and "blocks" not in evals:
        evals["blocks"] = ppl(student, f"{spec.rabit.num_paths}-bit after the block stage")
        _say(f"{spec.rabit.num_paths}-bit after the block stage: perplexity {evals['blocks']:.3f}")
    atomic_write_json(out / "evals.json", evals)


def rows_summary(rows: list[int | None]) -> str:
    """Per-block rows as runs: [128, 128, 96, 96, 96] -> "blocks 1-2: 128 rows, 3-5: 96"."""
    runs: list[list] = []
    for i, r in enumerate(rows, 1):
        if runs and runs[-1][2] == r:
            runs[-1][1] = i
        else:
            runs.append([i, i, r])
    parts = [(f"{first}-{last}" if first != last else f"{first}") + f": {r}" for first, last, r in runs]
    parts[0] += " rows"
    return "blocks " + ", ".join(parts)


def _ood_plan(spec: JobSpec, teacher, tok, bos: int | None = None, autocast: bool = False) -> dict | None:
    """What the out-of-domain score measures (corpus stream, windows, description, FP cache key), or None when
    --ood-windows 0 or no --ood-data."""
    from ..data import builtin_files, eval_tokens, tokenizer_fingerprint

    ev = spec.eval
    if not ev.ood_data or not ev.ood_windows:
        return None
    stream = eval_tokens(tok, ev.ood_data)
    windows = min(ev.ood_windows, max(stream.numel() // ev.seq_len, 1))
    seq = min(ev.seq_len, stream.numel())
    files = set(builtin_files(ev.ood_data))
    trained = ev.ood_data in spec.data.sources or bool(files & {f for s in spec.data.sources for f in builtin_files(s)})
    desc = f"{ev.ood_data}, the first {windows} windows of {seq} tokens" + (
        " (NOTE: part of the training data)" if trained else " (a domain not trained on)")
    key = {"model": _model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tok), "corpus": ev.ood_data,
           "seq_len": seq, "windows": windows, "bos": bos, "dtype": eval_dtype_key(autocast)}
    return {"stream": stream, "windows": windows, "seq": seq, "trained": trained, "description": desc, "key": key}


def ood_fp_windows_to_run(spec: JobSpec, teacher, tok, bos: int | None = None, autocast: bool = False) -> int:
    """Full-precision out-of-domain windows the end of the job will evaluate (0 when the figure is cached)."""
    plan = _ood_plan(spec, teacher, tok, bos, autocast)
    return 0 if plan is None or _fp_ppl_lookup(plan["key"]) is not None else plan["windows"]


def _out_of_domain(spec: JobSpec, teacher, student, tok, evals: dict, progress: bool, bos: int | None = None,
                   autocast: bool = False) -> None:
    """FP and 2-bit perplexity on spec.eval.ood_data (a domain the run did not train on, by default), under bf16
    autocast if `autocast`."""
    from ..eval.perplexity import perplexity

    ev = spec.eval
    plan = _ood_plan(spec, teacher, tok, bos, autocast)
    if plan is None:
        return
    dtype = eval_autocast_dtype(autocast)
    stream, windows, seq = plan["stream"], plan["windows"], plan["seq"]
    _say(f"perplexity on {plan['description']} ...")
    fp, _ = _fp_ppl_cached(teacher, plan["key"],
                           lambda: perplexity(teacher, stream, seq, bos, windows, progress=progress,
                                              autocast_dtype=dtype))
    q = perplexity(student, stream, seq, bos, windows, progress=progress, autocast_dtype=dtype)
    evals["ood"] = {"description": plan["description"], "fp": fp, "final": q, "trained_on": plan["trained"]}
    _say(f"{ev.ood_data}: full precision {fp:.3f}, {spec.rabit.num_paths}-bit {q:.3f}")
