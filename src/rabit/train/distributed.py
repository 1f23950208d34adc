"""Multi-process distillation with PyTorch's own distributed stack: torchrun, FSDP2 and distributed checkpoints.

    torchrun --nproc_per_node 4 -m rabit.train.distributed --model ... --device cuda     # one process per GPU
    python -m rabit.train.distributed --nproc 4 --model ... --device cuda               # same, launches torchrun
    rabit quantize --nproc 4 ...                                                         # same, from the CLI

What is distributed, and how:

* Student: `fully_shard` (FSDP2, DTensor parameters sharded on dim 0) on every decoder block plus the root, so
  latent weights, path scales, norms and frozen embeddings are all split across ranks, and so are their gradients
  and the optimizer state (which is created like the parameters it belongs to). Parameters stay fp32: the forward
  runs under bf16 autocast where the device has native bf16, as in the single-process trainer (an FSDP
  mixed-precision policy would all-gather the latents in bf16 and change the sign planes).
* Teacher (frozen, forward only): `teacher="shard"` (default) shards it the same way (1/N of its weights per rank,
  one block gathered at a time); `"bf16"` holds a full bf16 replica on every rank; `"replicate"` a full replica in
  its own dtype.
* Muon on sharded latents: torch.optim.Muon accepts DTensor parameters (DTensor's ops gather what its
  Newton-Schulz matmuls need), but then every rank orthogonalizes every matrix, each in several collectives.
  `DistributedMuon` (the default, `muon="owner"`) instead assigns each latent matrix to one owner rank (greedy by
  size), gathers its momentum-updated gradient there in bf16 (exactly what Muon's Newton-Schulz starts from),
  orthogonalizes it once and scatters the rows back: 1/N of the Newton-Schulz work per rank, two collectives per
  matrix, and updates bit-identical to single-process Muon. `muon="dtensor"` uses torch.optim.Muon as is.
* Data: every rank draws the same global micro-batch of `batch_size` rows from one SequenceSampler (whose
  position depends only on the global step) and trains on its contiguous `batch_size / world_size` slice. Each
  rank's loss is the mean over its slice and FSDP averages gradients over ranks, so the gradient is the one of the
  mean over the global batch; logged losses are all-reduced means. The same settings therefore give the same
  training at any number of processes (up to float rounding), and a run resumes at any number of processes.
* Checkpoints: `torch.distributed.checkpoint` (DCP) of the model and optimizer state dicts
  (`get_state_dict`/`set_state_dict` style, per optimizer), written to run_dir/dcp/.tmp-step-N by all ranks, then
  renamed to run_dir/dcp/step-N by rank 0 after state.json (step, scheduler, data position, RNG, config) is
  written, and pointed to by run_dir/dcp/latest. DCP reshards on load, so any world size can resume.
* Only rank 0 prints progress and writes log.jsonl; other ranks silence warnings. An exception on any rank is
  printed with its rank and ends that process; the launcher (torchrun, or torch.multiprocessing in `spawn`) then
  stops the other ranks and reports the error.
* gloo on CPU, nccl on CUDA (one GPU per process, cuda:LOCAL_RANK).
"""
from __future__ import annotations

import base64
import gc
import io
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..quantize import rabit_layers
from .checkpoint import CheckpointError, atomic_write_json, read_json
from .losses import batch_distillation_loss, decoder_layers
from .optim import Optimizers, prepare_student, split_parameters
from .trainer import SequenceSampler, StepLog, TrainConfig, TrainingDiverged, TrainResult, native_bf16

TEACHER_MODES = ("shard", "bf16", "replicate")
MUON_MODES = ("owner", "dtensor")
DCP_FORMAT = "rabit-dcp-checkpoint"
DCP_VERSION = 1


@dataclass
class DistConfig:
    teacher: str = "shard"              # shard | bf16 | replicate (see the module docstring)
    muon: str = "owner"                 # owner (DistributedMuon) | dtensor (torch.optim.Muon on DTensors)
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (less memory)
    muon_bucket_numel: int = 1 << 26    # elements of latents orthogonalized per round of gathers (bounds memory)

    def validate(self) -> None:
        if self.teacher not in TEACHER_MODES:
            raise ValueError(f"unknown teacher placement {self.teacher!r}; choose one of {', '.join(TEACHER_MODES)}")
        if self.muon not in MUON_MODES:
            raise ValueError(f"unknown distributed Muon {self.muon!r}; choose one of {', '.join(MUON_MODES)}")
        if self.muon_bucket_numel < 1:
            raise ValueError("muon_bucket_numel must be >= 1")


# ------------------------------------------------------------------------------------------ process group
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


# ---------------------------------------------------------------------------------------------- sharding
def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard (FSDP2) each decoder block, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def place_model(model: nn.Module, env: DistEnv, shard: bool, from_rank0: bool,
                reshard_after_forward: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Shard (or replicate) `model` across the ranks and move it to env.device.

    from_rank0=False: every rank holds the same full model (e.g. loaded from the same file).
    from_rank0=True: only rank 0 holds the real model; the others hold the same architecture on the meta device
    (no memory), and parameters and buffers are broadcast from rank 0 after sharding, so only rank 0 ever holds a
    full copy. dtype casts floating parameters and buffers before placement (e.g. a bf16 teacher).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dtype is not None:
        model.to(dtype)
    full_sd = None
    if from_rank0 and env.world_size > 1:
        if env.is_main:
            if _on_meta(model):
                raise ValueError("rank 0 must hold the real model (it is on the meta device)")
            full_sd = {k: v.detach() for k, v in model.state_dict().items()}
        elif not _on_meta(model):
            raise ValueError(f"rank {env.rank}: with from_rank0 the model must be built on the meta device")
    if shard:
        shard_model(model, env.mesh, reshard_after_forward)
    if _on_meta(model):
        model.to_empty(device=env.device)
    else:
        model.to(env.device)
    if full_sd is not None or (from_rank0 and env.world_size > 1):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_sd if env.is_main else {}, options=opts)
        with torch.no_grad():
            for _, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the sd
                dist.broadcast(buf.data, src=0)
        del full_sd
        gc.collect()
    for layer in rabit_layers(model).values():
        layer._cache = None
    return model


