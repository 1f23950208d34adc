"""The process group: joining it (env:// variables, as torchrun or rabit's own launcher set them), small
collectives for configs and errors, and starting processes on this machine (torch.multiprocessing for tests and
benchmarks; rabit.train.launch for the command line)."""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError

@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: object  # torch.distributed.device_mesh.DeviceMesh (1-D, all ranks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """Whether this process was started by torchrun (or anything else that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: str = "cpu", backend: str | None = None, timeout_minutes: float = 60.0) -> DistEnv:
    """Join the process group described by the env:// variables (torchrun sets them) and build a 1-D device mesh.

    device "cpu" -> gloo; "cuda" (or "cuda:N", whose index is ignored) -> nccl on cuda:LOCAL_RANK. The timeout is
    long because rank 0 alone calibrates and initializes the student while the others wait.
    """
    from torch.distributed.device_mesh import init_device_mesh

    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"distributed training runs on cpu or cuda, not {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if kind == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if kind == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(kind, (world,))
    if rank != 0:
        quiet_nonzero_rank()
    return DistEnv(rank, world, local_rank, dev, backend, mesh)


def quiet_nonzero_rank() -> None:
    """Ranks other than 0 print nothing but errors."""
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers is optional here
        pass


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """obj from rank `src` on every rank (pickled; for small things: configs, token tensors, errors)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_decides(fn: Callable, env: DistEnv):
    """Run fn() on rank 0 only and return its result on every rank; if it raises, every rank raises the same
    error type with the same message (checks of the command line, the run folder, the data...)."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = (type(e).__name__, str(e), e)
    box = broadcast_object([result, None if error is None else error[:2]])
    if env.is_main and error is not None:
        error[2].in_sync = True  # every rank stops here: they can still meet at a barrier
        raise error[2]
    if box[1] is not None:
        name, msg = box[1]
        cls = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
               "CheckpointError": CheckpointError}.get(name, RuntimeError)
        err = cls(msg)
        err.mirrored = err.in_sync = True  # rank 0 reports it; the other ranks stop quietly
        raise err
    return box[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, fn: Callable, world: int, port: int, args: tuple, threads: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if threads:
        torch.set_num_threads(threads)
    try:
        fn(*args)
    finally:
        destroy_distributed()


def spawn(fn: Callable, nproc: int, *args, threads: int | None = None, timeout: float | None = None) -> None:
    """Run fn(*args) in `nproc` new processes on this machine (torch.multiprocessing, 127.0.0.1, a free port),
    with the env:// variables set so that fn can call init_distributed(). If any process raises, the others are
    terminated and the error (with its traceback) is raised here; after `timeout` seconds every process is
    terminated and TimeoutError raised (so that a hang fails in minutes). fn must be importable (module level)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_spawn_entry, args=(fn, nproc, free_port(), args, threads), nprocs=nproc, join=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if deadline is not None and time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(10)
            raise TimeoutError(f"{nproc} spawned processes did not finish within {timeout:.0f} s")
