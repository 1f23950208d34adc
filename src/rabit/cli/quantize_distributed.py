"""`rabit quantize` in several processes: the launcher side (--nproc N) and the job every worker runs.

The launching process validates the JobSpec for the process count (JobSpec.for_processes splits the rows of a
step across processes when the batch was left at its default) and checks the run folder, so that a bad
combination ends with one line and exit status 2 before any worker starts. Workers are started by
rabit.train.launch (or by torchrun: `torchrun --nproc_per_node N -m rabit quantize ...`).

In the workers, rank 0 checks everything again, loads the teacher, tokenizes the data, measures the FP perplexity
and calibrates and initializes the student (as the single-process command does); the other ranks build the
architecture on the meta device. Both models are then sharded and filled from rank 0, the student is distilled on
all ranks (DistributedTrainer), and rank 0 gathers the result, evaluates it and saves it like the single-process
command. Run folder: run.json, log.jsonl, dcp/ (checkpoints), memory.json, evals.json, summary, model.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch

from ..job import JobSpec
from ..train.checkpoint import CheckpointError
from ..train.loop import TrainingDiverged
from ..train.process_group import under_launcher

BAD_INPUT = (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged)


def maybe_distributed(spec: JobSpec) -> int | None:
    """None when the job is an ordinary single-process one; otherwise the exit status of the multi-process run.
    Under a launcher every process runs its share; `--nproc N` starts N workers (N = 1 gives a one-process group,
    which is also how a run whose newest checkpoint is a DCP one continues in one process)."""
    from .. import run_folder
    from ..train.resume_point import latest_any

    if under_launcher():
        return run_worker(spec)
    nproc = spec.dist.nproc
    if not nproc:
        if not (spec.run.resume and (spec.out_dir / "dcp").is_dir()):
            return None
        found = latest_any(spec.out_dir)
        if found is None or found[0] != "dcp":
            return None
        nproc = 1
    spec = spec.for_processes(nproc)  # raises for a batch that does not split
    if spec.scale_tokens:
        raise ValueError("--scale-tokens (the scale-only phase) runs in one process only for now; drop --nproc or "
                         "--scale-tokens")
    run_folder.check_folder(spec.out_dir, spec.run.resume, spec.run.overwrite)
    if spec.run.resume:
        latest_any(spec.out_dir)  # a damaged checkpoint is reported here, before the workers start
    from ..train.launch import launch_workers
    from .options import job_to_argv

    worker_spec = JobSpec(**{**spec.__dict__})
    worker_spec.dist = type(spec.dist)(**{**spec.dist.__dict__, "nproc": None})
    command = [sys.executable, "-m", "rabit", "quantize", *job_to_argv(worker_spec)]
    return launch_workers(command, nproc, threads=spec.run.threads)


def run_worker(spec: JobSpec) -> int:
    """This process' share of the job, with the CLI's error convention: bad input -> one line `rabit quantize:
    error: ...` and exit status 2, internal errors with their traceback; each reported once (an error rank 0
    found and shared is reported by rank 0 only)."""
    from ..train.launch import report_worker_error

    try:
        return run_quantize(spec)
    except Exception as e:  # noqa: BLE001 - reported below
        if getattr(e, "mirrored", False):
            return 2
        bad = isinstance(e, BAD_INPUT) and not os.environ.get("RABIT_DEBUG")
        line = f"rabit quantize: error: {e}" if bad else None
        if not report_worker_error(e, line, 2 if bad else 1):
            if not bad:
                raise
            print(line, file=sys.stderr, flush=True)
        return 2 if bad else 1


def _say0(env, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


def run_quantize(spec: JobSpec) -> int:
    """The quantize job in a torch.distributed process group (every rank calls this)."""
    from ..train.process_group import _barrier, destroy_distributed, init_distributed

    env = init_distributed(spec.run.device, timeout_minutes=spec.dist.timeout_minutes)
    try:
        return _run_quantize(spec.for_processes(env.world_size), env)
    except BaseException as e:
        if getattr(e, "in_sync", False):
            try:  # all ranks stopped at the same point: leave together (no rank aborts on a closed peer)
                _barrier()
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        destroy_distributed()


def _run_quantize(spec: JobSpec, env) -> int:
    from .. import run_folder
    from ..data import calibration_batch, eval_tokens, training_sequences
    from ..models import resolve_model_path
    from ..train.checkpoint import atomic_write_json, read_json
    from ..train.distributed import DistConfig, DistributedTrainer
    from ..train.fsdp import meta_model
    from ..train.memory import memory_markdown
    from ..train.process_group import broadcast_object, rank0_decides
    from ..train.resume_point import latest_any
    from ..train.trainer import make_student, native_bf16
    from . import quantize as single

    wall0 = time.time()
    rc, d, ev, rs = spec.rabit, spec.data, spec.eval, spec.run
    progress = rs.progress and env.is_main
    if rs.threads is not None:
        torch.set_num_threads(rs.threads)
    dcfg = DistConfig(teacher=spec.dist.teacher, muon=spec.dist.muon)
    out = spec.out_dir
    local: dict = {}  # rank 0's big objects (never broadcast)

    # ---- stage 1 (rank 0): every check, the teacher, the data, the run folder
    def stage1():
        spec.validate()
        dcfg.validate()
        state, old_run = run_folder.check_folder(out, rs.resume, rs.overwrite)
        _say0(env, f"loading {spec.model} ...")
        teacher, tok = single.load_teacher(spec, str(env.device), lambda m: _say0(env, m))
        single.check_save_options(spec, teacher)
        train_bos, eval_bos = single.bos_choices(spec, tok)
        single.sample_teacher_sources(spec, teacher, tok, str(env.device), progress, lambda m: _say0(env, m))
        train, val = training_sequences(tok, d.sources, d.seq_len, val_fraction=d.val_fraction, seed=spec.train.seed,
                                        mix=d.mix,
                                        add_bos=train_bos.use)
        autocast = native_bf16(env.device) if spec.train.autocast is None else spec.train.autocast
        tcfg = spec.train_config(autocast)
        run_info = spec.run_record(str(resolve_model_path(spec.model)), int(train.shape[0]), autocast, train_bos.use,
                                   eval_bos.use)
        run_folder.check_same_run(out, old_run, run_info, rs.resume, rs.overwrite)
        ck = latest_any(out) if rs.resume else None
        eval_stream = eval_tokens(tok, ev.data)
        if eval_stream.numel() < ev.seq_len:
            raise ValueError(f"--eval-data {ev.data} has {eval_stream.numel()} tokens, fewer than one window")
        run_folder.prepare(out, state, rs.overwrite, run_info)
        local.update(teacher=teacher, tok=tok, train=train, val=val, eval_stream=eval_stream)
        _say0(env, f"run folder: {out}")
        length = (f"what the job's {spec.job_minutes:g} minutes leave after the block stage" if spec.job_minutes
                  else f"{spec.train_minutes:g} minutes of steps" if spec.train_minutes else
                  f"{tcfg.steps} steps = {tcfg.steps * spec.tokens_per_step:,} tokens")
        _say0(env, f"training on {env.world_size} process(es) ({env.backend}): {length}, "
                   f"{spec.tokens_per_step} tokens each "
                   f"({spec.split_description(env.world_size)}), bf16 autocast {'on' if autocast else 'off'}, "
                   f"mode {rc.mode}, k={rc.num_paths}, "
                   f"{'latents and scales' if tcfg.train_latents else 'scales and norms (latents frozen)'} train, "
                   f"teacher {dcfg.teacher}, Muon {dcfg.muon}")
        return {"tcfg": tcfg, "ck": str(ck[1]) if ck else None, "hf_config": teacher.config,
                "dtype": next(teacher.parameters()).dtype, "autocast": autocast,
                "bos": {"train": train_bos.to_dict(), "eval": eval_bos.to_dict()}}

    info = rank0_decides(stage1, env)
    tcfg, ck = info["tcfg"], info["ck"]

    def eval_desc():  # rank 0, once stage 2 has read evals.json
        return single.eval_description(spec, info["bos"]["eval"]["use"], local["eval_autocast"])

    def scorer():  # rank 0 only: it holds the evaluation stream
        return single.JobPerplexity(spec, local["eval_stream"], info["bos"]["eval"]["token_id"], eval_desc(),
                                    progress, say=lambda msg: _say0(env, msg), autocast=local["eval_autocast"])

    # ---- stage 2 (rank 0): FP perplexity, calibration + initialization (others: the meta architecture)
    def stage2():
        teacher, tok = local["teacher"], local["tok"]
        evals_path = out / "evals.json"
        evals = {}
        if rs.resume and evals_path.exists():
            try:
                evals = read_json(evals_path, "evaluation record")
            except CheckpointError:
                evals = {}
        local["eval_autocast"] = single.record_eval_autocast(evals, ev.autocast(info["autocast"]))
        score = scorer()
        score.record_windows(evals)
        if "fp" not in evals:
            evals["fp"], evals["fp_stage"], hit = score.fp(teacher, tok)
            _say0(env, f"full precision: perplexity {evals['fp']:.3f}" + (" (cached)" if hit else ""))
        if ck is not None:
            student = make_student(teacher, rc, initialize=False)  # filled from the checkpoint
        else:
            calib = None
            if rc.precondition:
                calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, seed=spec.train.seed,
                                          add_bos=info["bos"]["train"]["use"])
            t0 = time.time()
            _say0(env, f"initializing ({rc.init}) on rank 0 ...")
            student, evals["init_cached"] = single._initialized_student(teacher, rc, calib, info["autocast"],
                                                                        progress, rs.init_cache)
            evals["init_seconds"] = time.time() - t0
            if not ev.skip_init and "init" not in evals:
                evals["init"] = score.stage(student, f"{rc.num_paths}-bit initialized")
                _say0(env, f"{rc.num_paths}-bit after initialization: perplexity {evals['init']:.3f}")
        # the job's budget sets aside the FP out-of-domain windows the end of the job will run (none once cached)
        ood_fp = (single.ood_fp_windows_to_run(spec, teacher, tok, info["bos"]["eval"]["token_id"],
                                               local["eval_autocast"]) if spec.job_minutes else None)
        if ck is None and spec.block_stage:  # on rank 0 only, before the student is sharded
            block_budget = (single.job_block_seconds(spec, time.time() - wall0, score, ood_fp)
                            if spec.job_minutes else None)
            single._block_stage(spec, teacher, student, tok, out, evals, score.stage, progress,
                                info["bos"]["train"]["use"], block_budget,
                                avoid=single.held_out_rows(spec, local["val"]))
        budget_s = None
        if spec.job_minutes:   # decided here, where the evaluations were timed; every rank trains to it
            elapsed = time.time() - wall0
            budget_s = single.job_training_seconds(spec, evals, elapsed, score.window_seconds, score.final_windows(),
                                                   ood_fp)
            single.say_job_budget(spec, evals, elapsed, say=lambda msg: _say0(env, msg))
        atomic_write_json(evals_path, evals)
        local.update(student=student, evals=evals)
        return {"budget_s": budget_s}

    decided = rank0_decides(stage2, env)
    if decided["budget_s"] is not None:
        tcfg = spec.train_config(info["autocast"], budget_s=decided["budget_s"])
    if env.is_main:
        teacher, student, train = local["teacher"], local["student"], local["train"]
    else:
        teacher = meta_model(info["hf_config"], info["dtype"])
        student = make_student(teacher, rc, initialize=False)
        train = None

    # ---- stage 3 (all ranks): sharded distillation
    trainer = DistributedTrainer(teacher, student, train, tcfg, out, env, dcfg, progress=progress, from_rank0=True)
    del teacher, student
    local.pop("teacher", None)
    local.pop("student", None)
    gc.collect()
    if ck is not None:
        trainer.resume(verify=spec.run.verify)
        _say0(env, f"resumed at step {trainer.step} of {trainer.cfg.steps} from {ck}")
    val_rows = broadcast_object(single.held_out_rows(spec, local["val"]) if env.is_main else None)
    evals = local.get("evals", {})
    if broadcast_object(val_rows is not None and "val_before" not in evals):
        vb = trainer.evaluate(val_rows)
        if env.is_main:
            evals["val_before"] = vb
            atomic_write_json(out / "evals.json", evals)
    result = trainer.train()
    t = time.time()
    val_after = trainer.evaluate(val_rows) if val_rows is not None else None
    end = {"held_out": time.time() - t}   # seconds after training, as in single.run_job
    mem = trainer.memory_report()
    if env.is_main:
        atomic_write_json(out / "memory.json", mem)
        _say0(env, memory_markdown([mem]))
    full = trainer.full_state_dict()
    trainer.teacher = trainer.student = None
    del trainer
    gc.collect()
    if not env.is_main:
        return 0

    # ---- stage 4 (rank 0): the plain student, perplexity, files
    base, tok = single.load_teacher(spec, "cpu")   # the same (rotated) weights the student was made from
    final_student = make_student(base, rc, initialize=False)
    missing, unexpected = final_student.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"gathered state dict does not fit the student: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    del full
    final_student.to(env.device).eval()
    end["gather"], t = time.time() - t, time.time()   # includes the memory report and rebuilding the student
    final, evals["final_stage"] = scorer().full(final_student, f"{rc.num_paths}-bit distilled")
    _say0(env, f"{rc.num_paths}-bit after distillation: perplexity {final:.3f}")
    end["final"], t = time.time() - t, time.time()
    # the reloaded model is the teacher again: the out-of-domain score, as a one-process run gives it
    single._out_of_domain(spec, base.to(env.device).eval(), final_student, tok, evals, progress,
                          info["bos"]["eval"]["token_id"], local["eval_autocast"])
    del base
    end["ood"] = time.time() - t
    evals["end_seconds"] = end
    atomic_write_json(out / "evals.json", evals)
    memory = {"peak_bytes_per_rank": [r["peak_bytes"] for r in mem["ranks"]],
              "optimizer_state_bytes_total": mem["optimizer_state_bytes_total"]}
    return single.finish_run(spec, out, final_student, tok, evals, eval_desc(), final, result, val_after,
                             info["autocast"], wall0, world_size=env.world_size,
                             extra={"memory": memory, "step_split": spec.split_description(env.world_size),
                                    "bos": info["bos"]})
