"""Multi-process distillation with PyTorch's own distributed stack: torchrun, FSDP2 and distributed checkpoints.

    rabit quantize --nproc 4 --model ... --device cuda                 # one process per GPU
    torchrun --nproc_per_node 4 -m rabit quantize --model ... --device cuda    # the same, started by torchrun

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
  written, and pointed to by run_dir/dcp/latest. DCP reshards on load, so any world size can resume. The
  parameters that do not train (frozen latents, embeddings; a tied one once) go once into run_dir/dcp/fixed-N (a
  DCP folder with its own state.json and checksums), which each checkpoint's state.json names: with frozen latents
  a checkpoint holds only the scales, norms and biases and their optimizer state (the one-process trainer's
  FixedTensors, for the same reason: docs/RESULTS.md sections 39 and 42).
* Only rank 0 prints progress and writes log.jsonl; other ranks silence warnings. An exception on any rank ends
  that process; the launcher (rabit.train.launch, torchrun, or torch.multiprocessing in `spawn`) then stops the
  other ranks and reports the error.

The jobs around the trainer live in their own modules: process_group (joining, small collectives, spawn),
fsdp (placement), dist_muon (DistributedMuon), memory (measurement), launch (`--nproc`: starting the workers).
* gloo on CPU, nccl on CUDA (one GPU per process, cuda:LOCAL_RANK).
"""
from __future__ import annotations

import base64
import io
import gc
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..quantize import rabit_layers
from ..integrity_checkpoints import check_dcp_folder, dcp_checksums
from .checkpoint import CheckpointError, atomic_write_json, read_json
from .dist_muon import DistributedMuon
from .fsdp import _local, meta_model, place_model, shard_model  # noqa: F401 - re-exported
from .losses import batch_distillation_loss
from .memory import (_rss_bytes, _rss_hwm_bytes, _tensor_bytes, memory_markdown,  # noqa: F401 - re-exported
                     optimizer_state_bytes, reset_peak_memory)
from .optim import Optimizers, prepare_student, split_parameters
from .process_group import (DistEnv, _barrier, broadcast_object, destroy_distributed,  # noqa: F401 - re-exported
                            free_port, init_distributed, rank0_decides, spawn, under_launcher)
from .loop import DistillLoop, ProcessGroupCollective, TrainingDiverged, TrainResult, _LastGood  # noqa: F401
from .resume_point import latest_any, latest_dcp
from .trainer import SequenceSampler, StepLog, TrainConfig, check_train_settings, native_bf16

TEACHER_MODES = ("shard", "bf16", "replicate")
MUON_MODES = ("owner", "dtensor")
DCP_FORMAT = "rabit-dcp-checkpoint"
DCP_FIXED_FORMAT = "rabit-dcp-fixed"
# 2: the parameters that do not train are in the fixed folder the state names; version-1 checkpoints still load
DCP_VERSION = 2


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


