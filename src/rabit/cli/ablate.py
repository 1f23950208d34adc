"""`rabit ablate`: train {independent, frozen, coupled} x {svid, isvid, isvid+pre} at one fixed budget and
tabulate perplexity, PIQA, distillation loss, throughput, optimizer-state bytes and path correlations.

Each cell is a JobSpec (the --extra settings plus the cell's mode and initialization), run as an ordinary
`rabit quantize` (in its own sub-folder, resumable), followed by `rabit eval`
(PIQA) and `rabit diagnose` on the saved model, all as subprocesses so that one failing cell does not lose
the others. The table is rebuilt from the run folders each time, so an interrupted ablation resumes.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..job import JobSpec
from ..models import DEFAULT_MODEL

# The RaBiTConfig settings of each initialization of the table.
INIT_SETTINGS = {
    "svid": {"init": "svid", "precondition": False},
    "isvid": {"init": "isvid", "precondition": False},
    "isvid+pre": {"init": "isvid", "precondition": True},
}
MODES = ("independent", "frozen", "coupled")


def add_parser(sub):
    p = sub.add_parser("ablate", help="train every mode x init at one budget and write a comparison table")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default: {DEFAULT_MODEL})")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated training modes (default: {','.join(MODES)})")
    p.add_argument("--inits", default=",".join(INIT_SETTINGS),
                   help=f"comma-separated initializations (default: {','.join(INIT_SETTINGS)}; "
                        "isvid+pre = ISVID on the I/O-preconditioned weight)")
    p.add_argument("--tokens", type=int, default=20480, help="training tokens per cell (default: 20480)")
    p.add_argument("--eval-windows", type=int, default=8,
                   help="WikiText-2 test windows of 2048 tokens for perplexity (default: 8; 0: all 147). "
                        "Few windows are noisy: see docs/RESULTS.md section 2b")
    p.add_argument("--piqa-limit", type=int, default=200, help="PIQA items (0: skip PIQA)")
    p.add_argument("--diagnose-samples", type=int, default=4, help="calibration sequences for correlations "
                   "(0: skip)")
    p.add_argument("--out-dir", default="runs/ablation",
                   help="one sub-folder per cell; rerunning resumes unfinished cells (default: runs/ablation)")
    p.add_argument("--table", default=None, help="markdown table path (default: <out-dir>/ablation.md)")
    p.add_argument("--extra", default="", help="`rabit quantize` options for every cell (checked before any cell runs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells trained at once, the cores split between them (default: 1; throughput columns are "
                        "then per-cell under sharing)")
    return p


def _run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def optimizer_state_bytes(run_dir: Path) -> dict[str, int] | None:
    """Bytes of optimizer tensors in the last checkpoint, split into latent-matrix state and the rest."""
    from safetensors import safe_open

    ckpts = sorted((run_dir / "checkpoints").glob("step-*/optim.safetensors"))
    if not ckpts:
        return None
    latent = other = 0
    with safe_open(str(ckpts[-1]), "pt") as f:
        for k in f.keys():
            if k.startswith("rng"):
                continue
            sl = f.get_slice(k)
            n = 1
            for d in sl.get_shape():
                n *= d
            nbytes = n * {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}.get(sl.get_dtype(), 4)
            if k.lower().startswith("muon") or "latent" in k:
                latent += nbytes
            else:
                other += nbytes
    return {"latent": latent, "other": other}


def _read_json(path: Path) -> dict | None:
    """A cell's result file, or None while it is missing or not yet complete: cells run in other threads (or
    a killed run left a partial file), and the table is rewritten after every cell and at the end."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect(out_dir: Path, modes, inits) -> list[dict]:
    rows = []
    for init in inits:
        for mode in modes:
            cell = out_dir / f"{mode}-{init}"
            row = {"mode": mode, "init": init, "dir": str(cell)}
            summary = _read_json(cell / "summary.json")
            if summary is not None:
                ev, tr = summary.get("eval", {}), summary.get("train", {})
                row.update(fp_ppl=ev.get("fp"), init_ppl=ev.get("init"), ppl=ev.get("final"),
                           loss=(tr.get("val_after") or {}).get("loss"), kl=(tr.get("val_after") or {}).get("kl"),
                           tokens=tr.get("tokens"),
                           tok_s=tr.get("tokens_per_second"))
            row["optim_bytes"] = optimizer_state_bytes(cell)
            for name, key in (("piqa.json", "piqa"), ("diagnose.json", "diag")):
                result = _read_json(cell / name)
                if result is not None:
                    row[key] = result
            rows.append(row)
    return rows


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _piqa_acc(row):
    tasks = (row.get("piqa") or {}).get("tasks") or {}
    return (tasks.get("piqa") or {}).get("acc")


