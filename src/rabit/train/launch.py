"""Starting N worker processes on this machine (`rabit quantize --nproc N`) and reporting a failure once.

Each worker gets the env:// variables (as torchrun sets them) and a file to write its error to. When one worker
fails, the others are stopped (SIGTERM, quietly), and the error of the worker that failed FIRST is printed once:
the others' errors (a peer closed the connection...) are consequences of it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .process_group import free_port

ERROR_FILE_ENV = "RABIT_ERROR_FILE"


def report_worker_error(error: BaseException, message: str | None, exit_status: int) -> bool:
    """Record this worker's error for the launcher (message: one line for bad input, None for the traceback;
    exit_status: what the launcher returns). Returns False when no launcher asked for it (the caller prints it)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    text = message if message is not None else "".join(traceback.format_exception(error))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"time": time.time(), "rank": os.environ.get("RANK"), "text": text, "exit_status": exit_status}, f)
    os.replace(tmp, path)
    return True


def launch_workers(command: list[str], nproc: int, threads: int | None = None, poll_seconds: float = 0.1) -> int:
    """Run `command` in nproc processes (ranks 0..nproc-1 of one process group); return 0, or the exit status of
    the first worker that failed after printing its error once."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rabit-workers-") as tmp:
        procs = []
        for rank in range(nproc):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                       **{ERROR_FILE_ENV: str(Path(tmp) / f"rank-{rank}.json")})
            env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
            procs.append(subprocess.Popen(command, env=env))
        failed = None
        try:
            # a worker has failed when it ended with an error, or reported one (it may hang on its way out)
            while failed is None and any(p.poll() is None for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)
                               or (Path(tmp) / f"rank-{r}.json").exists()), None)
                if failed is None:
                    time.sleep(poll_seconds)
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        except KeyboardInterrupt:
            _stop(procs)
            raise
        if failed is None:
            return 0
        _stop(procs, grace_seconds=5.0)
        errors = []
        for rank in range(nproc):
            f = Path(tmp) / f"rank-{rank}.json"
            if f.exists():
                errors.append(json.loads(f.read_text()))
        if errors:
            first = min(errors, key=lambda e: e["time"])
            print(first["text"].rstrip("\n"), file=sys.stderr, flush=True)
            return int(first.get("exit_status") or 1)
        print(f"rabit: worker {failed} of {nproc} ended with exit status {procs[failed].returncode}",
              file=sys.stderr, flush=True)
        code = procs[failed].returncode
        return code if code and code > 0 else 1


def _stop(procs: list[subprocess.Popen], grace_seconds: float = 0.0) -> None:
    # Workers that stop together (an error every rank shares) finish writing their reports first.
    deadline = time.time() + grace_seconds
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