# ------------------------------------------------------------------------------------------------ trainer
class DistributedTrainer(DistillLoop):
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
        prepare_student(student, train_fp_weights=config.train_fp_weights, train_latents=config.train_latents)
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
                bucket_numel=self.dcfg.muon_bucket_numel,
                ns_dtype=None if c.muon_ns_dtype == "auto" else getattr(torch, c.muon_ns_dtype))
            self.optim.apply_schedule()
        self.sampler = SequenceSampler(train.shape[0], config.seed)
        self.step = 0
        self.tokens_per_step = config.batch_size * config.grad_accum * train.shape[1]
        self.log = StepLog(self.run_dir / "log.jsonl")
        self.resumed_from: int | None = None
        self.last_saved = -1
        self.fixed_dir: str | None = None   # the dcp/fixed-N folder of the parameters that do not train
        self.collective = ProcessGroupCollective(env)
        self._last_good = _LastGood() if config.keep_last_good else None
        torch.manual_seed(config.seed)
        gc.collect()
        # peak memory of the setup (loading, initialization, sharding), then measure training from here
        self.setup_peak_bytes = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                                 else _rss_hwm_bytes())
        reset_peak_memory(self.device)
        self.train_peak_bytes: int | None = None

    # ------------------------------------------------------------------------------------------ helpers
    def losses(self, batch: torch.Tensor, need_grad: bool = True):
        """The distillation loss of one batch (a DistillLoss of scalars)."""
        cfg = self.cfg
        return batch_distillation_loss(self.teacher, self.student, batch, cfg.gamma, cfg.temperature,
                                       cfg.kl_chunk, self.autocast, need_grad, cfg.hidden_loss)

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

    checkpoint_root = dcp_root

    def _model_state(self, part: str) -> dict:
        """The student's sharded state dict: "all", "trained" (without the parameters that do not train) or
        "fixed" (only those, a tied one once)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.student)
        if part == "all":
            return full
        every, once = frozen_parameter_names(self.student)
        if part == "trained":
            return {k: v for k, v in full.items() if k not in every}
        return {k: v for k, v in full.items() if k in once}

    def _state_dicts(self, model: str = "trained") -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"model": self._model_state(model),
                "optim": {k: get_optimizer_state_dict(self.student, opt) for k, opt in self.optim.named().items()}}

    def _write_folder(self, name: str, state: dict, json_state: dict) -> Path:
        """Write `state` with DCP into dcp/.tmp-<name>, then (rank 0) its state.json (json_state and the checksums of
        every file, each rank hashing the files it wrote) and rename it to dcp/<name> (collective: every rank calls
        it). A crash mid-write leaves no dcp/<name> behind."""
        import torch.distributed.checkpoint as dcp

        final, tmp = self.dcp_root / name, self.dcp_root / f".tmp-{name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if state:
            dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        checksums = dcp_checksums(tmp)  # collective
        if self.env.is_main:
            atomic_write_json(tmp / "state.json", {**json_state, "checksums": checksums})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        return final

    def _save_fixed(self) -> None:
        """Write the parameters that do not train to dcp/fixed-<step> (collective), once per trainer: they do not
        change while it trains (no optimizer holds them). A resumed trainer keeps its checkpoint's folder."""
        fixed = self._model_state("fixed")
        name = f"fixed-{self.step:06d}"
        self._write_folder(name, {"model": fixed} if fixed else {},
                           {"format": DCP_FIXED_FORMAT, "version": 1, "keys": sorted(fixed)})
        _barrier()
        self.fixed_dir = name

    def _json_state(self) -> dict:
        buf = io.BytesIO()
        buf.write(torch.get_rng_state().numpy().tobytes())
        version, internal, gauss = random.getstate()
        return {"format": DCP_FORMAT, "version": DCP_VERSION, "step": self.step, "fixed": self.fixed_dir,
                "scheduler": self.optim.scheduler_state(), "data": self.sampler.state_dict(),
                "config": self.cfg.to_dict(), "tokens": self.step * self.tokens_per_step,
                "world_size": self.env.world_size, "teacher": self.teacher_mode, "muon": self.dcfg.muon,
                "rng": {"torch": base64.b64encode(buf.getvalue()).decode("ascii"),
                        "python": [version, list(internal), gauss]},
                "extra": self.extra_state}

    def save(self) -> Path:
        """Write a DCP checkpoint of the current step (collective: every rank calls it)."""
        if self.train_peak_bytes is None:  # the peak of the training steps alone (DCP staging comes on top)
            self.train_peak_bytes = self._peak()
        if self.fixed_dir is None:
            self._save_fixed()
        name = f"step-{self.step:06d}"
        final = self._write_folder(name, self._state_dicts(), self._json_state())
        if self.env.is_main:
            atomic_write_json(self.dcp_root / "latest", {"step": self.step, "dir": name})
            kept = sorted((d for d in self.dcp_root.iterdir() if d.is_dir() and d.name.startswith("step-")),
                          key=lambda d: d.name)
            for old in kept[:-self.cfg.keep_checkpoints]:
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
            _remove_unnamed_fixed(self.dcp_root)
        _barrier()
        self.last_saved = self.step
        return final

    @staticmethod
    def latest(run_dir: str | os.PathLike) -> Path | None:
        return latest_dcp(run_dir)

    def resume(self, verify: bool = True) -> bool:
        """Load the newest checkpoint of run_dir: a DCP one (any world size wrote it) or a single-process one
        (checkpoints/); False if there is none. verify=False skips the checksums of its files."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        found = latest_any(self.run_dir)
        if found is None:
            return False
        kind, path = found
        if kind == "local":
            self._resume_local(path)
            return True
        st = read_json(path / "state.json", "checkpoint state")
        if st.get("format") != DCP_FORMAT:
            raise CheckpointError(f"{path} is not a {DCP_FORMAT} (format {st.get('format')!r})")
        if verify:
            check_dcp_folder(path)  # collective: each rank checks a share of the files
        self.adopt_budgeted_steps(st.get("config"))
        check_train_settings(path, st.get("config"), self.cfg)
        if set(st["scheduler"]["base_lr"]) != set(self.optim.named()):
            raise CheckpointError(f"checkpoint {path} has optimizers {sorted(st['scheduler']['base_lr'])}, "
                                  f"this run {sorted(self.optim.named())}")
        fixed = st.get("fixed") if int(st.get("version", 1)) >= 2 else None
        if fixed is not None:
            fixed_path = path.parent / str(fixed)
            if not (fixed_path / "state.json").exists():
                raise CheckpointError(f"checkpoint {path} names {fixed_path} (the parameters that do not train), "
                                      "which is missing")
            if verify:
                check_dcp_folder(fixed_path)
        # version 1 holds every parameter; version 2 the trained ones, the others in its fixed folder
        state = self._state_dicts("all" if int(st.get("version", 1)) < 2 else "trained")
        try:
            dcp.load(state, checkpoint_id=str(path))
            if fixed is not None:
                fixed_state = {"model": self._model_state("fixed")}
                if fixed_state["model"]:
                    dcp.load(fixed_state, checkpoint_id=str(fixed_path))
        except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException and others
            raise CheckpointError(f"cannot load {path}: {e}") from None
        strict = StateDictOptions(strict=fixed is None)
        set_model_state_dict(self.student, state["model"], options=strict)
        if fixed is not None and fixed_state["model"]:
            set_model_state_dict(self.student, fixed_state["model"], options=StateDictOptions(strict=False))
        self.fixed_dir = fixed
        for key, opt in self.optim.named().items():
            set_optimizer_state_dict(self.student, opt, state["optim"][key])
        self._load_position(path, st)
        rng = torch.frombuffer(bytearray(base64.b64decode(st["rng"]["torch"])), dtype=torch.uint8)
        torch.set_rng_state(rng.clone())
        version, internal, gauss = st["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        self._resumed_at(int(st["step"]), st.get("extra"))
        return True

    def _resumed_at(self, step: int, extra: dict | None) -> None:
        self.step = self.resumed_from = self.last_saved = step
        self.extra_state = extra if extra is not None else self.extra_state
        if self.env.is_main:
            self.log.truncate_after(self.step)
        for layer in rabit_layers(self.student).values():
            layer._cache = None

    def _resume_local(self, path: Path) -> None:
        """Continue from a single-process checkpoint (every rank reads the files and keeps its shards)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from .checkpoint import _from_json_value, load_checkpoint, set_rng_state
        ck = load_checkpoint(path)
        self.adopt_budgeted_steps(ck.state.get("config"))
        check_train_settings(path, ck.state.get("config"), self.cfg)
        meta = ck.state.get("optimizers", {})
        if set(meta) != set(self.optim.named()):
            raise CheckpointError(f"checkpoint {path} has optimizers {sorted(meta)}, this run {sorted(self.optim.named())}")
        full = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.student, ck.model, options=full)
            for key, opt in self.optim.named().items():
                # the single-process optimizer numbered its parameters in the order of this split
                names = [n for n, _ in (self.split.latents if key == "muon" else self.split.others)]
                state = {names[int(i)]: {k: ck.optim[v["tensor"]] if "tensor" in v else _from_json_value(v["value"])
                                         for k, v in entry.items()}
                         for i, entry in meta[key]["state"].items()}
                groups = _from_json_value(meta[key]["param_groups"])
                for g in groups:
                    g["params"] = [names[i] for i in g["params"]]
                set_optimizer_state_dict(self.student, opt, {"state": state, "param_groups": groups}, options=full)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from None
        self._load_position(path, ck.state)
        set_rng_state(ck.optim, ck.state["rng"])
        self._resumed_at(ck.step, ck.state.get("extra"))

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
            "peak_grad_bytes": self.collective.peak_grad_bytes,
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


def frozen_parameter_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(every name, one name per tensor) of the parameters that do not train. A tied head is one parameter under
    two names; get_model_state_dict(ignore_frozen_params=True) drops only the first and would write the tied
    embedding (113 MB for the default model) into every checkpoint."""
    every = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    once = {n for n, p in model.named_parameters() if not p.requires_grad}
    return every, once


def _remove_unnamed_fixed(root: Path) -> None:
    """Remove the dcp/fixed-N folders that no checkpoint in root names any more (rank 0, after pruning)."""
    named = set()
    for step in root.iterdir():
        if step.is_dir() and step.name.startswith("step-"):
            try:
                named.add(json.loads((step / "state.json").read_text()).get("fixed"))
            except (OSError, ValueError, AttributeError):
                return   # a checkpoint that cannot be read: keep every fixed folder rather than guess
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("fixed-") and d.name not in named:
            shutil.rmtree(d, ignore_errors=True)