def _mean_corr(row, key):
    summary = (row.get("diag") or {}).get("summary") or {}
    return summary.get(f"{key}_mean")


def markdown(rows: list[dict], args) -> str:
    settings = f" Every cell: `rabit quantize` defaults plus `{args.extra.strip()}`." if args.extra.strip() else \
        " Every cell: `rabit quantize` defaults."
    lines = [f"Ablation on {args.model}: {args.tokens:,} training tokens per cell, WikiText-2 test perplexity on "
             f"the first {args.eval_windows} windows of 2048 tokens, PIQA on the first {args.piqa_limit} items."
             + settings,
             "", "| mode | init | PPL after init | PPL after training | held-out distill loss | held-out KL | PIQA acc | "
             "Corr(y1,y2) | Corr(yt-y1,y2) | train tok/s | latent optimizer state (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ob = r.get("optim_bytes") or {}
        lines.append(f"| {r['mode']} | {r['init']} | {_fmt(r.get('init_ppl'))} | {_fmt(r.get('ppl'))} | "
                     f"{_fmt(r.get('loss'), '.1f')} | {_fmt(r.get('kl'), '.3f')} | {_fmt(_piqa_acc(r), '.3f')} | "
                     f"{_fmt(_mean_corr(r, 'corr_paths'), '.3f')} | {_fmt(_mean_corr(r, 'corr_residual'), '.3f')} | "
                     f"{_fmt(r.get('tok_s'), '.0f')} | {_fmt(ob.get('latent', None) and ob['latent'] / 1e6, '.1f')} |")
    fp = next((r.get("fp_ppl") for r in rows if r.get("fp_ppl")), None)
    lines += ["", f"Full precision perplexity on the same windows: {_fmt(fp)}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Two panels: per-step training loss of every cell (log scale), and perplexity after init vs after
    training per cell."""
    cells = [r for r in rows if (Path(r["dir"]) / "log.jsonl").exists()]
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..train.trainer import StepLog

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    styles = {"coupled": "-", "independent": "--", "frozen": ":"}
    colors = dict(zip(INIT_SETTINGS, ("tab:orange", "tab:green", "tab:blue")))
    for r in cells:
        log = StepLog.read(Path(r["dir"]) / "log.jsonl")
        if log:
            ax.plot([x["tokens"] for x in log], [x["loss"] for x in log], styles.get(r["mode"], "-"),
                    color=colors.get(r["init"]), marker="o" if len(log) < 20 else None, markersize=3,
                    label=f"{r['mode']} / {r['init']}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("distillation loss (train batches)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    labels = [f"{r['mode']}\n{r['init']}" for r in rows]
    xs = range(len(rows))
    init = [r.get("init_ppl") or float("nan") for r in rows]
    final = [r.get("ppl") or float("nan") for r in rows]
    bx.bar([x - 0.2 for x in xs], init, width=0.4, label="after init", color="lightgray")
    bx.bar([x + 0.2 for x in xs], final, width=0.4, label="after training",
           color=[colors.get(r["init"], "tab:gray") for r in rows])
    fp = next((r.get("fp_ppl") for r in rows if r.get("fp_ppl")), None)
    if fp:
        bx.axhline(fp, color="black", linewidth=1, label=f"full precision ({fp:.1f})")
    bx.set_yscale("log")
    bx.set_xticks(list(xs))
    bx.set_xticklabels(labels, fontsize=7)
    bx.set_ylabel("WikiText-2 perplexity")
    bx.legend(fontsize=8)
    bx.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def base_job(args) -> JobSpec:
    """The settings every cell shares: `rabit quantize` defaults, --extra, and this command's budget."""
    import argparse

    from .options import job_from_args
    from .quantize import add_parser

    parser = add_parser(argparse.ArgumentParser(prog="rabit ablate --extra").add_subparsers())
    parser.prog = "rabit ablate --extra"
    spec = job_from_args(parser.parse_args(shlex.split(args.extra)))
    spec.model, spec.tokens = args.model, args.tokens
    # the modes differ in how their latent weights train: an ablation of modes trains them
    spec.train.train_latents = True
    spec.resolve_batch()
    spec.eval.windows = args.eval_windows
    spec.run.progress = False
    return spec


def cell_job(base: JobSpec, out_dir: Path, mode: str, init: str) -> JobSpec:
    spec = copy.deepcopy(base)
    spec.rabit.mode = mode
    for name, value in INIT_SETTINGS[init].items():
        setattr(spec.rabit, name, value)
    # the cell says whether to precondition: not the job's default, which follows the rotation
    spec.auto_precondition = "precondition" not in INIT_SETTINGS[init]
    cell = out_dir / f"{mode}-{init}"
    spec.run.out = str(cell)
    spec.run.resume = (cell / "run.json").exists()
    spec.validate()
    return spec


def _run_cell(args, spec: JobSpec, env: dict | None) -> list[str]:
    """Train one cell (resuming a killed one), then PIQA and path correlations on the saved model; each step
    is skipped when its result file already exists. Returns what failed (empty when nothing did)."""
    from .options import job_to_argv

    rabit = [sys.executable, "-m", "rabit"]
    cell = Path(spec.run.out)
    mode, init = cell.name.split("-", 1)
    log = cell.with_name(cell.name + ".log")
    if not (cell / "summary.json").exists():
        cmd = rabit + ["quantize", *job_to_argv(spec)]
        print(f"[ablate] training {mode} / {init} ...", flush=True)
        rc = _run(cmd, log, env)
        if rc != 0:
            print(f"[ablate] {mode} / {init} failed; see {log}", flush=True)
            return [f"{mode}/{init}: rabit quantize exited with status {rc} (see {log})"]
    failed = []
    qdir = cell / "quantized"
    if args.piqa_limit and qdir.exists() and not (cell / "piqa.json").exists():
        rc = _run(rabit + ["eval", str(qdir), "--tasks", "piqa", "--limit", str(args.piqa_limit), "--ppl", "none",
                           "--offline", "--json", str(cell / "piqa.json")], log, env)
        if rc != 0:
            failed.append(f"{mode}/{init}: rabit eval (PIQA) exited with status {rc} (see {log})")
    if args.diagnose_samples and qdir.exists() and not (cell / "diagnose.json").exists():
        rc = _run(rabit + ["diagnose", str(qdir), "--teacher", args.model, "--calib-samples",
                           str(args.diagnose_samples), "--json", str(cell / "diagnose.json"),
                           "--plot", str(cell / "diagnose.png")], log, env)
        if rc != 0:
            failed.append(f"{mode}/{init}: rabit diagnose exited with status {rc} (see {log})")
    for line in failed:
        print(f"[ablate] {line}", flush=True)
    return failed


def run(args) -> int:
    modes = [m for m in args.modes.split(",") if m]
    inits = [i for i in args.inits.split(",") if i]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for i in inits:
        if i not in INIT_SETTINGS:
            raise ValueError(f"unknown init {i!r}; choose from {', '.join(INIT_SETTINGS)}")
    if args.tokens < 1 or args.eval_windows < 1 or args.jobs < 1:
        raise ValueError("--tokens, --eval-windows and --jobs must be >= 1")
    out_dir = Path(args.out_dir)
    base = base_job(args)
    jobs = [cell_job(base, out_dir, mode, init) for init in inits for mode in modes]  # every cell checked first
    out_dir.mkdir(parents=True, exist_ok=True)
    env = None
    if args.jobs > 1:
        # Split the cores between the cells that run at once (torch reads OMP_NUM_THREADS at import).
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    lock = threading.Lock()

    def cell_done():
        with lock:
            table = markdown(collect(out_dir, modes, inits), args)
            (Path(args.table) if args.table else out_dir / "ablation.md").write_text(table)

    # With --jobs 1 the pool runs the cells one after another, in order.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run_cell, args, spec, env) for spec in jobs]
        step_failures: list[str] = []
        try:
            for fut in futures:
                step_failures += fut.result()
                cell_done()
        except BaseException:  # Ctrl-C or a failing cell: start no further cells
            pool.shutdown(cancel_futures=True)
            raise
    rows = collect(out_dir, modes, inits)
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=2, default=str))
    table = markdown(rows, args)
    table_path = Path(args.table) if args.table else out_dir / "ablation.md"
    table_path.write_text(table)
    figure = plot(rows, table_path.with_suffix(".png"), f"RaBiT ablation: {args.model}, {args.tokens:,} tokens per cell")
    print(table)
    print(f"table: {table_path}" + (f"; plot: {figure}" if figure else ""))
    failed = [f"{r['mode']}/{r['init']}" for r in rows if r.get("ppl") is None]
    if failed:
        print(f"[ablate] cells without a result: {', '.join(failed)} (see their .log files; run again to resume)")
    # an evaluation or diagnosis that failed leaves empty columns: that is a failed run too
    failed_steps = [f for f in step_failures if f.split(":")[0] not in failed]
    if failed_steps:
        print("[ablate] failed: " + "; ".join(failed_steps) + " (run again to retry them)", file=sys.stderr)
    return 1 if failed or failed_steps else 0
