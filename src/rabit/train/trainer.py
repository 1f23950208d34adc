"""Distillation of a RaBiT student from its full-precision teacher, with lossless checkpoint/resume."""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RaBiTConfig
from ..layer import RaBiTLinear
from ..quantize import _set_module, collect_channel_stats, find_linear_layers, quantize_, rabit_layers
from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, optimizer_from_tensors,
                         optimizer_to_tensors, save_checkpoint, set_rng_state)
from .losses import HIDDEN_LOSSES, autocast_context, batch_distillation_loss
from .optim import OptimConfig, Optimizers, prepare_student


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient) became NaN or Inf."""


@dataclass
class TrainConfig:
    steps: int                      # optimizer steps
    batch_size: int = 1             # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    gamma: float = 100.0            # weight of the hidden-state term
    hidden_loss: str = "mse"        # hidden-state term: "mse" (paper) or "relative" (per-token relative error)
    temperature: float = 1.0
    kl_chunk: int = 256             # tokens per chunk of the fused KL
    autocast: bool | None = None    # bf16 autocast; None = where the device has native bf16
    teacher_bf16: bool = False      # run a bf16 copy of the teacher (measured: no faster than autocast on CPU)
    gradient_checkpointing: bool = False
    max_grad_norm: float = 0.0      # 0 = no clipping (the norm is still computed and logged)
    save_every: int = 50            # steps between checkpoints (a checkpoint is also written at the end)
    keep_checkpoints: int = 1
    seed: int = 0
    train_fp_weights: bool = False
    keep_last_good: bool = True     # keep an in-memory copy of the last state with a finite loss (for NaN stops)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "kl_chunk", "save_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"unknown hidden_loss {self.hidden_loss!r}; choose one of {', '.join(HIDDEN_LOSSES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        self.optim.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CUDA with bf16 support, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(c() for c in checks if callable(c))
    return False


# ----------------------------------------------------------------------------------------- student
def make_student(teacher: nn.Module, config: RaBiTConfig, calibration: torch.Tensor | None = None,
                 stats=None, initialize: bool = True, progress: bool = False,
                 calib_autocast: bool = False, on_init=None) -> nn.Module:
    """A quantized copy of `teacher` (which is left untouched: calibration runs on the copy).

    initialize=False builds the same structure with uninitialized RaBiTLinear layers, to be filled from a
    checkpoint (no calibration, no decomposition). calib_autocast runs the calibration passes (activation and
    gradient statistics) under bf16 autocast; the decomposition itself always runs in fp32. on_init: see
    quantize_.
    """
    student = copy.deepcopy(teacher)
    if initialize:
        if config.precondition and stats is None and calibration is not None:
            device = next(student.parameters()).device
            with autocast_context(device, calib_autocast):
                stats = collect_channel_stats(student, find_linear_layers(student, config), calibration,
                                              progress=progress)
        quantize_(student, config, calibration=calibration, stats=stats, progress=progress, on_init=on_init)
    else:
        config.validate()
        layers = find_linear_layers(student, config)
        if not layers:
            raise ValueError("the model has no linear layers to quantize")
        for name, linear in layers.items():
            new = RaBiTLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              config=config, device=linear.weight.device)
            _set_module(student, name, new)
        setattr(student, "rabit_config", config)
    return student


# ------------------------------------------------------------------------------------------- data
class SequenceSampler:
    """Walks the rows of a (N, L) token tensor: epoch 0 in the given order, later epochs in a seeded
    permutation. Its whole state is (epoch, index), saved in checkpoints."""

    def __init__(self, n_rows: int, seed: int = 0):
        if n_rows < 1:
            raise ValueError("no training sequences")
        self.n = n_rows
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> torch.Tensor:
        if epoch == 0:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def take(self, k: int) -> torch.Tensor:
        out = []
        for _ in range(k):
            if self.index >= self.n:
                self.epoch += 1
                self.index = 0
                self._order = self._make_order(self.epoch)
            out.append(int(self._order[self.index]))
            self.index += 1
        return torch.tensor(out, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n_rows": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_rows") != self.n or state.get("seed") != self.seed:
            raise CheckpointError(f"checkpoint data position is for {state.get('n_rows')} rows / seed "
                                  f"{state.get('seed')}, this run has {self.n} rows / seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = self._make_order(self.epoch)


# ------------------------------------------------------------------------------------------ logging
class StepLog:
    """log.jsonl: one JSON object per optimizer step, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    @staticmethod
    def read(path: Path) -> list[dict]:
        rows = []
        if not Path(path).exists():
            return rows
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: everything after it is unreliable
        return rows

    def truncate_after(self, step: int) -> None:
        """Keep only the steps <= `step` (those a resumed run does not redo)."""
        from ..atomic_io import atomic_write_bytes

        rows = [r for r in self.read(self.path) if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write(self, row: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class TrainResult:
    steps: int
    tokens: int                 # tokens trained on over the whole run (all sessions)
    seconds: float              # training time of this session (excluding checkpoint writes)
    session_tokens: int
    tokens_per_second: float
    resumed_from: int | None
    last: dict | None           # the last step's log row


class _LastGood:
    """An in-memory copy of the trainable parameters, the optimizer state and the step/data/RNG position,
    taken just before each optimizer step (when the step's losses and gradients were all finite), into
    buffers allocated once. If a later step produces NaN/Inf, this is the state that is saved."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.sources: list[torch.Tensor] = []
        self.position: dict | None = None

    @staticmethod
    def _tensors(trainer) -> list[torch.Tensor]:
        out = [p for _, p in trainer.split.latents + trainer.split.others]
        for opt in trainer.optim.named().values():
            for p in opt.param_groups[0]["params"] + [q for g in opt.param_groups[1:] for q in g["params"]]:
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v):
                        out.append(v)
        return out

    @torch.no_grad()
    def capture(self, trainer, position: dict) -> None:
        src = self._tensors(trainer)
        same = len(src) == len(self.sources) and all(a is b for a, b in zip(src, self.sources))
        if not same:
            self.sources = src
            self.buffers = [torch.empty_like(t) for t in src]
        torch._foreach_copy_(self.buffers, self.sources)
        self.position = position

    @torch.no_grad()
    def restore(self, trainer) -> bool:
        if self.position is None:
            return False
        current = self._tensors(trainer)
        n = len(self.sources)
        if len(current) < n or any(a is not b for a, b in zip(current, self.sources)):
            return False  # the optimizer replaced its state tensors: cannot restore in place
        if len(current) > n:
            # the optimizer state was created after the capture (it was empty then): drop it again
            for opt in trainer.optim.named().values():
                opt.state.clear()
        torch._foreach_copy_(self.sources, self.buffers)
        pos = self.position
        trainer.step = pos["step"]
        trainer.optim.step_count = pos["step"]
        trainer.optim.apply_schedule()
        trainer.sampler.load_state_dict(pos["data"])
        torch.set_rng_state(pos["rng"])
        return True


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Distills `student` (a RaBiT-quantized copy) from `teacher` on rows of `train` (N, L) token ids.

    run_dir holds log.jsonl and checkpoints/. `step_callback(trainer, step)` runs before each step (tests
    use it to inject faults). The teacher is only run forward under torch.no_grad and never modified.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, train: torch.Tensor, config: TrainConfig,
                 run_dir: str | os.PathLike, progress: bool = True, extra_state: dict | None = None,
                 step_callback: Callable | None = None):
        config.validate()
        if train.ndim != 2 or train.shape[0] < 1:
            raise ValueError(f"train must be a non-empty (N, seq_len) tensor, got {tuple(train.shape)}")
        if not rabit_layers(student):
            raise ValueError("the student has no RaBiTLinear layers: quantize it first")
        self.teacher, self.student, self.train_rows, self.cfg = teacher, student, train, config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.extra_state = extra_state or {}
        self.step_callback = step_callback
        self.device = next(student.parameters()).device
        self.autocast = native_bf16(self.device) if config.autocast is None else bool(config.autocast)
        # The teacher is never modified: teacher_bf16 runs a bf16 copy of it.
        self.teacher_run = copy.deepcopy(teacher).to(torch.bfloat16) if config.teacher_bf16 else teacher
        self.teacher_run.eval()
        self.split = prepare_student(student, train_fp_weights=config.train_fp_weights)
        self.optim = Optimizers(self.split, config.optim, config.steps)
        self.sampler = SequenceSampler(train.shape[0], config.seed)
        self.step = 0
        self.tokens_per_step = config.batch_size * config.grad_accum * train.shape[1]
        self.log = StepLog(self.run_dir / "log.jsonl")
        self.resumed_from: int | None = None
        self.last_saved = -1
        self._last_good = _LastGood() if config.keep_last_good else None
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if callable(getattr(student, "activation_checkpointing_enable", None)):  # transformers >= 5.x
                student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif callable(getattr(student, "gradient_checkpointing_enable", None)):
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise ValueError(f"{type(student).__name__} does not support gradient checkpointing")
        torch.manual_seed(config.seed)

    # ------------------------------------------------------------------------------- checkpoints
    def _trainable_ok(self) -> bool:
        return all(torch.isfinite(p).all() for _, p in self.split.latents + self.split.others)

    def save(self) -> Path:
        tensors, meta = {}, {}
        for key, opt in self.optim.named().items():
            t, m = optimizer_to_tensors(opt, key)
            tensors.update(t)
            meta[key] = m
        state = {"scheduler": self.optim.scheduler_state(), "optimizers": meta,
                 "data": self.sampler.state_dict(), "config": self.cfg.to_dict(),
                 "tokens": self.step * self.tokens_per_step, "extra": self.extra_state}
        path = save_checkpoint(self.run_dir, self.step, self.student.state_dict(), tensors, state,
                               keep=self.cfg.keep_checkpoints)
        self.last_saved = self.step
        return path

    def resume(self, verify: bool = True) -> bool:
        """Load the latest checkpoint of run_dir if there is one (raises CheckpointError if it is damaged;
        verify=False skips its checksums)."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        ck = load_checkpoint(path, verify=verify)
        saved_cfg = ck.state.get("config")
        mine = json.loads(json.dumps(self.cfg.to_dict()))
        diff = sorted(k for k in set(mine) | set(saved_cfg or {})
                      if k not in ("save_every", "keep_checkpoints") and (saved_cfg or {}).get(k) != mine.get(k))
        if diff:
            raise CheckpointError(f"checkpoint {path} was written with different training settings: "
                                  + ", ".join(f"{k}={(saved_cfg or {}).get(k)!r} (now {mine.get(k)!r})"
                                              for k in diff))
        try:
            missing, unexpected = self.student.load_state_dict(ck.model, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        meta = ck.state.get("optimizers", {})
        if set(meta) != set(self.optim.named()):
            raise CheckpointError(f"checkpoint {path} has optimizers {sorted(meta)}, this run {sorted(self.optim.named())}")
        for key, opt in self.optim.named().items():
            optimizer_from_tensors(opt, ck.optim, meta[key], key)
        try:
            self.optim.load_scheduler_state(ck.state["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: bad scheduler state: {e}") from None
        self.sampler.load_state_dict(ck.state["data"])
        set_rng_state(ck.optim, ck.state["rng"])
        self.step = ck.step
        self.resumed_from = ck.step
        self.last_saved = ck.step
        self.extra_state = ck.state.get("extra", self.extra_state)
        self.log.truncate_after(ck.step)
        for layer in rabit_layers(self.student).values():
            layer._cache = None
        return True

    # -------------------------------------------------------------------------------------- steps
    def losses(self, batch: torch.Tensor, need_grad: bool = True):
        """The distillation loss of one batch (a DistillLoss of scalars)."""
        cfg = self.cfg
        return batch_distillation_loss(self.teacher_run, self.student, batch, cfg.gamma, cfg.temperature,
                                       cfg.kl_chunk, self.autocast, need_grad, cfg.hidden_loss)

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor, batch_size: int | None = None) -> dict:
        """Mean distillation loss (total, kl, mse) of the student on rows (N, L), without gradients."""
        was = self.student.training
        self.student.eval()
        sums = {"loss": 0.0, "kl": 0.0, "mse": 0.0}
        try:
            for batch in rows.split(batch_size or self.cfg.batch_size):
                out = self.losses(batch.to(self.device), need_grad=False)
                for k, v in (("loss", out.total), ("kl", out.kl), ("mse", out.mse)):
                    sums[k] += float(v) * batch.shape[0]
        finally:
            self.student.train(was)
        return {k: v / rows.shape[0] for k, v in sums.items()}

    def _diverged(self, what: str, value: float, step: int) -> None:
        self.optim.zero_grad()
        if self._last_good is not None and self._last_good.restore(self):
            # state after step (step - 2): the last one whose step produced finite losses and gradients
            # (the state after step - 1 is what produced the non-finite value, so it is not trusted)
            path = self.save()
            where = f"saved the last good state (after step {self.step}) to {path}"
        elif self._trainable_ok() and self.step > self.last_saved:
            path = self.save()
            where = f"saved the last state with finite parameters (after step {self.step}) to {path}"
        elif self.last_saved >= 0:
            where = (f"the last good state is the checkpoint of step {self.last_saved} in "
                     f"{self.run_dir / 'checkpoints'}")
        else:
            where = "no good state could be saved (the initial parameters are not finite)"
        raise TrainingDiverged(f"{what} is {value} at step {step}; stopped and {where}. "
                               "Try lower learning rates (--latent-lr / --scale-lr).")

    def train(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.steps
        start = self.step
        self.student.train()
        bar = tqdm(total=total, initial=start, unit="step", desc="distilling", disable=not self.progress,
                   dynamic_ncols=True)
        train_seconds = 0.0
        session_tokens = 0
        last = None
        params = [p for _, p in self.split.latents + self.split.others]
        self.log.truncate_after(self.step)  # drop steps a killed session logged after its last checkpoint
        try:
            while self.step < total:
                step_no = self.step + 1
                if self.step_callback is not None:
                    self.step_callback(self, step_no)
                t0 = time.perf_counter()
                position = ({"step": self.step, "data": self.sampler.state_dict(), "rng": torch.get_rng_state()}
                            if self._last_good is not None else None)
                sums = {"loss": 0.0, "kl": 0.0, "mse": 0.0}
                for _ in range(cfg.grad_accum):
                    idx = self.sampler.take(cfg.batch_size)
                    batch = self.train_rows[idx].to(self.device)
                    out = self.losses(batch)
                    value = float(out.total.detach())
                    if not math.isfinite(value):
                        self._diverged("the loss", value, step_no)
                    (out.total / cfg.grad_accum).backward()
                    sums["loss"] += value / cfg.grad_accum
                    sums["kl"] += float(out.kl.detach()) / cfg.grad_accum
                    sums["mse"] += float(out.mse.detach()) / cfg.grad_accum
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not math.isfinite(grad_norm):
                    self._diverged("the gradient norm", grad_norm, step_no)
                if self._last_good is not None:
                    self._last_good.capture(self, position)
                lrs = self.optim.lrs()
                self.optim.step()
                self.optim.zero_grad()
                self.step = step_no
                dt = time.perf_counter() - t0
                train_seconds += dt
                session_tokens += self.tokens_per_step
                tok_s = session_tokens / max(train_seconds, 1e-9)
                last = {"step": step_no, **sums, "grad_norm": grad_norm,
                        "lr_latent": lrs.get("muon"), "lr_scale": lrs.get("adamw"),
                        "tokens": step_no * self.tokens_per_step, "seconds": dt, "tokens_per_s": tok_s}
                self.log.write(last)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.4g}", kl=f"{sums['kl']:.4g}", mse=f"{sums['mse']:.4g}",
                                tok_s=f"{tok_s:.0f}", refresh=False)
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
