"""Memory of multi-process distillation: peak memory per rank and optimizer-state bytes, coupled vs independent.

RaBiT's coupled mode trains one latent matrix per layer where independent residual QAT trains k (= 2) of them,
so it should need half the latent parameters, gradients and Muon momentum. This runs a few distillation steps
of each mode at each process count (gloo on CPU, or nccl with --device cuda), with the student and teacher
sharded by FSDP2 as in `rabit quantize --nproc N`, and prints one Markdown row per rank.

    python benchmarks/memory_report.py                       # SmolLM2-135M-Instruct, 2 steps of 2 x 256 tokens
    python benchmarks/memory_report.py --nproc 1 2 4 --device cuda --model meta-llama/Llama-2-7b-hf

Peak memory is the CUDA allocator's peak on GPUs; on CPU it is the process' peak resident set size (VmHWM,
reset once the models are sharded, so it covers the training steps and the checkpoint write; it includes the
~0.4 GB of the Python/torch runtime). The initialization here is the cheap "naive" one without calibration:
memory does not depend on the initial values. Results go to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _worker(spec: dict) -> None:
    from rabit.config import RaBiTConfig
    from rabit.models import load_model
    from rabit.train import distributed as D
    from rabit.train.trainer import TrainConfig, make_student

    env = D.init_distributed(spec["device"])
    rcfg = RaBiTConfig(mode=spec["mode"], num_paths=spec["num_paths"], init="naive", precondition=False)
    if env.is_main:
        teacher, _ = load_model(spec["model"], device=str(env.device))
        student = make_student(teacher, rcfg)
        vocab = teacher.config.vocab_size
        g = torch.Generator().manual_seed(0)
        train = torch.randint(0, vocab, (16, spec["seq_len"]), generator=g)
        info = D.broadcast_object((teacher.config, next(teacher.parameters()).dtype))
    else:
        hf_config, dtype = D.broadcast_object(None)
        teacher = D.meta_model(hf_config, dtype)
        student = make_student(teacher, rcfg, initialize=False)
        train = None
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], grad_accum=1, save_every=10**6,
                      keep_last_good=False)
    dcfg = D.DistConfig(teacher=spec["teacher"], muon=spec["muon"])
    trainer = D.DistributedTrainer(teacher, student, train, cfg, spec["run_dir"], env, dcfg, progress=False,
                                   from_rank0=True)
    del teacher, student
    t0 = time.perf_counter()
    result = trainer.train()
    rep = trainer.memory_report()
    if env.is_main:
        rep.update(model=spec["model"], steps=result.steps, seq_len=spec["seq_len"], batch_size=spec["batch_size"],
                   seconds=time.perf_counter() - t0, step_seconds=(result.last or {}).get("seconds"),
                   optimizer_seconds=(result.last or {}).get("optimizer_seconds"),
                   num_paths=spec["num_paths"])
        Path(spec["result"]).write_text(json.dumps(rep))


def main(argv=None) -> int:
    from rabit.models import DEFAULT_MODEL
    from rabit.train import distributed as D

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--modes", nargs="+", default=["coupled", "independent"])
    ap.add_argument("--num-paths", type=int, default=2)
    ap.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2, help="global micro-batch (default: 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher", choices=D.TEACHER_MODES, default="shard")
    ap.add_argument("--muon", choices=D.MUON_MODES, default="owner")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / nproc)")
    ap.add_argument("--out", default="docs/data/memory_report.json")
    args = ap.parse_args(argv)

    import os

    reports = []
    tmp = Path(tempfile.mkdtemp(prefix="rabit-mem-"))
    try:
        for nproc in args.nproc:
            for mode in args.modes:
                spec = {"model": args.model, "mode": mode, "num_paths": args.num_paths, "steps": args.steps,
                        "seq_len": args.seq_len, "batch_size": args.batch_size, "device": args.device,
                        "teacher": args.teacher, "muon": args.muon, "run_dir": str(tmp / f"{mode}-{nproc}"),
                        "result": str(tmp / f"{mode}-{nproc}.json")}
                threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
                print(f"{mode}, {nproc} process(es) ...", file=sys.stderr, flush=True)
                D.spawn(_worker, nproc, spec, threads=threads)
                reports.append(json.loads(Path(spec["result"]).read_text()))
                shutil.rmtree(spec["run_dir"], ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/memory_report.py " + " ".join(argv or sys.argv[1:]),
                               "torch": torch.__version__, "reports": reports}, indent=2) + "\n")
    print(D.memory_markdown(reports))
    print(summary_markdown(reports))
    print(f"wrote {out}")
    return 0


def summary_markdown(reports: list[dict]) -> str:
    """Totals over ranks: optimizer state and latent parameters per mode and process count."""
    lines = ["| mode | procs | optimizer state, all ranks (MiB) | per rank (MiB) | latent params, all ranks (MiB) | "
             "max training peak per rank (MiB) | s/step | optimizer s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        per = [sum(x["optimizer_state_bytes"].values()) for x in r["ranks"]]
        peak = max((x.get("train_peak_bytes") or 0) for x in r["ranks"])
        lines.append(f"| {r['mode']} | {r['world_size']} | {r['optimizer_state_bytes_total'] / 2**20:,.1f} | "
                     f"{' / '.join(f'{b / 2**20:,.1f}' for b in per)} | {r['latent_param_bytes_total'] / 2**20:,.1f} | "
                     f"{peak / 2**20:,.0f} | {r.get('step_seconds') or 0:.1f} | {r.get('optimizer_seconds') or 0:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
