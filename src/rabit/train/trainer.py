"""Distillation of a RaBiT student from its full-precision teacher, with lossless checkpoint/resume."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from ..config import RaBiTConfig
from ..layer import RaBiTLinear
from ..quantize import _set_module, collect_channel_stats, find_linear_layers, quantize_, rabit_layers
from .checkpoint import (CheckpointError, FixedTensors, latest_checkpoint, load_checkpoint, optimizer_from_tensors,
                         optimizer_to_tensors, save_checkpoint, set_rng_state)
from .loop import Collective, DistillLoop, TrainingDiverged, TrainResult, _LastGood  # noqa: F401 - re-exported
from .frozen_casts import FrozenCasts
from .losses import HIDDEN_LOSSES, autocast_context, batch_distillation_loss
from .optim import OptimConfig, Optimizers, prepare_student


@dataclass
class TrainConfig:
    """Distillation settings. The defaults are `rabit quantize`'s (sized by measurement for the default model on
    2 CPU cores, docs/TRAINING.md and docs/RESULTS.md); rabit.job.JobSpec derives `steps` and
    `optim.warmup_steps` from its token budget."""

    steps: int = 0                  # optimizer steps (0: not set yet; a JobSpec sets it from the token budget)
    batch_size: int = 1             # sequences per micro-batch (the global one when several processes train)
    # micro-batches per optimizer step: Muon's orthogonalization costs ~1.6 micro-batches of 512 tokens on CPU,
    # so fewer, larger steps are faster
    grad_accum: int = 4
    # weight of the hidden-state term: 0 (logits KL only) trained best on SmolLM2 at CPU budgets (perplexity 411
    # vs 801 with the paper's Llama recipe, MSE at gamma 100; docs/RESULTS.md section 2)
    gamma: float = 0.0
    hidden_loss: str = "mse"        # hidden-state term: "mse" (paper) or "relative" (per-token relative error)
    temperature: float = 1.0
    kl_chunk: int = 256             # tokens per chunk of the fused KL
    autocast: bool | None = None    # bf16 autocast; None = where the device has native bf16
    teacher_bf16: bool = False      # run a bf16 copy of the teacher (measured: no faster than autocast on CPU)
    gradient_checkpointing: bool = False
    max_grad_norm: float = 0.0      # 0 = no clipping (the norm is still computed and logged)
    save_every: int = 10            # steps between checkpoints (a checkpoint is also written at the end)
    keep_checkpoints: int = 1
    seed: int = 0
    train_fp_weights: bool = False
    keep_last_good: bool = True     # keep an in-memory copy of the last state with a finite loss (for NaN stops)
    # False freezes the latent weights (no Muon): only scales, norms (and biases) train with AdamW, e.g. for a
    # scale-only phase after the latents were fitted
    train_latents: bool = True
    # > 0: a budget in seconds of training steps (checkpoint writes excluded). `steps` is then provisional
    # (loop.PROVISIONAL_STEPS) until the first loop.BUDGET_PROBE_STEPS steps are timed (the first at a near-zero
    # learning rate, the others at the rates of a schedule sized from the first one's time); the loop then sets
    # steps (and the warm-up, budget_warmup) so that the whole training fits the budget.
    time_budget_s: float = 0.0
    budget_warmup: float = 0.05     # with a time budget: warm-up as a fraction of the chosen steps (< 1) or steps
    budget_refined: bool = False    # with a time budget: the step count was estimated again after the warm-up
    budget_checks: int = 0          # ... and how many of loop.BUDGET_CHECKS re-estimates were made since
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
        if self.time_budget_s < 0 or self.budget_warmup < 0:
            raise ValueError(f"time_budget_s and budget_warmup must be >= 0, got {self.time_budget_s}, "
                             f"{self.budget_warmup}")
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


def check_train_settings(path, saved: dict | None, config: TrainConfig) -> None:
    """Refuse a checkpoint written with other training settings (rabit.run_identity decides which count)."""
    from ..run_identity import train_settings_changes

    diff = train_settings_changes(saved, config.to_dict())
    if diff:
        raise CheckpointError(f"checkpoint {path} was written with different training settings: "
                              + ", ".join(f"{k.removeprefix('train.')}={a!r} (now {b!r})" for k, a, b in diff))


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
                # output-gradient magnitudes only weigh anything with alpha_out != 0; without them the
                # calibration is forward passes only (no loss over the vocabulary, no backward)
                stats = collect_channel_stats(student, find_linear_layers(student, config), calibration,
                                              gradients=config.alpha_out != 0, progress=progress)
        quantize_(student, config, calibration=calibration, stats=stats, progress=progress, on_init=on_init)
    else:
        config.validate()
        layers = find_linear_layers(student, config)
        if not layers:
            raise ValueError("the model has no linear layers to quantize")
        for name, linear in layers.items():
            new = RaBiTLinear(linear.in_features, linear.out_features,
                              bias=linear.bias is not None or config.add_bias, config=config,
                              device=linear.weight.device)
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


# ------------------------------------------------------------------------------------------ trainer
class Trainer(DistillLoop):
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
        # under autocast the frozen weights' bf16 casts are made once, not every step (bitwise the same loss)
        self.casts = FrozenCasts() if self.autocast else None
        self.split = prepare_student(student, train_fp_weights=config.train_fp_weights,
                                     train_latents=config.train_latents)
        self.optim = Optimizers(self.split, config.optim, config.steps)
        self.sampler = SequenceSampler(train.shape[0], config.seed)
        self.step = 0
        self.tokens_per_step = config.batch_size * config.grad_accum * train.shape[1]
        self.log = StepLog(self.run_dir / "log.jsonl")
        self.resumed_from: int | None = None
        self.last_saved = -1
        self._fixed = FixedTensors()
        self._last_good = _LastGood() if config.keep_last_good else None
        self.collective = Collective()
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
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        tensors, meta = {}, {}
        for key, opt in self.optim.named().items():
            t, m = optimizer_to_tensors(opt, key)
            tensors.update(t)
            meta[key] = m
        state = {"scheduler": self.optim.scheduler_state(), "optimizers": meta,
                 "data": self.sampler.state_dict(), "config": self.cfg.to_dict(),
                 "tokens": self.step * self.tokens_per_step, "extra": self.extra_state}
        # parameters that do not train (frozen latents, embeddings) go to a file shared by the checkpoints
        self._fixed.names = {n for n, p in self.student.named_parameters(remove_duplicate=False)
                             if not p.requires_grad}
        path = save_checkpoint(self.run_dir, self.step, self.student.state_dict(), tensors, state,
                               keep=self.cfg.keep_checkpoints, fixed=self._fixed)
        self.last_saved = self.step
        return path

    def resume(self, verify: bool = True) -> bool:
        """Load the latest checkpoint of run_dir if there is one (raises CheckpointError if it is damaged;
        verify=False skips its checksums)."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        ck = load_checkpoint(path, verify=verify)
        self.adopt_budgeted_steps(ck.state.get("config"))
        check_train_settings(path, ck.state.get("config"), self.cfg)
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
        self._load_position(path, ck.state)
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
                                       cfg.kl_chunk, self.autocast, need_grad, cfg.hidden_loss, casts=self.casts)

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