# ------------------------------------------------------------------------------------------------- Muon
class DistributedMuon(torch.optim.Muon):
    """torch.optim.Muon for FSDP2-sharded (Shard(0) DTensor) 2-D parameters, with one owner per matrix.

    For each matrix: the Nesterov momentum update is formed on the local rows, cast to bf16 (what Muon's
    Newton-Schulz starts from), gathered on the matrix's owner rank, orthogonalized there, and the rows are
    scattered back; every rank then applies weight decay and the update to its own rows. Owners are assigned
    greedily by size (the same way on every rank), so each rank does ~1/N of the Newton-Schulz work. The state
    ("momentum_buffer", sharded like the parameter) and the hyper-parameters are torch.optim.Muon's, and the
    update equals single-process Muon's bit for bit. Plain (non-DTensor) parameters are updated locally, as
    torch.optim.Muon does, which is only valid in a single process.
    """

    def __init__(self, params, *, group=None, bucket_numel: int = 1 << 26, **kwargs):
        super().__init__(params, **kwargs)
        self._pg = group
        self._bucket_numel = int(bucket_numel)

    def _world(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self._pg), dist.get_world_size(self._pg)

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._world()
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon supports dense real parameters only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                items.append((group, p))
        loads = [0] * world
        owners = []
        for _, p in items:
            owner = min(range(world), key=lambda r: (loads[r], r))
            loads[owner] += p.numel()
            owners.append(owner)

        def finish(group, p, update_local):
            lr = group["lr"]
            lr = float(lr) if torch.is_tensor(lr) else lr
            local = _local(p)
            local.mul_(1 - lr * group["weight_decay"])
            local.add_(update_local, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))

        bucket = []
        size = 0
        for (group, p), owner in zip(items, owners):
            g = _local(p.grad)
            buf = _local(self.state[p]["momentum_buffer"])
            momentum = group["momentum"]
            buf.lerp_(g, 1 - momentum)
            update = g.lerp(buf, momentum) if group["nesterov"] else buf
            if not _is_dtensor(p) and world > 1:
                raise RuntimeError("DistributedMuon: a non-sharded parameter in a multi-process run; shard the "
                                   "model with fully_shard first")
            if world == 1:  # the local rows are the whole matrix
                o = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                finish(group, p, o)
                continue
            bucket.append((group, p, owner, update.bfloat16()))
            size += p.numel()
            if size >= self._bucket_numel:
                self._sharded_round(bucket, rank, world, finish, _zeropower_via_newtonschulz)
                bucket, size = [], 0
        if bucket:
            self._sharded_round(bucket, rank, world, finish, _zeropower_via_newtonschulz)
        return loss

    def _sharded_round(self, bucket, rank, world, finish, newton_schulz) -> None:
        from torch.distributed.tensor import Shard

        # gloo has no bf16 collectives: send fp32 (bf16 -> fp32 -> bf16 is exact).
        wire = torch.float32 if dist.get_backend(self._pg) == "gloo" else torch.bfloat16
        pending, meta = [], []
        for group, p, owner, upd in bucket:
            if tuple(p.placements) != (Shard(0),):
                raise RuntimeError(f"DistributedMuon needs parameters sharded on dim 0, got {p.placements}")
            n, m = p.shape
            chunk = -(-n // world)
            rows = upd.shape[0]
            if rows != max(0, min(chunk, n - rank * chunk)):
                raise RuntimeError(f"unexpected shard layout: {rows} local rows of {n} on rank {rank}/{world}")
            send = torch.zeros(chunk, m, dtype=wire, device=upd.device)
            send[:rows].copy_(upd)
            recv = [torch.empty_like(send) for _ in range(world)] if rank == owner else None
            dst = dist.get_global_rank(self._pg, owner) if self._pg is not None else owner
            pending.append(dist.gather(send, recv, dst=dst, group=self._pg, async_op=True))
            meta.append((group, p, owner, recv, n, m, chunk, rows, dst))
        for w in pending:
            w.wait()
        pending, outs = [], []
        for group, p, owner, recv, n, m, chunk, rows, src in meta:
            out = torch.empty(chunk, m, dtype=wire, device=p.device)
            scatter = None
            if rank == owner:
                full = torch.cat(recv)[:n].bfloat16()
                o = newton_schulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
                padded = torch.zeros(world * chunk, m, dtype=wire, device=o.device)
                padded[:n].copy_(o)
                scatter = list(padded.split(chunk))
            pending.append(dist.scatter(out, scatter, src=src, group=self._pg, async_op=True))
            outs.append((group, p, out, rows))
        for w in pending:
            w.wait()
        for group, p, out, rows in outs:
            finish(group, p, out[:rows].bfloat16())


# ------------------------------------------------------------------------------------------------ memory
def _rss_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring peak memory from now: CUDA allocator peak, or the process' peak RSS (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _tensor_bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (local shards of DTensors)."""
    return sum(_tensor_bytes(s.values()) for s in opt.state.values())


# ------------------------------------------------------------------------------------------------ trainer
class DistributedTrainer:
    """Distills `student` from `teacher` across all ranks of the process group (see the module docstring).

    Call on every rank with the same arguments. teacher/student: full models on every rank (from_rank0=False),
    or real on rank 0 and built on the meta device elsewhere (from_rank0=True). They are sharded / placed here,
    in place. `train` (N, L) token rows must be the same on every rank (from_rank0 broadcasts rank 0's).
    config.batch_size is the GLOBAL micro-batch (split evenly across ranks), so the same TrainConfig trains the
    same way at any number of processes. run_dir must be shared by all ranks (DCP writes one file per rank).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, train: torch.Tensor | None, config: TrainConfig,
                 run_dir: str | os.PathLike, env: DistEnv, dist_config: DistConfig | None = None,
                 progress: bool = True, extra_state: dict | None = None, step_callback: Callable | None = None,
                 from_rank0: bool = False):
        config.validate()
        self.dcfg = dist_config or DistConfig()
        self.dcfg.validate()
        self.env = env
        world = env.world_size
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} (the global micro-batch) is not divisible by the "
                             f"{world} processes")
        if from_rank0:
            train = broadcast_object(train if env.is_main else None)
        if train is None or train.ndim != 2 or train.shape[0] < 1:
            raise ValueError("train must be a non-empty (N, seq_len) tensor")
        if not rabit_layers(student):
            raise ValueError("the student has no RaBiTLinear layers: quantize it first")
        self.cfg = config
        self.train_rows = train
        self.run_dir = Path(run_dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress and env.is_main
        self.extra_state = extra_state or {}
        self.step_callback = step_callback
        self.device = env.device
        self.autocast = native_bf16(self.device) if config.autocast is None else bool(config.autocast)

        # requires_grad is decided before sharding (FSDP2 copies it onto the sharded parameters)
        prepare_student(student, train_fp_weights=config.train_fp_weights)
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if callable(getattr(student, "activation_checkpointing_enable", None)):
                student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif callable(getattr(student, "gradient_checkpointing_enable", None)):
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise ValueError(f"{type(student).__name__} does not support gradient checkpointing")
        self.student = place_model(student, env, shard=True, from_rank0=from_rank0,
                                   reshard_after_forward=self.dcfg.reshard_after_forward)
        for p in teacher.parameters():
            p.requires_grad_(False)
        # "bf16" = a bf16 replica; TrainConfig.teacher_bf16 also casts a sharded teacher to bf16
        shard_teacher = self.dcfg.teacher == "shard"
        bf16_teacher = self.dcfg.teacher == "bf16" or config.teacher_bf16
        self.teacher_mode = ("shard" if shard_teacher else "replicate") + ("-bf16" if bf16_teacher else "")
        self.teacher = place_model(teacher, env, shard=shard_teacher, from_rank0=from_rank0,
                                   reshard_after_forward=True, dtype=torch.bfloat16 if bf16_teacher else None)
        self.teacher.eval()

        self.split = split_parameters(self.student)
        self.optim = Optimizers(self.split, config.optim, config.steps)
        if self.optim.muon is not None and self.dcfg.muon == "owner":
            c = config.optim
            self.optim.muon = DistributedMuon(
                [p for _, p in self.split.latents], lr=c.latent_lr, weight_decay=c.latent_weight_decay,
                momentum=c.muon_momentum, nesterov=True, ns_steps=c.muon_ns_steps, adjust_lr_fn="match_rms_adamw",
                bucket_numel=self.dcfg.muon_bucket_numel)
            self.optim.apply_schedule()
        self.sampler = SequenceSampler(train.shape[0], config.seed)
        self.step = 0
        self.tokens_per_step = config.batch_size * config.grad_accum * train.shape[1]
        self.log = StepLog(self.run_dir / "log.jsonl")
        self.resumed_from: int | None = None
        self.last_saved = -1
        self.peak_grad_bytes = 0
        torch.manual_seed(config.seed)
        gc.collect()
        # peak memory of the setup (loading, initialization, sharding), then measure training from here
        self.setup_peak_bytes = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                                 else _rss_hwm_bytes())
        reset_peak_memory(self.device)
        self.train_peak_bytes: int | None = None

    # ------------------------------------------------------------------------------------------ helpers
    def _all_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.env.backend == "nccl" else "cpu")
        if self.env.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.env.world_size
        return t.tolist()

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global micro-batch of row indices."""
        b = idx.numel() // self.env.world_size
        return idx[self.env.rank * b:(self.env.rank + 1) * b]

    def losses(self, batch: torch.Tensor, need_grad: bool = True):
        """The distillation loss of one batch (a DistillLoss of scalars)."""
        cfg = self.cfg
        return batch_distillation_loss(self.teacher, self.student, batch, cfg.gamma, cfg.temperature,
                                       cfg.kl_chunk, self.autocast, need_grad, cfg.hidden_loss)

    def _grad_norm_and_clip(self, params: list[torch.Tensor]) -> float:
        """Global L2 norm of the gradients (over all shards), clipped like clip_grad_norm_ when configured."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        self.peak_grad_bytes = max(self.peak_grad_bytes, _tensor_bytes(grads))
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            sq += g.float().pow(2).sum()
        if self.env.world_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = float(sq.sqrt())
        if self.cfg.max_grad_norm > 0 and math.isfinite(norm):
            coef = min(self.cfg.max_grad_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        return norm

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor, batch_size: int | None = None) -> dict:
        """Mean distillation loss (total, kl, mse) over rows (N, L), split across ranks (same rows on every rank)."""
        was = self.student.training
        self.student.eval()
        world, rank = self.env.world_size, self.env.rank
        per = max(1, (batch_size or self.cfg.batch_size) // world)
        n = rows.shape[0]
        sums = torch.zeros(4, dtype=torch.float64)
        try:
            for start in range(0, n, per * world):
                lo = start + rank * per
                mine = rows[lo:min(lo + per, n)]
                real = mine.shape[0]
                if real == 0:
                    mine = rows[:1]  # every rank runs the forward (FSDP collectives); this one is not counted
                out = self.losses(mine.to(self.device), need_grad=False)
                for i, v in enumerate((out.total, out.kl, out.mse)):
                    sums[i] += float(v) * real
        finally:
            self.student.train(was)
        if world > 1:
            s = sums.to(self.device) if self.env.backend == "nccl" else sums
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
            sums = s.cpu()
        return {k: float(sums[i]) / n for i, k in enumerate(("loss", "kl", "mse"))}

    # -------------------------------------------------------------------------------------- checkpoints
    @property
    def dcp_root(self) -> Path:
        return self.run_dir / "dcp"

    def _state_dicts(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.student),
                "optim": {k: get_optimizer_state_dict(self.student, opt) for k, opt in self.optim.named().items()}}

    def _json_state(self) -> dict:
        buf = io.BytesIO()
        buf.write(torch.get_rng_state().numpy().tobytes())
        version, internal, gauss = random.getstate()
        return {"format": DCP_FORMAT, "version": DCP_VERSION, "step": self.step,
                "scheduler": self.optim.scheduler_state(), "data": self.sampler.state_dict(),
                "config": self.cfg.to_dict(), "tokens": self.step * self.tokens_per_step,
                "world_size": self.env.world_size, "teacher": self.teacher_mode, "muon": self.dcfg.muon,
                "rng": {"torch": base64.b64encode(buf.getvalue()).decode("ascii"),
                        "python": [version, list(internal), gauss]},
                "extra": self.extra_state}

    def save(self) -> Path:
        """Write a DCP checkpoint of the current step (collective: every rank calls it)."""
        import torch.distributed.checkpoint as dcp

        if self.train_peak_bytes is None:  # the peak of the training steps alone (DCP staging comes on top)
            self.train_peak_bytes = self._peak()
        name = f"step-{self.step:06d}"
        final = self.dcp_root / name
        tmp = self.dcp_root / f".tmp-{name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(self._state_dicts(), checkpoint_id=str(tmp))
        _barrier()
        if self.env.is_main:
            atomic_write_json(tmp / "state.json", self._json_state())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_json(self.dcp_root / "latest", {"step": self.step, "dir": name})
            kept = sorted((d for d in self.dcp_root.iterdir() if d.is_dir() and d.name.startswith("step-")),
                          key=lambda d: d.name)
            for old in kept[:-self.cfg.keep_checkpoints]:
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        self.last_saved = self.step
        return final

    @staticmethod
    def latest(run_dir: str | os.PathLike) -> Path | None:
        root = Path(run_dir) / "dcp"
        pointer = root / "latest"
        if not pointer.exists():
            return None
        info = read_json(pointer, "checkpoint pointer")
        path = root / str(info.get("dir", ""))
        if not (path / "state.json").exists() or not (path / ".metadata").exists():
            raise CheckpointError(f"checkpoint pointer {pointer} names {path}, which is missing or incomplete")
        return path

    def resume(self) -> bool:
        """Load the latest DCP checkpoint of run_dir (any world size wrote it); False if there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = self.latest(self.run_dir)
        if path is None:
            return False
        st = read_json(path / "state.json", "checkpoint state")
        if st.get("format") != DCP_FORMAT:
            raise CheckpointError(f"{path} is not a {DCP_FORMAT} (format {st.get('format')!r})")
        saved_cfg = st.get("config") or {}
        mine = json.loads(json.dumps(self.cfg.to_dict()))
        diff = sorted(k for k in set(mine) | set(saved_cfg)
                      if k not in ("save_every", "keep_checkpoints") and saved_cfg.get(k) != mine.get(k))
        if diff:
            raise CheckpointError(f"checkpoint {path} was written with different training settings: "
                                  + ", ".join(f"{k}={saved_cfg.get(k)!r} (now {mine.get(k)!r})" for k in diff))
        if set(st["scheduler"]["base_lr"]) != set(self.optim.named()):
            raise CheckpointError(f"checkpoint {path} has optimizers {sorted(st['scheduler']['base_lr'])}, "
                                  f"this run {sorted(self.optim.named())}")
        state = self._state_dicts()
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException and others
            raise CheckpointError(f"cannot load {path}: {e}") from None
        set_model_state_dict(self.student, state["model"])
        for key, opt in self.optim.named().items():
            set_optimizer_state_dict(self.student, opt, state["optim"][key])
        try:
            self.optim.load_scheduler_state(st["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: bad scheduler state: {e}") from None
        self.sampler.load_state_dict(st["data"])
        rng = torch.frombuffer(bytearray(base64.b64decode(st["rng"]["torch"])), dtype=torch.uint8)
        torch.set_rng_state(rng.clone())
        version, internal, gauss = st["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        self.step = self.resumed_from = self.last_saved = int(st["step"])
        self.extra_state = st.get("extra", self.extra_state)
        if self.env.is_main:
            self.log.truncate_after(self.step)
        for layer in rabit_layers(self.student).values():
            layer._cache = None
        return True

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's full (unsharded) state dict on CPU on rank 0 (collective; None on other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.env.is_main else None

    # ------------------------------------------------------------------------------------------- memory
    def _peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _rss_hwm_bytes()

    def memory_report(self) -> dict:
        """Per-rank memory (gathered on every rank): peak since the trainer was built, parameter, gradient and
        optimizer-state bytes of each rank's shards, plus totals over ranks."""
        peak = self._peak()
        kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "process peak RSS (VmHWM)"
        trainable = [p for _, p in self.split.latents + self.split.others]
        mine = {
            "rank": self.env.rank, "peak_bytes": peak, "setup_peak_bytes": self.setup_peak_bytes,
            "train_peak_bytes": self.train_peak_bytes if self.train_peak_bytes is not None else peak,
            "rss_bytes": _rss_bytes(),
            "student_param_bytes": _tensor_bytes(self.student.parameters()),
            "latent_param_bytes": _tensor_bytes(p for _, p in self.split.latents),
            "trainable_param_bytes": _tensor_bytes(trainable),
            "teacher_param_bytes": _tensor_bytes(self.teacher.parameters()),
            "peak_grad_bytes": self.peak_grad_bytes,
            "optimizer_state_bytes": {k: optimizer_state_bytes(o) for k, o in self.optim.named().items()},
        }
        rows = [mine]
        if self.env.world_size > 1:
            rows = [None] * self.env.world_size
            dist.all_gather_object(rows, mine)
        opt_total = sum(sum(r["optimizer_state_bytes"].values()) for r in rows)
        return {"world_size": self.env.world_size, "peak_kind": kind, "device": str(self.device),
                "mode": getattr(getattr(self.student, "rabit_config", None), "mode", None),
                "teacher": self.teacher_mode, "muon": self.dcfg.muon, "ranks": rows,
                "optimizer_state_bytes_total": opt_total,
                "latent_param_bytes_total": sum(r["latent_param_bytes"] for r in rows)}

    # -------------------------------------------------------------------------------------------- train
    def train(self, stop_at: int | None = None) -> TrainResult:
        """Train to config.steps (or stop after step `stop_at`, saving a checkpoint there)."""
        try:
            return self._train(stop_at)
        except Exception:
            # Shown with its rank; the launcher stops the other ranks (they may be waiting in a collective).
            print(f"[rank {self.env.rank}] error in distributed training:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            raise

    def _train(self, stop_at: int | None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
        start = self.step
        self.student.train()
        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc=f"distilling ({self.env.world_size} proc)",
                   disable=not self.progress, dynamic_ncols=True)
        train_seconds, session_tokens, last = 0.0, 0, None
        params = [p for _, p in self.split.latents + self.split.others]
        if self.env.is_main:
            self.log.truncate_after(self.step)
        try:
            while self.step < total:
                step_no = self.step + 1
                if self.step_callback is not None:
                    self.step_callback(self, step_no)
                t0 = time.perf_counter()
                local = [0.0, 0.0, 0.0]
                for _ in range(cfg.grad_accum):
                    idx = self.local_rows(self.sampler.take(cfg.batch_size))
                    batch = self.train_rows[idx].to(self.device)
                    out = self.losses(batch)
                    (out.total / cfg.grad_accum).backward()
                    for i, v in enumerate((out.total, out.kl, out.mse)):
                        local[i] += float(v.detach()) / cfg.grad_accum
                loss, kl, mse = self._all_mean(local)
                if not math.isfinite(loss):
                    self.optim.zero_grad()
                    raise TrainingDiverged(self._diverged_msg("the loss", loss, step_no))
                grad_norm = self._grad_norm_and_clip(params)
                if not math.isfinite(grad_norm):
                    self.optim.zero_grad()
                    raise TrainingDiverged(self._diverged_msg("the gradient norm", grad_norm, step_no))
                lrs = self.optim.lrs()
                t_opt = time.perf_counter()
                self.optim.step()
                t_opt = time.perf_counter() - t_opt
                self.optim.zero_grad()
                self.step = step_no
                dt = time.perf_counter() - t0
                train_seconds += dt
                session_tokens += self.tokens_per_step
                tok_s = session_tokens / max(train_seconds, 1e-9)
                last = {"step": step_no, "loss": loss, "kl": kl, "mse": mse, "grad_norm": grad_norm,
                        "lr_latent": lrs.get("muon"), "lr_scale": lrs.get("adamw"),
                        "tokens": step_no * self.tokens_per_step, "seconds": dt, "tokens_per_s": tok_s,
                        "optimizer_seconds": t_opt, "world_size": self.env.world_size}
                if self.env.is_main:
                    self.log.write(last)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", kl=f"{kl:.4g}", mse=f"{mse:.4g}", tok_s=f"{tok_s:.0f}",
                                refresh=False)
                if self.step % cfg.save_every == 0 or self.step == total:
                    self.save()
            if self.last_saved != self.step:
                self.save()
        finally:
            bar.close()
            self.log.close()
        return TrainResult(steps=self.step, tokens=self.step * self.tokens_per_step, seconds=train_seconds,
                           session_tokens=session_tokens,
                           tokens_per_second=session_tokens / train_seconds if train_seconds else 0.0,
                           resumed_from=self.resumed_from, last=last)

    def _diverged_msg(self, what: str, value: float, step: int) -> str:
        where = (f"the last good state is the checkpoint of step {self.last_saved} in {self.dcp_root}"
                 if self.last_saved >= 0 else "no checkpoint was written yet")
        return (f"{what} is {value} at step {step}; stopped ({where}). "
                "Try lower learning rates (--latent-lr / --scale-lr).")


# ------------------------------------------------------------------------------------- launching processes
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


def spawn(fn: Callable, nproc: int, *args, threads: int | None = None) -> None:
    """Run fn(*args) in `nproc` new processes on this machine (torch.multiprocessing, 127.0.0.1, a free port),
    with the env:// variables set so that fn can call init_distributed(). If any process raises, the others are
    terminated and the error (with its traceback) is raised here. fn must be importable (module level)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(fn, nproc, free_port(), args, threads), nprocs=nproc, join=True)


def torchrun_command(nproc: int, module_args: list[str], module: str = "rabit.train.distributed") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *module_args]


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m rabit.train.distributed ARGV` in `nproc` processes under torchrun (standalone, one node)
    and return its exit status. torchrun stops every process when one fails and reports the failing rank."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, list(argv)), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------- command line
def add_distributed_args(parser) -> None:
    """The distributed options (added to `rabit quantize` and to `python -m rabit.train.distributed`)."""
    have = set(getattr(parser, "_option_string_actions", {}))
    g = parser.add_argument_group("multi-process (torch.distributed)")
    if "--nproc" not in have:
        g.add_argument("--nproc", type=int, default=None,
                       help="train in N processes on this machine (launches torchrun; with --device cuda one GPU "
                            "per process). Under torchrun this is not needed.")
    g.add_argument("--teacher-placement", choices=TEACHER_MODES, default="shard",
                   help="distributed runs: shard the frozen teacher like the student (default), or keep a full "
                        "bf16 / full-precision replica on every rank")
    g.add_argument("--dist-muon", choices=MUON_MODES, default="owner",
                   help="distributed runs: orthogonalize each latent on one owner rank (default) or run "
                        "torch.optim.Muon on the sharded DTensors")
    g.add_argument("--dist-timeout", type=float, default=60.0,
                   help="minutes a rank waits in a collective (rank 0 initializes the student alone; default: 60)")
    g.add_argument("--memory-report", action="store_true",
                   help="distributed runs: write memory.json (peak memory, optimizer-state bytes per rank)")


def maybe_distributed(args, argv: list[str] | None = None) -> int | None:
    """The hook for `rabit quantize`: None when the run is an ordinary single-process one; otherwise the exit
    status of the distributed run. Under torchrun (`torchrun --nproc_per_node N -m rabit quantize ...`) every
    process runs the distributed pipeline; otherwise `--nproc N` relaunches the same command line under torchrun
    (N = 1 gives a one-process distributed run, e.g. to resume a multi-process run alone)."""
    if under_launcher():
        return run_quantize_cli(args)
    nproc = getattr(args, "nproc", None)
    if not nproc:
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quantize":
        argv = argv[1:]
    return launch(_strip_nproc(argv), nproc)


def build_parser():
    import argparse

    from ..cli_quantize import add_parser

    parser = argparse.ArgumentParser(prog="python -m rabit.train.distributed")
    sub = parser.add_subparsers(dest="command")
    p = add_parser(sub)  # includes add_distributed_args
    p.prog = "python -m rabit.train.distributed"
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m rabit.train.distributed [rabit quantize options] [--nproc N]`: under torchrun, run this
    process' share; otherwise launch torchrun with --nproc processes (default 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = "quantize"
    if not under_launcher():
        return launch(_strip_nproc(argv), args.nproc or 1)
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run_quantize_cli)(args)


def run_quantize_cli(args) -> int:
    """run_quantize with the CLI's error convention: bad input -> one line `rabit quantize: error: ...` (printed
    by the rank where it happened; an error rank 0 found and shared is printed once) and exit status 2."""
    try:
        return run_quantize(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(e, "mirrored", False):
            return 2
        if os.environ.get("RABIT_DEBUG") or not isinstance(e, (ValueError, FileNotFoundError, CheckpointError,
                                                                TrainingDiverged)):
            raise  # unexpected: the full traceback (torchrun reports the failing rank)
        print(f"rabit quantize: error: {e}", file=sys.stderr, flush=True)
        return 2


# ------------------------------------------------------------------------------------------- the pipeline
def meta_model(hf_config, dtype: torch.dtype) -> nn.Module:
    """The architecture of `hf_config` on the meta device (no memory), for ranks that receive weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


def _say0(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


def run_quantize(args) -> int:
    """The `rabit quantize` job in a torch.distributed process group (every rank calls this).

    Rank 0 checks everything, loads the teacher, tokenizes the data, measures the FP perplexity and calibrates and
    initializes the student (as the single-process command does); the other ranks build the architecture on the
    meta device. Both models are then sharded and filled from rank 0, the student is distilled on all ranks
    (DistributedTrainer), and rank 0 gathers the result, evaluates it and saves it like the single-process
    command. Run folder: run.json, log.jsonl, dcp/ (checkpoints), memory.json, evals.json, summary, model.
    """
    from .. import cli_quantize as cq

    env = init_distributed(getattr(args, "device", "cpu"), timeout_minutes=getattr(args, "dist_timeout", 60.0))
    try:
        return _run_quantize(args, env, cq)
    except BaseException as e:
        if getattr(e, "in_sync", False):
            try:  # all ranks stopped at the same point: leave together (no rank aborts on a closed peer)
                _barrier()
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        destroy_distributed()


def _run_quantize(args, env: DistEnv, cq) -> int:
    from ..data import eval_tokens, tokenizer_fingerprint, training_sequences
    from ..eval.perplexity import perplexity
    from ..models import load_model, resolve_model_path
    from .optim import OptimConfig
    from .trainer import make_student

    wall0 = time.time()
    progress = not args.no_progress and env.is_main
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dcfg = DistConfig(teacher=getattr(args, "teacher_placement", "shard"), muon=getattr(args, "dist_muon", "owner"))
    local: dict = {}  # rank 0's big objects (never broadcast)

    # ---- stage 1 (rank 0): every check, the teacher, the data, the run folder
    def stage1():
        cq._validate_args(args)
        dcfg.validate()
        rcfg = cq._rabit_config(args)
        out = Path(args.out) if args.out else Path("runs") / f"{cq._slug(args.model)}-{args.mode}"
        state = cq._run_state(out)
        if args.resume and state != "run":
            raise FileNotFoundError(f"--resume: {out} holds no run to resume")
        if state == "foreign" and not args.overwrite:
            raise ValueError(f"{out} is not empty and holds no rabit run; choose another --out or pass --overwrite")
        old_run = None
        if state == "run":
            try:
                old_run = json.loads((out / "run.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                if not args.overwrite:
                    raise ValueError(f"{out / 'run.json'} is unreadable ({e}); pass --overwrite") from None
        if args.batch_size % env.world_size:
            raise ValueError(f"--batch-size {args.batch_size} is the global micro-batch and must be divisible by "
                             f"the {env.world_size} processes")
        _say0(env, f"loading {args.model} ...")
        teacher, tok = load_model(args.model, device=str(env.device))
        cq.check_save_options(args, teacher)
        train_bos, eval_bos = cq.bos_choices(args, tok)
        sources = cq._sources(args.train_data)
        train, val = training_sequences(tok, sources, args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
                                        add_bos=train_bos.use)
        calib_sources = cq._sources(args.calib_data) if args.calib_data else sources[:1]
        tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
        steps = args.tokens // tokens_per_step
        if steps < 1:
            raise ValueError(f"--tokens {args.tokens} is smaller than one optimizer step ({tokens_per_step} tokens)")
        warmup = int(round(args.warmup * steps)) if args.warmup < 1 else int(args.warmup)
        autocast = native_bf16(env.device) if args.bf16 is None else args.bf16
        tcfg = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, gamma=args.gamma,
                           hidden_loss=args.hidden_loss,
                           temperature=args.temperature, autocast=autocast,
                           gradient_checkpointing=args.gradient_checkpointing, max_grad_norm=args.max_grad_norm,
                           save_every=args.save_every, seed=args.seed, teacher_bf16=args.teacher_bf16,
                           optim=OptimConfig(latent_lr=args.latent_lr, scale_lr=args.scale_lr,
                                             weight_decay=args.weight_decay,
                                             latent_weight_decay=args.latent_weight_decay,
                                             muon_ns_steps=args.muon_ns_steps, warmup_steps=min(warmup, steps),
                                             min_lr_ratio=args.min_lr_ratio))
        tcfg.validate()
        run_info = json.loads(json.dumps({
            "format": "rabit-quantize-run", "version": 1, "model": args.model,
            "model_path": str(resolve_model_path(args.model)), "rabit_config": rcfg.to_dict(),
            "train": tcfg.to_dict(), "tokens": steps * tokens_per_step,
            "data": {"train": sources, "seq_len": args.seq_len, "val_fraction": args.val_fraction,
                     "train_sequences": int(train.shape[0]), "calib": calib_sources,
                     "calib_samples": args.calib_samples, "calib_len": args.calib_len, "bos": train_bos.use},
            "eval": {"data": args.eval_data, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
                     "bos": eval_bos.use, "val_sequences": args.val_sequences, "skip_init": args.skip_init_eval},
            "distributed": {"checkpoints": "dcp"},
        }))
        if old_run is not None and not args.overwrite:
            if "distributed" not in old_run:
                raise ValueError(f"{out} holds a single-process run (its checkpoints are not DCP checkpoints); "
                                 "resume it without --nproc / torchrun, or use another --out")
            err = cq.different_run_error(out, old_run, run_info)
            if err is not None:
                raise err
            if not args.resume:
                raise ValueError(f"{out} already holds this run; pass --resume to continue it or --overwrite")
        ck = DistributedTrainer.latest(out) if args.resume else None
        eval_stream = eval_tokens(tok, args.eval_data)
        if eval_stream.numel() < args.eval_seq_len:
            raise ValueError(f"--eval-data {args.eval_data} has {eval_stream.numel()} tokens, fewer than one window")
        if args.overwrite and state in ("run", "foreign"):
            for name in cq.RUN_FILES + ("memory.json",):
                (out / name).unlink(missing_ok=True)
            for name in cq.RUN_DIRS + ("dcp",):
                shutil.rmtree(out / name, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "run.json", run_info)
        local.update(teacher=teacher, tok=tok, train=train, val=val, eval_stream=eval_stream,
                     calib_sources=calib_sources)
        _say0(env, f"run folder: {out}")
        _say0(env, f"training on {env.world_size} process(es) ({env.backend}): {steps} steps x {tokens_per_step} "
                   f"tokens = {steps * tokens_per_step:,} tokens, bf16 autocast {'on' if autocast else 'off'}, "
                   f"mode {args.mode}, k={args.num_paths}, teacher {dcfg.teacher}, Muon {dcfg.muon}")
        return {"rcfg": rcfg, "tcfg": tcfg, "out": str(out), "ck": str(ck) if ck else None,
                "hf_config": teacher.config, "dtype": next(teacher.parameters()).dtype, "autocast": autocast,
                "bos": {"train": train_bos.to_dict(), "eval": eval_bos.to_dict()}}

    info = rank0_decides(stage1, env)
    rcfg, tcfg, out, ck = info["rcfg"], info["tcfg"], Path(info["out"]), info["ck"]
    eval_desc = (f"{args.eval_data}, " + (f"the first {args.eval_windows} windows of {args.eval_seq_len} tokens"
                 if args.eval_windows else f"all windows of {args.eval_seq_len} tokens")
                 + (", BOS-prefixed" if info["bos"]["eval"]["use"] else ""))

    def ppl(model, what):
        tok = local["tok"]
        _say0(env, f"perplexity of the {what} model on {eval_desc} ...")
        return perplexity(model, local["eval_stream"], args.eval_seq_len, info["bos"]["eval"]["token_id"],
                          args.eval_windows or None, progress=progress)

    # ---- stage 2 (rank 0): FP perplexity, calibration + initialization (others: the meta architecture)
    def stage2():
        from .checkpoint import read_json as _read

        teacher, tok = local["teacher"], local["tok"]
        evals_path = out / "evals.json"
        evals = {}
        if args.resume and evals_path.exists():
            try:
                evals = _read(evals_path, "evaluation record")
            except CheckpointError:
                evals = {}
        if "fp" not in evals:
            key = {"model": cq._model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tok),
                   "corpus": args.eval_data, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
                   "bos": info["bos"]["eval"]["token_id"], "dtype": "float32"}
            evals["fp"], hit = cq._fp_ppl_cached(teacher, key, lambda: ppl(teacher, "full-precision"))
            _say0(env, f"full precision: perplexity {evals['fp']:.3f}" + (" (cached)" if hit else ""))
        if ck is not None:
            student = make_student(teacher, rcfg, initialize=False)  # filled from the checkpoint
        else:
            calib = None
            if rcfg.precondition:
                from ..data import calibration_batch

                calib = calibration_batch(tok, local["calib_sources"], args.calib_samples, args.calib_len,
                                          add_bos=info["bos"]["train"]["use"], seed=args.seed)
            t0 = time.time()
            _say0(env, f"initializing ({rcfg.init}) on rank 0 ...")
            student, evals["init_cached"] = cq._initialized_student(teacher, rcfg, calib, info["autocast"], progress,
                                                                    getattr(args, "init_cache", True))
            evals["init_seconds"] = time.time() - t0
            if not args.skip_init_eval and "init" not in evals:
                evals["init"] = ppl(student, f"{args.num_paths}-bit initialized")
                _say0(env, f"{args.num_paths}-bit after initialization: perplexity {evals['init']:.3f}")
        atomic_write_json(evals_path, evals)
        local.update(student=student, evals=evals)
        return True

    rank0_decides(stage2, env)
    if env.is_main:
        teacher, student, train = local["teacher"], local["student"], local["train"]
    else:
        teacher = meta_model(info["hf_config"], info["dtype"])
        student = make_student(teacher, rcfg, initialize=False)
        train = None

    # ---- stage 3 (all ranks): sharded distillation
    trainer = DistributedTrainer(teacher, student, train, tcfg, out, env, dcfg, progress=progress, from_rank0=True)
    del teacher, student
    local.pop("teacher", None)
    local.pop("student", None)
    gc.collect()
    if ck is not None:
        trainer.resume()
        _say0(env, f"resumed at step {trainer.step} of {tcfg.steps} from {ck}")
    val_rows = broadcast_object(local["val"][: args.val_sequences] if env.is_main and args.val_sequences
                                and local["val"].shape[0] else None)
    evals = local.get("evals", {})
    if broadcast_object(val_rows is not None and "val_before" not in evals):
        vb = trainer.evaluate(val_rows)
        if env.is_main:
            evals["val_before"] = vb
            atomic_write_json(out / "evals.json", evals)
    result = trainer.train()
    val_after = trainer.evaluate(val_rows) if val_rows is not None else None
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
    base, tok = load_model(args.model, device="cpu")
    final_student = make_student(base, rcfg, initialize=False)
    del base
    missing, unexpected = final_student.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"gathered state dict does not fit the student: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    del full
    final_student.to(env.device).eval()
    final = ppl(final_student, f"{args.num_paths}-bit distilled")
    _say0(env, f"{args.num_paths}-bit after distillation: perplexity {final:.3f}")
    memory = {"peak_bytes_per_rank": [r["peak_bytes"] for r in mem["ranks"]],
              "optimizer_state_bytes_total": mem["optimizer_state_bytes_total"]}
    return cq.finish_run(args, out, final_student, tok, evals, eval_desc, final, result, val_after,
                         info["autocast"], wall0, world_size=env.world_size,
                         extra={"memory": memory, "bos": info["bos"]})


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def memory_markdown(reports: list[dict]) -> str:
    """A Markdown table of memory reports (one row per rank of each report)."""
    lines = ["| mode | procs | rank | peak, training steps (MiB) | peak, incl. checkpoint (MiB) | "
             "optimizer state (MiB) | latent params (MiB) | student params (MiB) | teacher params (MiB) | "
             "peak grads (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        for r in rep["ranks"]:
            lines.append(f"| {rep.get('mode')} | {rep['world_size']} | {r['rank']} | "
                         f"{_mib(r.get('train_peak_bytes'))} | {_mib(r['peak_bytes'])} | "
                         f"{_mib(sum(r['optimizer_state_bytes'].values()))} | {_mib(r['latent_param_bytes'])} | "
                         f"{_mib(r['student_param_bytes'])} | {_mib(r['teacher_param_bytes'])} | "
                         f"{_mib(r['peak_grad_bytes'])} |")
    kinds = sorted({rep["peak_kind"] for rep in reports})
    return "\n".join(lines) + f"\n\npeak memory: {', '.join(kinds)}; all other columns are this rank's shards.\n"


if __name__ == "__main__":
    sys.exit(main())
