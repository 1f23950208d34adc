"""Block-wise reconstruction: train each decoder block of the student, in order, to reproduce the
full-precision block (EfficientQAT's Block-AP, NanoQuant's block stage), before end-to-end distillation.

Block i of the student sees the output of the already-reconstructed student prefix (blocks 0..i-1) and is
trained to match what the teacher's block i outputs on the teacher's own inputs, so that it also learns to
correct the error its prefix left. Its RaBiT parameters train as they do end to end (the coupled derivation
is unchanged; independent and frozen modes too): latents with Muon, scales and norms with AdamW, one
cosine schedule per block. Before training, each of the block's layers can be refined in closed form
(rabit.ops.refine: GPTQ-style signs and least-squares scales in the metric H = sum x x^T of its inputs); by
default in the order the block calls its layers, on the inputs the student block gives each of them, towards
the teacher's output on the teacher's inputs (BlockConfig.refine_inputs). With epochs = 0 that refinement is
all the stage does.

The block's inputs and targets, (samples, seq_len, hidden) each, live in memory or, when larger than
`max_memory_gb`, in files under the run folder (memory-mapped). After each block its parameters are written
to <run>/blocks/block_NNN.safetensors and progress.json, atomically: a killed run resumes at the block it
was in, recomputing the prefix's activations (forward passes only) and losing nothing already trained.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..kernels.attention import fast_attention
from ..layer import RaBiTLinear
from ..ops.refine import (DAMP_REFERENCES, centered_sums, corrected_target, coupled_latent, fitted_bias,
                          load_native_kernels, output_target, refine_paths)
from ..ops.svid import reconstruct
from ..run_identity import ADDED_SETTINGS
from .activations import (ActivationStore, LayerCovariance, capture_block_inputs, flat_input, layer_groups,
                          forward_from_layer, layer_output, module_returns_layer, no_autocast, product_sum,
                          run_capturing, to_device)
from .losses import autocast_context, decoder_layers
from .optim import OptimConfig, Optimizers, prepare_student, split_parameters

BLOCK_LOSSES = ("relative", "mse")
REFINE_INPUTS = ("fp", "quantized", "corrected", "block", "residual")
# the modes whose targets are the teacher's outputs on its own inputs (they need the teacher block's layer inputs)
_CORRECTED = ("corrected", "block", "residual")


# BlockConfig fields added after block stages were first saved, with the value the code before each used: a saved
# stage without the field resumes when this run's value is that one (a stage killed before an upgrade is not lost).
# The run's own record (run.json) names the same fields as "stages.blocks.<field>": one table serves both.
BLOCK_FIELDS_ADDED = {key.removeprefix("stages.blocks."): value for key, value in ADDED_SETTINGS.items()
                      if key.startswith("stages.blocks.")}


def refine_rows(cfg: "BlockConfig") -> int:
    """The rows the sequential refinement uses: whole batches (the captured keyword arguments, e.g. attention
    masks, are shaped for batch_size rows) covering refine_samples, at most all samples (the rows are drawn from
    them)."""
    bs = cfg.batch_size
    return min(-(-cfg.refine_samples // bs) * bs, cfg.samples)


# A time budget never cuts the rows below this, or below the configured rows where those are fewer (docs/RESULTS.md
# sections 13 and 40: 16 rows overfitted the refinement, 32 gave 100.5 after the block stage against 74.0 with 128).
MIN_BUDGET_ROWS = 32


# one decision cuts at most this share of the rows, the next blocks' times deciding whether to cut further: a
# block's time per row grows with its rows (0.087-0.089 s per row at 256 rows, 0.074-0.081 at 128, the same blocks
# alternately on one machine: docs/RESULTS.md section 42) and the machine's speed wanders, so one measurement cut
# 256 rows to 80 where a replay of that run's block times affords ~110
BUDGET_MAX_CUT = 0.25


# rows are only cut when the remaining blocks would overrun the seconds left by more than this share: the blocks'
# times wander by a few percent, and rows once cut never come back
BUDGET_SLACK = 0.05


def budget_rows(rows: int, remaining_blocks: int, seconds_left: float, fixed: float, per_row: float,
                batch_size: int, floor: int = MIN_BUDGET_ROWS, max_cut: float = BUDGET_MAX_CUT) -> int:
    """The rows (whole batches, at most `rows`) that the remaining blocks can use so that they finish within
    seconds_left, for a block taking fixed + per_row x rows seconds: `rows` while that overruns by at most
    BUDGET_SLACK, else cut to fit, by at most max_cut of `rows` at once (rounded down to whole batches, so that a
    cut removes at least one); never fewer than `floor` rows (rounded up to a batch, at most `rows`): below it the
    refinement overfits, and the budget is overrun instead."""
    floor = min(-(-floor // batch_size) * batch_size, rows)
    if remaining_blocks <= 0 or per_row <= 0:
        return rows
    if remaining_blocks * (fixed + per_row * rows) <= (1 + BUDGET_SLACK) * seconds_left:
        return rows
    # past the check above, fewer than `rows` are affordable
    affordable = (seconds_left / remaining_blocks - fixed) / per_row
    least = int(rows * (1 - max_cut)) // batch_size * batch_size   # rounded down: each cut removes a batch
    return min(max(int(affordable // batch_size) * batch_size, least, floor), rows)


def block_time_model(timings: list[tuple[float, float, int]]) -> tuple[float, float]:
    """(fixed seconds, seconds per row) of a block from measured (solve seconds, seconds, rows) of blocks: the
    median of each, so that one block run on a busy or slow machine moves neither."""
    fixed = statistics.median(solve for solve, _, _ in timings)
    per_row = statistics.median((seconds - solve) / rows for solve, seconds, rows in timings)
    return fixed, per_row


@dataclass
class BlockConfig:
    # Defaults are `rabit quantize`'s: the closed-form refinement only, on 256 rows, which `--job-minutes` cuts to
    # what its budget affords (BlockReconstruction's time_budget; 176-256 per block in a 13-minute job on an AMX Xeon,
    # docs/RESULTS.md section 41). Block training (epochs > 0, e.g. 64 samples x 4 epochs as in EfficientQAT's
    # Block-AP) costs about as much as end-to-end training on samples x seq_len x epochs tokens.
    # calibration sequences the blocks are reconstructed on. In the 13-minute job on Zen 5 (docs/RESULTS.md section
    # 49), 192 and 352 rows at equal time (the rest to training) gave +0.70-0.92 and +0.10-0.19 perplexity in domain
    # against 256, out of domain within seed noise
    samples: int = 256
    seq_len: int = 512
    epochs: int = 0               # passes over the samples per block; 0 = closed-form refinement only
    batch_size: int = 4
    latent_lr: float = 1e-3       # Muon; 0 freezes the latents (scales and norms only)
    scale_lr: float = 1e-3        # AdamW: scales, biases, norms
    min_lr_ratio: float = 0.0     # cosine floor of each block's schedule
    loss: str = "relative"        # per-token ||s - t||^2 / ||t||^2 (robust to massive activations) or "mse"
    # rounds of output-aware refinement before training (0: none). With act order a second round pays: 99.9 / 82.2
    # -> 92.1 / 78.8 before training, 67.7 / 70.3 -> 62.6 / 67.7 after the job's 80 frozen-latent steps, for +32 s
    # of block stage (docs/RESULTS.md section 20; without act order, on 16 rows, it did not, section 13); a third
    # 88.3 / 77.3 before training, 61.3 / 67.4 after (section 22), for about as much again
    refine_rounds: int = 3
    # sequences whose activations form H for the refinement: 32 x 512 tokens took the default model from 246.7 to
    # 126.9 before any training where 16 x 512 overfitted them (a 1536-input layer fitted on 8,192 tokens; docs/
    # RESULTS.md section 13); 64 x 512 gave 102.8 for +70% block-stage time (section 14). With three rounds, sign
    # descent and a bias the refinement fits its rows harder, and more rows pay far more: after the block stage
    # 100.5 (32 rows) -> 78.3 (64) -> 74.0 (128) -> 72.2 (256), after 40,960 frozen-latent tokens 51.8 -> 47.3 ->
    # 45.3 -> 43.9 on WikiText-2, for a block stage of 187 -> 204 -> 269 -> 505 s on an AMX Xeon (section 40)
    refine_samples: int = 256     # `rabit quantize` sets it to `samples` unless --refine-samples is given
    # whose inputs the refinement fits on: "fp" (H of the full-precision block's inputs, target W x),
    # "quantized" (GPTQ's sequential rule: H of the student's own inputs, from the quantized prefix and the
    # block's already-refined layers, target W x~) or "corrected" (the same H, target the teacher's W x on
    # its full-precision inputs, so that each layer also absorbs the error its inputs carry; GPTAQ) or "block"
    # ("corrected", and the block's last layer, where its output is added to the block's output, targets the
    # teacher block's output itself: it also takes up the error the residual stream carries) or "residual"
    # ("block", and a layer whose output is added to the residual stream inside the block (Llama's o_proj: the
    # MLP's input is x + o_proj(a)) targets the teacher's residual stream there, x_T + W_o a_T, so that the MLP
    # already sees the corrected stream)
    refine_inputs: str = "block"
    # ridge of the least-squares targets ("corrected" / "block"), relative to mean(diag H): the target weight
    # W + (T - W H)(H + damp I)^-1 fits the calibration tokens' outputs; a larger damp keeps it nearer W. On 32
    # rows 0.1 gave 111.8 / 89.3 (in / out of domain) against 126.9 / 97.7 with 0.01 and 113.2 / 92.5 with 1.0;
    # on 64 rows 0.1 and 0.01 tied (docs/RESULTS.md section 14)
    target_damp: float = 0.1
    # damping of H itself in the refinement's output metric (signs and scales), relative to mean(diag H): GPTQ's
    # 0.01 before; on 32 rows (target_damp 0.1) 0.1 gave 102.2 / 86.1 against 111.8 / 89.3 (docs/RESULTS.md
    # section 15). At 128 rows (section 45) 0.3 gave 44.79 / 56.51 against 46.23 / 56.77 on seed 0, a tie on seed
    # 1, and on seed 2 a collapse from the twelfth block on (732.8 after the stage, 156.3 after training); 1.0 was
    # worse on seed 0 (46.11 / 57.99)
    metric_damp: float = 0.1
    # what both dampings are relative to (rabit.ops.refine.damp_scale): "mean" of diag H (GPTQ's) or "clipped",
    # that mean with each entry clipped at 10x the median entry. A few massive-activation channels set the mean
    # of SmolLM2's twelfth down_proj (651x its median), so "mean" damps its ordinary channels ~65x harder than
    # their own energy; "clipped" undoes that, and was worse: after training 53.10 against 46.23 (seed 0) and
    # 48.27 against 45.52 (seed 2) at 128 rows, block 12's loss 2-4x higher and carried down the stack (docs/
    # RESULTS.md section 45): the heavy damping of that one layer is a regularization that pays
    damp_reference: str = "mean"
    # GPTQ's act order for the refinement's sign choice: columns rounded by decreasing H diagonal, the inputs
    # with the most energy first, while the most columns remain to absorb their error. On 32 rows it took the
    # refined start from 107.9 / 97.1 to 99.9 / 82.2 (in / out of domain) at no cost, 74.0 / 73.2 -> 67.7 / 70.3
    # after the job's 80 frozen-latent steps (docs/RESULTS.md section 20)
    act_order: bool = True
    # passes of coordinate descent on the signs after the refinement's rounds (rabit.ops.refine.sign_descent), then
    # a refit of the scales: each weight moves to the level that lowers its row's output error most, given all the
    # others. 0 = none (before section 37 of docs/RESULTS.md). 8 passes at 128 rows fitted the rows harder (mean
    # block loss 0.048 against 0.059) and tied after training (46.44 / 56.39 against 46.23 / 56.77; section 45)
    descent_passes: int = 4
    # rows (whole batches, the first of the stage's) on which a block's refinement is checked against the block's
    # unrefined start: when the refined block has both a higher mean and a higher median per-token block loss there,
    # its refinement is undone (0: no check). A failed refinement is otherwise carried down the stack: at a metric
    # ridge of 0.3 one seed's twelfth block ended at a median relative error of 2.47 against 0.045 and the job at
    # 156 against 45.5 (docs/RESULTS.md section 45), although each layer's own damped error fell
    guard_rows: int = 8
    train_norms: bool = True      # the block's norm weights train too (AdamW)
    # bf16 autocast for the stage's forward passes (teacher and student blocks, the refinement's input captures)
    # and its training; None = where the device has native bf16. The refinement's solves stay fp32.
    autocast: bool | None = None
    # the refinement's sums over tokens (H, C, T) as bf16 products of each batch's deviations from its means, the
    # means' part in fp32 (activations.product_sum), summed in fp32; None = when the passes run under bf16 autocast.
    # Equal perplexity after the stage on 128 rows (74.00 against 73.97, docs/RESULTS.md section 43)
    sums_bf16: bool | None = None
    max_memory_gb: float = 4.0    # above this the activations are memory-mapped files instead of tensors
    seed: int = 0

    def validate(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"blocks.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "refine_rounds", "refine_samples", "descent_passes", "guard_rows"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"blocks.{name} must be >= 0, got {getattr(self, name)}")
        if self.samples % self.batch_size:
            raise ValueError(f"blocks.samples ({self.samples}) must be a multiple of blocks.batch_size "
                             f"({self.batch_size})")
        if self.refine_inputs not in REFINE_INPUTS:
            raise ValueError(f"unknown refine_inputs {self.refine_inputs!r}; choose one of {', '.join(REFINE_INPUTS)}")
        if self.loss not in BLOCK_LOSSES:
            raise ValueError(f"unknown block loss {self.loss!r}; choose one of {', '.join(BLOCK_LOSSES)}")
        for name in ("latent_lr", "scale_lr"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"blocks.{name} must be a finite number >= 0, got {v}")
        for name in ("target_damp", "metric_damp"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"blocks.{name} must be a finite number > 0, got {v}")
        if self.damp_reference not in DAMP_REFERENCES:
            raise ValueError(f"unknown blocks.damp_reference {self.damp_reference!r}; choose one of "
                             f"{', '.join(DAMP_REFERENCES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"blocks.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.max_memory_gb > 0:
            raise ValueError(f"blocks.max_memory_gb must be > 0, got {self.max_memory_gb}")

    def to_dict(self) -> dict:
        return asdict(self)


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """Reconstruction loss of a block's output. "relative" weighs every token equally: a few tokens with
    massive activations (common from the middle blocks on) would otherwise dominate a plain MSE."""
    out, target = out.float(), target.float()
    if kind == "relative":
        return token_losses(out, target, kind).mean()
    if kind == "mse":
        return F.mse_loss(out, target)
    raise ValueError(f"unknown block loss {kind!r}")


def token_losses(out: torch.Tensor, target: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """The block loss of each token, flattened: ||s - t||^2 / ||t||^2 ("relative") or the mean squared error over
    the hidden size ("mse"). Their mean is block_loss (for both kinds: every token has the same hidden size)."""
    out, target = out.float(), target.float()
    if kind == "relative":
        return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)).reshape(-1)
    if kind == "mse":
        return (out - target).pow(2).mean(-1).reshape(-1)
    raise ValueError(f"unknown block loss {kind!r}")


# -------------------------------------------------------------------------------------------- stage
@dataclass
class BlockRecord:
    block: int
    loss_before: float            # block loss of the initialized (or refined) block on the prefix's output
    loss_after: float
    refine_ratio: float | None = None   # mean over the block's layers of output error after / before refinement
    seconds: float = 0.0
    steps: int = 0
    # the median over tokens of the loss after: a few tokens whose massive activation the student puts one position
    # off carry relative errors of 10^2-10^3 and can double the mean of 16k tokens (docs/RESULTS.md section 36)
    loss_after_median: float | None = None
    # calibration rows the block was refined and measured on: fewer than BlockConfig.samples when the stage's time
    # budget cut them (BlockReconstruction's time_budget)
    rows: int | None = None
    # the refinement was undone: it raised the block's loss on the guard rows (BlockConfig.guard_rows)
    reverted: bool = False


class BlockReconstruction:
    """Runs the block stage on `student` (a RaBiT-quantized copy of `teacher`) in place.

    calibration: (samples, seq_len) token ids. run_dir: where per-block results go (resume); None keeps
    nothing (no resume). time_budget: seconds the stage should take (from run()'s start); after each block the
    remaining blocks' rows are cut to what fits (budget_rows, from the block's measured time: its refinement's
    solves, which do not depend on the rows, and the rest, which grows with them). Rows only shrink, so every
    block's inputs come from the already-refined prefix; the budget applies to the refinement-only stage (epochs
    0: block training keeps its rows). None: every block uses all rows."""

    def __init__(self, teacher: nn.Module, student: nn.Module, calibration: torch.Tensor, config: BlockConfig,
                 run_dir: str | os.PathLike | None = None, progress: bool = True,
                 time_budget: float | None = None):
        config.validate()
        if time_budget is not None and not time_budget >= 0:
            raise ValueError(f"the block stage's time budget must be >= 0 seconds, got {time_budget}")
        self.time_budget = time_budget if config.epochs == 0 else None
        # rows the current block's passes and refinement use (budget_rows shrinks it between blocks)
        self.rows = config.samples
        if calibration.ndim != 2 or calibration.shape[0] < config.samples:
            raise ValueError(f"block reconstruction needs ({config.samples}, seq_len) calibration tokens, got "
                             f"{tuple(calibration.shape)}")
        self.teacher, self.student, self.cfg = teacher, student, config
        self.tokens = calibration[: config.samples]
        self.run_dir = Path(run_dir) / "blocks" if run_dir is not None else None
        self.progress = progress
        self.device = next(student.parameters()).device
        from .trainer import native_bf16

        self.autocast = native_bf16(self.device) if config.autocast is None else bool(config.autocast)
        self.sums_bf16 = self.autocast if config.sums_bf16 is None else bool(config.sums_bf16)
        self.t_layers = decoder_layers(teacher)
        self.s_layers = decoder_layers(student)
        if len(self.t_layers) != len(self.s_layers):
            raise ValueError("teacher and student have different numbers of decoder blocks")
        self.records: list[BlockRecord] = []
        # the structure checks' answers per (block class, layer name[, kind]): _adds_to_output, _adds_to_stream,
        # _ends_module
        self._adds_cache: dict[tuple, bool | int | None] = {}
        # student block outputs the refinement already computed for the current block (first row of a batch ->
        # output), used by run()'s pass that writes the next block's inputs
        self._known_outputs: dict[int, torch.Tensor] = {}
        self._solve_seconds = 0.0
        # (solve seconds, seconds, rows) of each block this session ran: the time budget's measurements
        self._timings: list[tuple[float, float, int]] = []

    def _autocast(self):
        """The stage's precision for a forward pass (its passes and block training alike)."""
        return autocast_context(self.device, self.autocast)

    def refine_rows(self) -> int:
        """The rows the current block's refinement uses: refine_rows(cfg), at most the rows the budget left."""
        return min(refine_rows(self.cfg), self.rows)

    # ------------------------------------------------------------------------------------ resume state
    def _progress_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "progress.json"

    def _identity(self) -> dict:
        import hashlib

        digest = hashlib.sha256(self.tokens.to(torch.int64).numpy().tobytes()).hexdigest()
        return {"config": self.cfg.to_dict(), "tokens_sha256": digest, "blocks": len(self.s_layers)}

    def _load_done(self) -> int:
        """Load the blocks finished by an earlier session into the student; returns how many."""
        path = self._progress_path()
        if path is None or not path.exists():
            return 0
        from safetensors.torch import load_file

        from .checkpoint import CheckpointError

        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); remove the folder {self.run_dir} to redo the "
                                  "block stage") from None
        saved = state.get("identity")
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            saved["config"] = {**BLOCK_FIELDS_ADDED, **saved["config"]}
        if saved != json.loads(json.dumps(self._identity())):
            raise CheckpointError(f"{self.run_dir} holds a block stage with other settings or calibration data; "
                                  "remove it (or use another run folder) to start the block stage over")
        records = state.get("records", [])
        for rec in records:
            i = rec["block"]
            file = self.run_dir / f"block_{i:03d}.safetensors"
            try:
                tensors = load_file(file)
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
                raise CheckpointError(f"{file} is missing or damaged ({e}); remove {self.run_dir} to redo the "
                                      "block stage") from None
            missing, unexpected = self.s_layers[i].load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{file} does not fit block {i}: missing {missing[:3]}, unexpected "
                                      f"{unexpected[:3]}")
            self.records.append(BlockRecord(**rec))
            if rec.get("rows"):
                self.rows = min(self.rows, int(rec["rows"]))
        if state.get("next_rows"):   # the time budget's decision after the last block saved
            self.rows = min(self.rows, int(state["next_rows"]))
        return len(records)

    def _save_block(self, i: int) -> None:
        if self.run_dir is None:
            return
        from ..atomic_io import atomic_save_safetensors, atomic_write_json

        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.s_layers[i].state_dict().items()}
        atomic_save_safetensors(state, self.run_dir / f"block_{i:03d}.safetensors")
        atomic_write_json(self._progress_path(), {"identity": self._identity(), "next_rows": self.rows,
                                                  "records": [asdict(r) for r in self.records]})

    # ----------------------------------------------------------------------------------------- pieces
    def _store(self, name: str) -> ActivationStore:
        shape = (self.cfg.samples, self.tokens.shape[1], _hidden_size(self.teacher))
        need_gb = 3 * shape[0] * shape[1] * shape[2] * 4 / 2**30
        if need_gb <= self.cfg.max_memory_gb:
            return ActivationStore(shape)
        where = self.run_dir / "activations" if self.run_dir is not None else Path(tempfile.mkdtemp())
        return ActivationStore(shape, where / f"{name}.f32")

    def _forward_all(self, layer, kw, src: ActivationStore, dst: ActivationStore | None,
                     target: ActivationStore | None = None, cov: LayerCovariance | None = None,
                     inputs: dict[str, list[torch.Tensor]] | None = None, input_rows: int = 0,
                     known: dict[int, torch.Tensor] | None = None, rows: int | None = None) -> float:
        """dst[j] = layer(src[j]) for every batch (of the first `rows` rows; None: all the current rows); returns the
        mean block loss against target (if given), and keeps the tokens' losses in self._token_losses.
        With `inputs` ({layer name: []}), the named layers' inputs of the batches within the first input_rows
        rows are appended to it as (tokens, in) fp32 (one copy for layers fed the same tensor), so that the
        refinement needs no second pass for them. known: {first row of a batch: layer's output on it}, already
        computed (the refinement's last step), used instead of a pass."""
        bs = self.cfg.batch_size
        per_token: list[torch.Tensor] = []
        batch_inputs: dict[int, tuple] = {}
        capturing = {"on": False}

        def make(name):
            def pre(module, args):
                if capturing["on"]:
                    inputs[name].append(flat_input(batch_inputs, args[0]))
            return pre

        handles = [layer.get_submodule(n).register_forward_pre_hook(make(n)) for n in (inputs or {})]
        try:
            for j in range(0, self.rows if rows is None else rows, bs):
                if cov is not None:
                    cov.enabled = j < self.refine_rows()
                    cov.next_batch()
                batch_inputs.clear()
                capturing["on"] = j + bs <= input_rows
                if known is not None and j in known:
                    out = known.pop(j)
                else:
                    with self._autocast():
                        out = layer_output(layer(src.data[j:j + bs].to(self.device), **kw)).float()
                if target is not None:
                    per_token.append(token_losses(out, target.data[j:j + bs].to(self.device), self.cfg.loss).cpu())
                if dst is not None:
                    dst.data[j:j + bs] = out.cpu()
        finally:
            for h in handles:
                h.remove()
        self._token_losses = torch.cat(per_token) if per_token else torch.empty(0)
        # the mean of the batches' means, as the loss trained on (equal-sized batches: the mean over tokens)
        return sum(float(t.mean()) for t in per_token) / max(len(per_token), 1)

    def _refine_layer(self, layer: RaBiTLinear, w: torch.Tensor, H: torch.Tensor, preferred: torch.Tensor) -> float:
        """Refine one layer's paths towards w in the metric H; returns output error after / before."""
        t0 = time.perf_counter()
        new, errors = refine_paths(w, layer.paths(), H, rounds=self.cfg.refine_rounds,
                                   damp=self.cfg.metric_damp, act_order=self.cfg.act_order,
                                   descent=self.cfg.descent_passes, damp_reference=self.cfg.damp_reference)
        if errors[-1] < errors[0]:
            layer.load_paths(new, preferred)
            if layer.mode == "coupled":
                # start the shared latent where its derivation gives the refined signs exactly
                with torch.no_grad():
                    layer.latent.copy_(coupled_latent(new, preferred=preferred))
                layer._cache = None
        # the part of a block's time that does not grow with its rows (the time budget's model)
        self._solve_seconds += time.perf_counter() - t0
        return errors[-1] / errors[0] if errors[0] > 0 else 1.0

    @torch.no_grad()
    def _refine_sequential(self, i: int, kw: dict, x_q: ActivationStore, y_fp: ActivationStore,
                           fp_inputs: dict[str, list[torch.Tensor]], x_fp: ActivationStore,
                           plan: tuple[list[list[str]], bool]) -> list[float]:
        """GPTQ-order refinement of block i: each group of layers fed one tensor (q/k/v, then o, gate/up, down)
        is refined on the inputs the student block gives it now (quantized prefix, earlier groups already
        refined); with refine_inputs == "corrected" its target is the teacher's output on the FP inputs
        (fp_inputs: the teacher block's layer inputs per batch of the refinement rows, captured by run()).
        plan: _layer_plan's groups and whether the last one fits the block's output."""
        cfg = self.cfg
        t_block, s_block = self.t_layers[i], self.s_layers[i]
        layers = _rabit_modules(s_block)
        bs = cfg.batch_size
        batches = [(j, j + bs) for j in range(0, self.refine_rows(), bs)]
        corrected = cfg.refine_inputs in _CORRECTED
        low = self.sums_bf16
        ratios = []
        x0 = x_q.data[0:bs].to(self.device)
        groups, to_output = plan
        # Once the layer that ends a sub-module (the attention's o_proj) is refined, the later groups' passes over
        # these rows take that module's output from its kept inputs instead of running it again (q/k/v, RoPE and
        # attention do not change any more): forward_from_layer
        key = {"j": 0}
        kept: dict[int, torch.Tensor] = {}
        reuse = contextlib.nullcontext()
        for g, group in enumerate(groups):
            if to_output and g == len(groups) - 1:
                with reuse:
                    ratios.append(self._refine_to_block_output(t_block, s_block, kw, group[0], x_q, y_fp, batches,
                                                               key))
                continue
            ends = None
            if not kept and len(group) == 1 and g < len(groups) - 1:
                ends = self._ends_module(s_block, kw, x0, group[0])
            # "residual": a single layer whose output joins the block's input stream inside the block also takes
            # up the stream's error, x_T - x_S, on top of its corrected target W a_T (E = sum (x_T - x_S) a_S^T)
            stream = (cfg.refine_inputs == "residual" and g < len(groups) - 1 and len(group) == 1
                      and self._adds_to_stream(s_block, kw, x0, group[0]))
            H = C = E = None
            # token count and input sums (student's, teacher's) for layers with a bias: see _fit_bias
            sums = {"n": 0, "q": 0.0, "fp": 0.0}
            for b, (j0, j1) in enumerate(batches):
                def accumulate(name, xq, b=b, j0=j0, j1=j1):
                    nonlocal H, C, E
                    with no_autocast(xq):   # called inside the (bf16) pass: the sums stay fp32
                        h = product_sum(xq, xq, low)
                        H = h if H is None else H + h
                        sums["n"] += xq.shape[0]
                        sums["q"] = sums["q"] + xq.float().sum(0)
                        if corrected:
                            c = product_sum(fp_inputs[name][b], xq, low)
                            C = c if C is None else C + c
                            sums["fp"] = sums["fp"] + fp_inputs[name][b].float().sum(0)
                        if stream:
                            d = (x_fp.data[j0:j1] - x_q.data[j0:j1]).to(self.device).float()
                            e = product_sum(d.reshape(-1, d.shape[-1]), xq, low)
                            E = e if E is None else E + e
                key["j"] = j0
                keep = (ends.layer.register_forward_pre_hook(lambda m, a, j0=j0: kept.__setitem__(j0, a[0].detach()))
                        if ends is not None else None)
                try:
                    with reuse, self._autocast():
                        run_capturing(s_block, kw, x_q.data[j0:j1].to(self.device), group[:1], accumulate)
                finally:
                    if keep is not None:
                        keep.remove()
            # with a bias the layers fit their inputs' deviations from the mean, and the bias the mean
            center = E is None and all(layers[name].bias is not None for name in group)
            s_ref = sums["fp"] if C is not None else sums["q"]   # the sum of the inputs the targets are W of
            if center:
                H, C = centered_sums(H, sums["q"], sums["n"], C, sums["fp"] if C is not None else None)
            for name in group:
                w = t_block.get_submodule(name).weight.detach().float()
                if E is not None:
                    target = output_target(w, H, w @ C + E, cfg.target_damp, cfg.damp_reference)
                elif C is not None:
                    target = corrected_target(w, H, C, cfg.target_damp, cfg.damp_reference)
                else:
                    target = w
                ratios.append(self._refine_layer(layers[name], target, H, preferred=target))
                if center:
                    source_bias = t_block.get_submodule(name).bias
                    s_t = w @ s_ref
                    if source_bias is not None:
                        s_t = s_t + sums["n"] * source_bias.detach().float()
                    self._fit_bias(layers[name], sums["q"], s_t, sums["n"])
                fp_inputs.pop(name, None)
            if ends is not None:
                reuse = forward_from_layer(ends.parent, ends.layer, ends.rest, kept, key)
        return ratios

    def _ends_module(self, s_block: nn.Module, kw: dict, x0: torch.Tensor, name: str) -> _EndsModule | None:
        """The sub-module that the named layer ends (module_returns_layer), checked once per block class and layer
        name, when keeping that layer's inputs over the refinement rows fits in a quarter of max_memory_gb."""
        if "." not in name:
            return None
        parent_name = name.rsplit(".", 1)[0]
        key = (type(s_block).__qualname__, name, "ends")
        if key not in self._adds_cache:
            self._adds_cache[key] = module_returns_layer(s_block, kw, x0, parent_name, name)
        rest = self._adds_cache[key]
        layer = s_block.get_submodule(name)
        width = getattr(layer, "in_features", x0.shape[-1])
        nbytes = self.refine_rows() * x0.shape[1] * width * (2 if self.autocast else 4)
        if rest is None or not self._fits_quarter(nbytes):
            return None
        return _EndsModule(s_block.get_submodule(parent_name), layer, rest)

    def _layer_plan(self, s_block: nn.Module, kw: dict, x_q: ActivationStore) -> tuple[list[list[str]], bool]:
        """The block's quantized layers in the order it calls them, grouped by shared input (q/k/v, then o, gate/up,
        down), and whether the last group (one layer whose output is added to the block's output) is refined
        against the teacher block's output ("block" and "residual"), which needs no teacher inputs for it."""
        x0 = x_q.data[0:self.cfg.batch_size].to(self.device)
        groups = layer_groups(s_block, kw, x0, list(_rabit_modules(s_block)))
        to_output = (self.cfg.refine_inputs in ("block", "residual") and len(groups[-1]) == 1
                     and self._adds_to_output(s_block, kw, x0, groups[-1][0]))
        return groups, to_output

    @staticmethod
    @torch.no_grad()
    def _fit_bias(layer: RaBiTLinear, s: torch.Tensor, s_t: torch.Tensor, n: int) -> None:
        """Set the layer's bias to the mean of what its paths leave: mean(t) - Q mean(x~) (ops.refine.fitted_bias)
        for targets t on inputs x~ with sums s_t, s over n tokens."""
        layer.bias.copy_(fitted_bias(reconstruct(layer.paths()), s, s_t, n))
        layer._cache = None

    def _adds_to_stream(self, block: nn.Module, kw: dict, x: torch.Tensor, name: str) -> bool:
        """_adds_to_stream, checked once per block class and layer name (one block pass each time)."""
        key = (type(block).__qualname__, name, "stream")
        if key not in self._adds_cache:
            self._adds_cache[key] = _adds_to_stream(block, kw, x, name)
        return self._adds_cache[key]

    def _adds_to_output(self, block: nn.Module, kw: dict, x: torch.Tensor, name: str) -> bool:
        """_adds_to_output, checked once per block class and layer name (two block passes each time)."""
        key = (type(block).__qualname__, name)
        if key not in self._adds_cache:
            self._adds_cache[key] = _adds_to_output(block, kw, x, name)
        return self._adds_cache[key]

    @torch.no_grad()
    def _refine_to_block_output(self, t_block, s_block, kw, name: str, x_q: ActivationStore, y_fp: ActivationStore,
                                batches, key: dict | None = None) -> float:
        """Refine the block's last layer L (block output = rest + L(m)) so that the student block's output
        matches the teacher block's: each token's target is t = y_teacher - (y_student - L(m~)), what L must
        output for the block to land on the teacher's output (the rest carries the residual stream's error)."""
        layer = s_block.get_submodule(name)
        H = T = None
        sums = {"n": 0, "m": 0.0, "t": 0.0}
        # The block's output after L is refined is rest + L_new(m) on the same rows: keep rest and m (L's input as
        # the block gave it) when they fit, so that run() need not pass these rows through the block again.
        keep = self.cfg.epochs == 0
        kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Size]] = {}
        for j0, j1 in batches:
            if key is not None:
                key["j"] = j0
            cap = {}

            def pre(module, args):
                cap["x"] = args[0].detach()
                cap["m"] = cap["x"].reshape(-1, args[0].shape[-1]).float()

            def post(module, args, out):
                cap["d"] = out.detach().reshape(-1, out.shape[-1]).float()

            handles = [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
            try:
                with self._autocast():
                    y_s = layer_output(s_block(x_q.data[j0:j1].to(self.device), **kw)).float()
            finally:
                for h in handles:
                    h.remove()
            shape = y_s.shape
            y_s = y_s.reshape(-1, y_s.shape[-1])
            y_t = y_fp.data[j0:j1].to(self.device).reshape(-1, y_s.shape[-1])
            rest = y_s - cap["d"]
            t = y_t - rest
            m = cap["m"]
            h, tm = product_sum(m, m, self.sums_bf16), product_sum(t, m, self.sums_bf16)
            H = h if H is None else H + h
            T = tm if T is None else T + tm
            sums["n"] += m.shape[0]
            sums["m"] = sums["m"] + m.sum(0)
            sums["t"] = sums["t"] + t.sum(0)
            if keep and not kept:   # decided on the first batch, from the tensors as the block gives them
                keep = self._keep_fits(rest, cap["x"], j1 - j0)
            if keep:
                kept[j0] = (rest, cap["x"], shape)
        w = t_block.get_submodule(name).weight.detach().float()
        if layer.bias is not None:   # fit the deviations from the means, the bias the means (as _refine_sequential)
            H, T = centered_sums(H, sums["m"], sums["n"], T, sums["t"])
        target = output_target(w, H, T, self.cfg.target_damp, self.cfg.damp_reference)
        ratio = self._refine_layer(layer, target, H, preferred=target)
        if layer.bias is not None:
            self._fit_bias(layer, sums["m"], sums["t"], sums["n"])
        with torch.no_grad():
            while kept:     # each batch's kept tensors freed as its output is made: never both sets at once
                j0, (rest, x, shape) = kept.popitem()
                with self._autocast():
                    d = layer(x)
                self._known_outputs[j0] = (rest + d.reshape(-1, d.shape[-1]).float()).reshape(shape)
        return ratio

    def _keep_fits(self, rest: torch.Tensor, x: torch.Tensor, batch_rows: int) -> bool:
        """Whether the refinement rows' last-layer inputs and the rest of the block's output (what run() reuses
        instead of a second pass), at the sizes and dtypes of one batch's (under bf16 autocast the inputs are bf16),
        fit in a quarter of max_memory_gb. The outputs made from them replace them batch by batch, so they are
        never all held beside them."""
        per_row = (rest.untyped_storage().nbytes() + x.untyped_storage().nbytes()) / batch_rows
        return self._fits_quarter(per_row * self.refine_rows())

    def _fits_quarter(self, nbytes: int) -> bool:
        """Whether tensors the refinement keeps over its rows (instead of another pass) fit in a quarter of
        max_memory_gb."""
        return nbytes <= 0.25 * self.cfg.max_memory_gb * 2**30

    @torch.no_grad()
    def _warm_up(self, i: int, kw: dict, x_fp: ActivationStore) -> None:
        """One batch through teacher and student block i, the outputs discarded, before the first block's clock
        starts: the first passes at the stage's shapes pay one-time costs (the first matmuls at a new shape,
        presumably oneDNN creating its kernels): the first block's passes took 6.5-6.7 s at 256 rows on a Zen 5 core
        pair where later blocks' took 4.9-5.3, 5.95 after this warm-up (docs/RESULTS.md section 46); what remains of
        them keeps the time budget from deciding on that block (_fit_budget)."""
        x = x_fp.data[0:self.cfg.batch_size].to(self.device)
        with self._autocast():
            self.t_layers[i](x, **kw)
            self.s_layers[i](x, **kw)

    def _build_native_kernels(self) -> None:
        """Build (or load) the refinement's native CPU kernels before the first block's clock starts: compiled on
        first use in a fresh install, they would count in the first block's time."""
        if self.device.type != "cpu" or self.cfg.refine_rounds <= 0 or self.cfg.refine_samples <= 0:
            return
        load_native_kernels(descent=self.cfg.descent_passes > 0)

    def _refine(self, i: int, cov: LayerCovariance) -> list[float]:
        """Refinement in the metric of the full-precision inputs (refine_inputs == "fp")."""
        ratios = []
        teacher_block = self.t_layers[i]
        for name, layer in _rabit_modules(self.s_layers[i]).items():
            H = cov.h.get(name)
            if H is not None:
                w = teacher_block.get_submodule(name).weight.detach().float()
                ratios.append(self._refine_layer(layer, w, H, preferred=w))
        return ratios

    @torch.no_grad()
    def _guard_losses(self, i: int, kw: dict, x_q: ActivationStore, y_fp: ActivationStore) -> tuple[float, float]:
        """(mean, median) per-token block loss of student block i on the guard rows (the first whole batches)."""
        bs = self.cfg.batch_size
        rows = min(-(-self.cfg.guard_rows // bs) * bs, self.rows)
        mean = self._forward_all(self.s_layers[i], kw, x_q, None, target=y_fp, rows=rows)
        return mean, float(self._token_losses.median())

    def _guard(self, i: int, kw: dict, x_q: ActivationStore, y_fp: ActivationStore) -> tuple:
        """The unrefined block's state (a copy) and its guard-row losses, for _undo_if_worse."""
        state = {k: v.detach().clone() for k, v in self.s_layers[i].state_dict().items()}
        return state, self._guard_losses(i, kw, x_q, y_fp)

    def _undo_if_worse(self, i: int, kw: dict, x_q: ActivationStore, y_fp: ActivationStore, guard: tuple) -> bool:
        """Put block i back to its unrefined state when the refinement raised both the mean and the median of its
        loss on the guard rows (either alone can move with a few tokens whose massive activation the student puts
        one position off, section 36 of docs/RESULTS.md); returns whether it did."""
        state, (mean0, median0) = guard
        mean1, median1 = self._guard_losses(i, kw, x_q, y_fp)
        if not (mean1 > mean0 and median1 > median0):
            return False
        self.s_layers[i].load_state_dict(state)
        self._known_outputs.clear()   # the refined block's outputs
        tqdm.write(f"block {i + 1}: refinement undone (loss on the guard rows {mean0:.4g} -> {mean1:.4g}, median "
                   f"{median0:.4g} -> {median1:.4g})")
        return True

    def _train_block(self, i: int, kw: dict, x_q: ActivationStore, y_fp: ActivationStore) -> int:
        cfg = self.cfg
        block = self.s_layers[i]
        # Only the block's parameters can receive gradients (its inputs are constants); which of them train:
        # prepare_student's rule (RaBiT latents and scales as their mode says, 1-D parameters yes, other
        # matrices no), then this stage's options. The flags are restored afterwards.
        was = [(p, p.requires_grad) for p in block.parameters()]
        rabit_params = {id(p) for m in _rabit_modules(block).values() for p in m.parameters()}
        latents = {id(p) for m in _rabit_modules(block).values() for p in m.latent_parameters()}
        prepare_student(block)
        for p in block.parameters():
            if (id(p) not in rabit_params and not cfg.train_norms) or (id(p) in latents and cfg.latent_lr == 0):
                p.requires_grad_(False)
        split = split_parameters(block)
        per_epoch = cfg.samples // cfg.batch_size
        steps = per_epoch * cfg.epochs
        optim = Optimizers(split, OptimConfig(latent_lr=cfg.latent_lr, scale_lr=cfg.scale_lr, warmup_steps=0,
                                              min_lr_ratio=cfg.min_lr_ratio), steps)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        bar = tqdm(total=steps, desc=f"block {i + 1}/{len(self.s_layers)}", unit="step",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        block.train()
        try:
            for _ in range(cfg.epochs):
                for b in torch.randperm(per_epoch, generator=gen).tolist():
                    j = b * cfg.batch_size
                    x = x_q.data[j:j + cfg.batch_size].to(self.device)
                    with self._autocast():
                        out = layer_output(block(x, **kw))
                    loss = block_loss(out, y_fp.data[j:j + cfg.batch_size].to(self.device), cfg.loss)
                    if not torch.isfinite(loss):
                        from .trainer import TrainingDiverged

                        raise TrainingDiverged(f"block {i}: the reconstruction loss is {float(loss)}; try a "
                                               "lower --block-latent-lr / --block-scale-lr")
                    loss.backward()
                    optim.step()
                    optim.zero_grad()
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
        finally:
            bar.close()
            block.eval()
            for p, flag in was:
                p.requires_grad_(flag)
        return steps

    def _fit_budget(self, rec: BlockRecord, remaining: int, seconds_left: float) -> None:
        """Cut the rows of the remaining blocks to what seconds_left affords, from the blocks done so far: a
        block's solves take the same time for any rows, the rest (passes, input captures and sums, all over its
        rows) grows in proportion. Each is the median over the blocks this session ran at the current rows (the
        time per row grows with the rows): one slow block (the machine's speed wanders by a quarter from block to
        block) does not cut the rows for good, nor does one decision cut more than BUDGET_MAX_CUT of them.
        The session's first block decides nothing and is left out of the model: it carries the one-time costs
        of the first passes and solves at the stage's shapes (12.4-13.3 s against 10-11 s for the next blocks at
        the same 256 rows in the demo's job on Zen 5, docs/RESULTS.md section 47: alone it cut the rows to 224 where
        256 fitted), and waiting one block costs at most that block's excess over the budget."""
        first = not self._timings
        solve = min(self._solve_seconds, rec.seconds)
        self._timings.append((solve, rec.seconds, rec.rows))
        if first:
            return
        fixed, per_row = block_time_model([t for t in self._timings[1:] if t[2] == rec.rows])
        self.rows = budget_rows(self.rows, remaining, seconds_left, fixed, per_row, self.cfg.batch_size,
                                floor=MIN_BUDGET_ROWS)

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> list[BlockRecord]:
        # every pass here but block training's needs no gradient: causal attention on the native kernel where it
        # applies (rabit.kernels.attention; ~19 % of the stage's time on torch's kernel, docs/RESULTS.md section 48)
        with fast_attention():
            return self._run()

    def _run(self) -> list[BlockRecord]:
        cfg = self.cfg
        start = time.perf_counter()
        done = self._load_done()
        n = len(self.s_layers)
        if done >= n:
            return self.records
        self.teacher.eval()
        self.student.eval()
        self._build_native_kernels()
        x_fp, x_q, y_fp = self._store("x_fp"), self._store("x_q"), self._store("y_fp")
        try:
            with torch.no_grad():
                kwargs = capture_block_inputs(self.teacher, self.tokens, cfg.batch_size, x_fp)
                kwargs = [to_device(k, self.device) for k in kwargs]
                x_q.data.copy_(x_fp.data)
                # resume: run both prefixes through the blocks already reconstructed
                for i in range(done):
                    self._forward_all(self.t_layers[i], kwargs[i], x_fp, x_fp)
                    self._forward_all(self.s_layers[i], kwargs[i], x_q, x_q)
                if done < n:
                    self._warm_up(done, kwargs[done], x_fp)
            outer = tqdm(range(done, n), desc="blocks", unit="block", disable=not self.progress,
                         dynamic_ncols=True, initial=done, total=n)
            for i in outer:
                t0 = time.perf_counter()
                self._solve_seconds = 0.0
                kw = kwargs[i]
                refine = cfg.refine_rounds > 0 and cfg.refine_samples > 0
                fp_metric = refine and cfg.refine_inputs == "fp"
                cov = LayerCovariance(self.t_layers[i], list(_rabit_modules(self.s_layers[i]))) if fp_metric else None
                # the corrected targets need the teacher block's layer inputs: captured in its pass
                fp_inputs = None
                plan = self._layer_plan(self.s_layers[i], kw, x_q) if refine and not fp_metric else None
                if plan is not None and cfg.refine_inputs in _CORRECTED:
                    groups, to_output = plan
                    # the last layer's teacher inputs are not needed when it fits the block's output (for the
                    # default model's down_proj: 1536 values a token, ~0.8 GB at 256 rows of 512 tokens)
                    fp_inputs = {name: [] for group in (groups[:-1] if to_output else groups) for name in group}
                with torch.no_grad():
                    try:
                        self._forward_all(self.t_layers[i], kw, x_fp, y_fp, cov=cov, inputs=fp_inputs,
                                          input_rows=self.refine_rows())
                    finally:
                        if cov is not None:
                            cov.remove()
                guard = self._guard(i, kw, x_q, y_fp) if refine and cfg.guard_rows > 0 else None
                if fp_metric:
                    ratios = self._refine(i, cov)
                else:
                    ratios = self._refine_sequential(i, kw, x_q, y_fp, fp_inputs or {}, x_fp, plan) if refine else []
                del cov, fp_inputs
                reverted = guard is not None and self._undo_if_worse(i, kw, x_q, y_fp, guard)
                steps = 0
                if cfg.epochs > 0:
                    with torch.no_grad():
                        before = self._forward_all(self.s_layers[i], kw, x_q, None, target=y_fp)
                    steps = self._train_block(i, kw, x_q, y_fp)
                with torch.no_grad():
                    # the refinement keeps outputs only when no block training follows it
                    after = self._forward_all(self.s_layers[i], kw, x_q, x_q, target=y_fp, known=self._known_outputs)
                self._known_outputs.clear()
                if cfg.epochs == 0:   # nothing changes the block between the two measurements
                    before = after
                x_fp, y_fp = y_fp, x_fp   # the teacher's outputs are the next block's inputs
                rec = BlockRecord(block=i, loss_before=before, loss_after=after,
                                  refine_ratio=sum(ratios) / len(ratios) if ratios else None,
                                  seconds=time.perf_counter() - t0, steps=steps,
                                  loss_after_median=float(self._token_losses.median()), rows=self.rows,
                                  reverted=reverted)
                self.records.append(rec)
                if self.time_budget is not None:   # decided before the save, which keeps the decision
                    self._fit_budget(rec, n - i - 1, self.time_budget - (time.perf_counter() - start))
                self._save_block(i)
                outer.set_postfix(loss=f"{before:.3g}->{after:.3g}", rows=self.rows, refresh=False)
            outer.close()
        finally:
            for s in (x_fp, x_q, y_fp):
                s.close()
        return self.records


@torch.no_grad()
def _adds_to_output(block: nn.Module, kw: dict, x: torch.Tensor, name: str) -> bool:
    """Whether the block's output is (something) + the named layer's output, as in Llama, Qwen and Mistral
    blocks (not Gemma's, which normalizes the MLP output first): checked on x by zeroing the layer's output."""
    layer = block.get_submodule(name)
    seen = {}

    def record(module, args, out):
        seen["d"] = out

    def zero(module, args, out):
        return torch.zeros_like(out)

    handle = layer.register_forward_hook(record)
    try:
        y = layer_output(block(x, **kw)).float()
    finally:
        handle.remove()
    handle = layer.register_forward_hook(zero)
    try:
        y0 = layer_output(block(x, **kw)).float()
    finally:
        handle.remove()
    d = seen["d"].float()
    if d.shape != y.shape:
        return False
    return bool((y - y0 - d).norm() <= 1e-4 * (y.norm() + d.norm()))


@torch.no_grad()
def _adds_to_stream(block: nn.Module, kw: dict, x: torch.Tensor, name: str) -> bool:
    """Whether some module of the block, called after the named layer, takes x + (the layer's output) as its
    input: the layer's output joins the block's input stream there (Llama's o_proj: the post-attention norm
    reads x + o_proj(a)); not where it is normalized first (Gemma's post-attention norm)."""
    layer = block.get_submodule(name)
    seen = {"d": None, "hit": False}

    def record(module, args, out):
        seen["d"] = out.detach().float()

    def check(module, args):
        d = seen["d"]
        if d is None or seen["hit"] or not args or not isinstance(args[0], torch.Tensor):
            return
        a = args[0]
        if a.shape == x.shape == d.shape and a.dtype.is_floating_point:
            expect = x.float() + d
            seen["hit"] = bool((a.float() - expect).norm() <= 1e-4 * (expect.norm() + d.norm()))

    handles = [layer.register_forward_hook(record)]
    handles += [m.register_forward_pre_hook(check) for n, m in block.named_modules() if n and m is not layer]
    try:
        block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return seen["hit"]


@dataclass
class _EndsModule:
    parent: nn.Module     # e.g. the attention module
    layer: nn.Module      # its last layer (o_proj), whose output it returns as it is
    rest: int             # the Nones after it in the parent's output tuple (0: a bare tensor)


def _rabit_modules(block: nn.Module) -> dict[str, RaBiTLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, RaBiTLinear)}


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", None)
    cfg = text() if callable(text) else cfg
    size = getattr(cfg, "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().embedding_dim
    return int(size)
