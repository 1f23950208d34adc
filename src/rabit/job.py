"""JobSpec: everything a `rabit quantize` job is, as one object built once (from the command line or from Python).

Its dataclass defaults are the only defaults of the job: the command line (rabit.cli.options) reads them from
here, `rabit ablate` builds its cells as JobSpecs, `rabit ptq` takes its RaBiT, data and evaluation settings
from one, and the multi-process path receives the same object. `run_record` is what run.json stores, and
`identity_changes` is the one place that decides which settings define a run (checked on --resume, and
against a checkpoint's training settings).

Stages are sub-configs: a new stage (e.g. block-wise reconstruction before distillation) adds a field holding
its own dataclass with its own defaults; consumers that do not run that stage never look at it, and
`run_record` stores it under its field name (a run written before the stage existed is read with the stage's
defaults through ADDED_SETTINGS).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import RaBiTConfig
from .run_identity import to_plain
from .models import DEFAULT_MODEL
from .run_identity import identity_changes, train_settings_changes  # noqa: F401 - part of the job's API
from .data import MIXES
from .train.blockwise import BlockConfig
from .train.optim import OptimConfig
from .train.loop import PROVISIONAL_STEPS, warmup_steps_for
from .train.trainer import TrainConfig


# training sequence lengths when --seq-len is left unset (default_seq_len, measured below)
LATENT_SEQ_LEN = 512
FROZEN_SEQ_LEN = 256


@dataclass
class DataSpec:
    # comma-separated corpora: built-in names, .txt/.jsonl files or folders, hf:... The default mixes two domains
    # (encyclopedic text and drama) and leaves Austen out, so that EvalSpec.ood_data is a domain never trained on.
    train: str = "wikitext2-valid,shakespeare"
    # training sequence length; left unset (JobSpec.auto_seq_len) it follows whether the latents train
    # (default_seq_len): 256 with frozen latents, 512 when they train
    seq_len: int = FROZEN_SEQ_LEN
    val_fraction: float = 0.05       # held-out share of the training text
    val_sequences: int = 4           # held-out sequences for the before/after distillation loss (0: skip)
    calib: str | None = None         # calibration corpus (None: the first training corpus)
    calib_samples: int = 16
    calib_len: int = 512
    bos: bool | None = None          # start training/calibration sequences with BOS (None: the tokenizer's rule)
    # how several corpora are mixed: "size" (in proportion to their sizes) or "equal" (the same number of
    # sequences from each), for training and the block stage's calibration (rabit.data.training_sequences). By size
    # the default mix is 68 % Shakespeare; equal, the 13-minute job went 41.9-42.2 -> 40.5 / 39.2 on WikiText-2 (seeds
    # 0 / 1) and 54.1-54.6 -> 55.9 / 54.9 on Persuasion, the hour 37.6 -> 34.9 and 51.0 -> 51.8, PIQA 0.573 -> 0.580
    # (docs/RESULTS.md section 51)
    mix: str = "equal"
    # what a `teacher[:TOKENS]` source (text sampled from the full-precision model, rabit.teacher_text) stands for
    # once the job has sampled it or found it cached: source -> the .jsonl file; set by the job, not an option
    sampled: dict = field(default_factory=dict, repr=False)

    @property
    def sources(self) -> list[str]:
        """The training corpora as the data module reads them (a sampled `teacher` source as its file)."""
        return [self.sampled.get(s, s) for s in _sources(self.train)]

    @property
    def calib_sources(self) -> list[str]:
        return [self.sampled.get(s, s) for s in self.declared_calib_sources]

    @property
    def declared_sources(self) -> list[str]:
        """The training corpora as given (`teacher:TOKENS` by that name): what defines the run."""
        return _sources(self.train)

    @property
    def declared_calib_sources(self) -> list[str]:
        return _sources(self.calib) if self.calib else self.declared_sources[:1]

    def teacher_sources(self) -> dict[str, int]:
        """{source: tokens} for every `teacher[:TOKENS]` source among the training and calibration corpora."""
        from .teacher_text import parse_teacher_source

        out = {}
        for s in self.declared_sources + self.declared_calib_sources:
            n = parse_teacher_source(s)
            if n is not None:
                out[s] = n
        return out


EVAL_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class EvalSpec:
    data: str = "wikitext2-test"
    seq_len: int = 2048
    windows: int = 16                # the first N windows (0: the whole corpus, ~13 min per model on 2 CPU cores)
    bos: bool = False                # prefix each window with BOS
    skip_init: bool = False          # do not measure the initialized model
    # Intermediate stages (after initialization, after the block stage, before a scale-only phase) are scored on
    # the first stage_windows windows only (the FP and final models also report that figure, for free): each
    # 16-window evaluation costs ~2.3 minutes of the demo on 2 cores. 0: score them like the final model.
    stage_windows: int = 4
    # Perplexity on a domain the default mix does not train on (Jane Austen's Persuasion), FP and 2-bit at the end,
    # so that a run reports how it generalizes, not only its training domain. "" or 0 windows: skip.
    ood_data: str = "austen-persuasion"
    ood_windows: int = 8
    # The precision every perplexity of the job (FP and 2-bit alike) is computed in. auto: bf16 autocast where
    # training uses it (a CPU with native bf16, a GPU), else fp32. On the Zen 4 machine bf16 scored a window 1.5x
    # faster and moved the figures by 0.03 % (FP) and 0.05 % (2-bit) on 16 windows (docs/RESULTS.md section 26).
    dtype: str = "auto"

    def autocast(self, train_autocast: bool) -> bool:
        """Whether perplexity runs under bf16 autocast, given whether training does."""
        return train_autocast if self.dtype == "auto" else self.dtype == "bfloat16"

    def description(self) -> str:
        what = (f"the first {self.windows} windows of {self.seq_len} tokens ({self.windows * self.seq_len:,} "
                "tokens; --eval-windows 0 for the whole corpus)" if self.windows
                else f"all windows of {self.seq_len} tokens")
        return f"{self.data}, {what}" + (", BOS-prefixed" if self.bos else "")


@dataclass
class RunSpec:
    out: str | None = None           # run folder (None: runs/<model>-<mode>)
    overwrite: bool = False
    resume: bool = False
    device: str = "cpu"
    progress: bool = True
    threads: int | None = None       # torch CPU threads (None: torch's choice)
    init_cache: bool = True          # reuse initialized paths from the init cache
    verify: bool = True              # check a checkpoint's checksums on --resume
    keep_fp32: bool = False          # saved model: unquantized tensors in fp32 (default: 16 bits)
    embed_bits: int | None = None    # saved model: embedding / full-precision head group-quantized to 8 or 4 bits
    embed_group_size: int = 64


@dataclass
class DistSpec:
    nproc: int | None = None          # processes on this machine (None: one, unless started by torchrun)
    teacher: str = "shard"            # shard | bf16 | replicate
    muon: str = "owner"               # owner (DistributedMuon) | dtensor
    timeout_minutes: float = 60.0     # minutes a rank waits in a collective (rank 0 initializes alone)
    memory_report: bool = False


# Sized for the default model on 2 CPU cores (docs/TRAINING.md): batch 1 x 4 micro-batches of 512 tokens per
# step (Muon's orthogonalization costs ~1.6 micro-batches on CPU, so fewer, larger steps are faster); KL only
# (gamma 0: perplexity 411 vs 486 with the relative hidden loss at gamma 10 and 801 with the paper's MSE at
# gamma 100, 24k tokens on SmolLM2, docs/RESULTS.md section 2); a checkpoint every 10 steps.
# The latent weights stay frozen at the refined signs and only scales and norms train (--train-latents trains
# them too, with Muon): after the block stage's refinement, at this budget, training the latents raised the
# training loss on the same batches and scored worse in and out of domain (docs/RESULTS.md section 13, latent lr
# 3e-3; at 1e-4 on an AMX CPU, where a latent step costs about the same per token, they tie: section 39).
# Without Muon a step costs the same per token at any size, so the job takes one sequence per step (80 steps of
# 512 tokens): 78.3 / 76.3 against 82.4 / 78.4 with 20 steps of 4 (WikiText-2 / Persuasion, section 15).
# LATENT_ROWS: the sequences per step when the latents train (TrainConfig's 1 x 4, sized for Muon), taken as one
# micro-batch of 4: the same rows, loss and update (to fp32 summation order), ~1.15x the tokens/s on 2 Zen 5 cores
# (4 x 512-token rows: the backward's per-layer passes, the effective weights' casts and the scale gradients run
# once per step instead of four times; docs/RESULTS.md section 53).
LATENT_ROWS = TrainConfig.batch_size * TrainConfig.grad_accum
FROZEN_GRAD_ACCUM = 1
# Shorter sequences continue that trend: from the same refined start, at the Zen 3 demo's 12,800 tokens, 50 steps
# of 256 tokens reached 68.6 / 68.7 where 25 steps of 512 reached 74.3 / 70.6 (seed 0; seed 1 in section 34), and
# 100 steps of 128 74.7 / 70.0, slower per token (per-step overhead): docs/RESULTS.md section 34. Latent training
# keeps 512-token rows (its Muon steps average 4 of them; not measured at 256). LATENT_SEQ_LEN and FROZEN_SEQ_LEN
# are defined above DataSpec, whose default is the frozen one.
# A rotated model (rabit.rotation) trains its scales at a smaller learning rate (AdamW) with frozen latents: from
# the same rotated starts, 50 steps of 256 tokens at 3e-4 reached 59.8 / 66.0 and 60.5 / 64.4, where 1e-3 reached
# 63.1 / 70.4 and 64.8 / 69.3 and 1e-4 62.5 / 67.4 and 61.7 / 66.6 (seeds 0 / 1, WikiText-2 / Persuasion); the
# unrotated model lost at 3e-4 (77.0 / 73.0 and 70.2 / 71.9 against 70.6 / 71.2 and 68.6 / 70.6 at 1e-3):
# docs/RESULTS.md section 35.
# Latent training from the block stage's refined start takes a far smaller Muon rate than the 3e-3 sized for a
# plain initialization (section 2) or the 1e-3 of sections 20-26's starts: at the 13-minute demo's budget on an AMX
# Xeon (section 39; rotated, 47-49 steps of 2,048 tokens), latent lr 1e-3 with scale lr 1e-3 sent the KL from 0.61
# to 1.13 within 7 steps and ended at 69.9 / 82.8 (held-out loss 0.593 -> 0.723), where 1e-4 with scale lr 3e-4
# stayed below it and ended at 50.1 / 57.7 (0.593 -> 0.513; the frozen-latent demo: 50.9-51.4 / 57.6-57.7). The
# two rates were changed together; rotated, the scales take 3e-4 when the latents train.
# With frozen latents, from the block stage of today's 13-minute job (AMX Xeon, 256 block rows, bias, sign descent;
# benchmarks/train_from_blocks.py), half that rate won: 200 steps of 256 tokens at 1.5e-4 reached 44.10 / 56.52 and
# 42.29 / 54.74 where 3e-4 reached 44.34 / 56.93 and 42.77 / 55.18 (seeds 0 / 1; 6e-4 45.30 / 58.43 and 1e-4
# 42.76 / 54.81), and at 60 steps the two tied (44.42 / 56.59 against 44.51 / 56.55, seed 1), the held-out loss
# lower at 1.5e-4 in every pair: docs/RESULTS.md section 44.
SCALE_LR = 1e-3
ROTATED_SCALE_LR = 3e-4
ROTATED_FROZEN_SCALE_LR = 1.5e-4
REFINED_LATENT_LR = 1e-4


def default_scale_lr(rotated: bool, train_latents: bool = False) -> float:
    """AdamW learning rate of scales and norms when --scale-lr is left unset."""
    if not rotated:
        return SCALE_LR
    return ROTATED_SCALE_LR if train_latents else ROTATED_FROZEN_SCALE_LR


def default_latent_lr(train_latents: bool, block_stage: bool) -> float:
    """Muon learning rate of the latents when --latent-lr is left unset: smaller when they start from the block
    stage's refinement. Frozen latents keep OptimConfig's (unused) value."""
    return REFINED_LATENT_LR if train_latents and block_stage else OptimConfig.latent_lr


def default_split(train_latents: bool) -> tuple[int, int]:
    """(batch_size, grad_accum) of an optimizer step when --batch-size and --grad-accum are left unset."""
    return (LATENT_ROWS, 1) if train_latents else (1, FROZEN_GRAD_ACCUM)


def default_seq_len(train_latents: bool) -> int:
    """Training sequence length when --seq-len is left unset."""
    return LATENT_SEQ_LEN if train_latents else FROZEN_SEQ_LEN


def _default_train() -> TrainConfig:
    # the defaults rotate where the model allows it (JobSpec.rotate None), as the default model does
    return TrainConfig(train_latents=False, grad_accum=FROZEN_GRAD_ACCUM,
                       optim=dataclasses.replace(TrainConfig().optim,
                                                 scale_lr=default_scale_lr(rotated=True)))


def _default_rabit() -> RaBiTConfig:
    # rotated (the default where the model allows it), the initialization does without preconditioning; every
    # quantized layer gets a bias, which the block stage sets (RESULTS.md section 36)
    return RaBiTConfig(precondition=False, add_bias=True)


@dataclass
class JobSpec:
    model: str = DEFAULT_MODEL
    # end-to-end token budget (steps = tokens // tokens per step; 160 steps of one 256-token sequence with frozen
    # latents).
    # After the block stage's refinement it reached perplexity 76.4 where 16,384 tokens reached 164 (docs/
    # RESULTS.md section 10). The whole job: 27 minutes on 2 idle AVX2 cores without native bf16 (section 14);
    # less with bf16 AMX.
    tokens: int = 40_960
    # or a time budget: end-to-end training takes about this many minutes of steps, whatever the machine (the steps
    # are chosen from the first steps' measured time; evaluations are not counted, checkpoint writes are)
    train_minutes: float | None = None
    # or a budget for the whole job: end-to-end training gets the minutes that loading, initialization, the block
    # stage and an estimate of the final evaluation leave (decided once, after the block stage; see
    # rabit.cli.quantize.job_training_seconds), so that the job ends about this long after it started
    job_minutes: float | None = None
    warmup: float = 0.05              # a fraction of the steps if < 1, else a number of steps
    # True when batch_size / grad_accum were left at their defaults: a multi-process run may then regroup the
    # rows of an optimizer step so that each process gets whole rows (same global batch and schedule).
    auto_split: bool = True
    # True when --seq-len was left unset: the training sequence length follows whether the latents train
    auto_seq_len: bool = True
    # True when --scale-lr was left unset: the scales' learning rate follows the rotation
    auto_scale_lr: bool = True
    # True when --latent-lr was left unset: the latents' learning rate follows whether they train from the block
    # stage's refined start
    auto_latent_lr: bool = True
    # True when neither --precondition nor --no-precondition was given: the initialization preconditions the weight
    # by channel importance only on an unrotated model (rotated, the block stage's refinement ends at the same output
    # error from a plain ISVID start, and the calibration pass the importance needs is most of the init's time)
    auto_precondition: bool = True
    # True when --refine-samples was left unset: the refinement uses all the block stage's rows (with blocks that do
    # not train, rows beyond the refinement's only cost time: --block-samples 352 alone once ran 46 s longer for an
    # identical model, docs/RESULTS.md section 49)
    auto_refine_samples: bool = True
    rabit: RaBiTConfig = field(default_factory=_default_rabit)
    train: TrainConfig = field(default_factory=_default_train)  # steps/warmup_steps/autocast are resolved here
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    run: RunSpec = field(default_factory=RunSpec)
    dist: DistSpec = field(default_factory=DistSpec)
    # Stages between initialization and end-to-end distillation, and after it (docs/TRAINING.md):
    block_stage: bool = True          # block-wise stage (closed-form refinement; + block training if blocks.epochs)
    blocks: BlockConfig = field(default_factory=BlockConfig)
    scale_tokens: int = 0             # token budget of a final end-to-end phase training only scales and norms
    # Before calibration: fold the norms and rotate the residual stream by a random orthogonal matrix (seeded by
    # train.seed), and with rotate_values each attention head's values too (rabit.rotation; same function, weights
    # without outlier channels; the saved model stores an untied head). None: wherever the architecture allows it
    # (resolved when the model is loaded, rabit.cli.quantize.load_teacher)
    rotate: bool | None = None
    rotate_values: bool = True

    @property
    def rotation(self) -> str:
        """none | residual | residual+values: the rewrite rotate / rotate_values ask for (rotate resolved)."""
        if self.rotate is None:
            raise RuntimeError("JobSpec.rotate is resolved when the model is loaded (load_teacher)")
        return "none" if not self.rotate else "residual+values" if self.rotate_values else "residual"

    # ---------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Every check that needs neither the model nor the data (done before anything is loaded or launched)."""
        t, d, e = self.train, self.data, self.eval
        checks = [("--tokens", self.tokens, 1), ("--seq-len", d.seq_len, 2), ("--batch-size", t.batch_size, 1),
                  ("--grad-accum", t.grad_accum, 1), ("--save-every", t.save_every, 1),
                  ("--calib-samples", d.calib_samples, 1), ("--calib-len", d.calib_len, 2),
                  ("--eval-seq-len", e.seq_len, 2), ("--eval-windows", e.windows, 0),
                  ("--stage-eval-windows", e.stage_windows, 0),
                  ("--val-sequences", d.val_sequences, 0), ("--num-paths", self.rabit.num_paths, 1)]
        for flag, value, low in checks:
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if d.mix not in MIXES:
            raise ValueError(f"--data-mix must be one of {', '.join(MIXES)}, got {d.mix!r}")
        if self.run.resume and self.run.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 <= d.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {d.val_fraction}")
        if self.run.threads is not None and self.run.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.run.threads}")
        if self.dist.nproc is not None and self.dist.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.dist.nproc}")
        if self.dist.timeout_minutes <= 0:
            raise ValueError(f"--dist-timeout must be > 0, got {self.dist.timeout_minutes}")
        _ = d.sources, d.calib_sources  # raise on an empty corpus list
        d.teacher_sources()  # raise on a malformed teacher:TOKENS
        if self.scale_tokens < 0:
            raise ValueError(f"--scale-tokens must be >= 0, got {self.scale_tokens}")
        if e.dtype not in EVAL_DTYPES:
            raise ValueError(f"--eval-dtype must be one of {', '.join(EVAL_DTYPES)}, got {e.dtype!r}")
        if e.ood_windows < 0:
            raise ValueError(f"--ood-windows must be >= 0, got {e.ood_windows}")
        if self.block_stage:
            self.blocks.validate()
        self.rabit.validate()
        if self.train_minutes is not None and not self.train_minutes > 0:
            raise ValueError(f"--train-minutes must be > 0, got {self.train_minutes}")
        if self.job_minutes is not None and not self.job_minutes > 0:
            raise ValueError(f"--job-minutes must be > 0, got {self.job_minutes}")
        if self.job_minutes is not None and self.train_minutes is not None:
            raise ValueError("give one time budget: --train-minutes (training) or --job-minutes (the whole job)")
        if self.steps < 1:
            raise ValueError(f"--tokens {self.tokens} is smaller than one optimizer step ({t.batch_size} x "
                             f"{t.grad_accum} x {d.seq_len} = {self.tokens_per_step} tokens)")
        self.train_config(autocast=False).validate()

    def resolve_batch(self) -> None:
        """With --batch-size and --grad-accum left unset (auto_split), the step size follows whether the latents
        train, and so does the sequence length with --seq-len unset (auto_seq_len); the scales' learning rate with
        --scale-lr unset (auto_scale_lr) follows the rotation (rotate None counts as rotated until the
        model is loaded), as does the initialization's preconditioning with neither --precondition nor
        --no-precondition (auto_precondition); the latents' learning rate with --latent-lr unset (auto_latent_lr)
        follows whether they train after the block stage; the refinement's rows with --refine-samples unset
        (auto_refine_samples) are the block stage's: call after changing train.train_latents, rotate,
        block_stage or blocks.samples."""
        if self.auto_split:
            self.train.batch_size, self.train.grad_accum = default_split(self.train.train_latents)
        if self.auto_seq_len:
            self.data.seq_len = default_seq_len(self.train.train_latents)
        if self.auto_scale_lr:
            self.train.optim = dataclasses.replace(self.train.optim,
                                                   scale_lr=default_scale_lr(self.rotate is not False,
                                                                             self.train.train_latents))
        if self.auto_latent_lr:
            self.train.optim = dataclasses.replace(self.train.optim,
                                                   latent_lr=default_latent_lr(self.train.train_latents,
                                                                               self.block_stage))
        if self.auto_precondition:
            self.rabit.precondition = self.rotate is False
        if self.auto_refine_samples:
            self.blocks.refine_samples = self.blocks.samples

    # --------------------------------------------------------------------------------------- derived
    @property
    def out_dir(self) -> Path:
        return Path(self.run.out) if self.run.out else Path("runs") / f"{slug(self.model)}-{self.rabit.mode}"

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.data.seq_len

    @property
    def steps(self) -> int:
        """Optimizer steps of end-to-end training (provisional with a time budget: the loop chooses them)."""
        if self.time_budgeted:
            return PROVISIONAL_STEPS
        return self.tokens // self.tokens_per_step

    @property
    def time_budgeted(self) -> bool:
        """Training's length is a time budget (--train-minutes or --job-minutes), its steps chosen as it runs."""
        return bool(self.train_minutes or self.job_minutes)

    @property
    def scale_steps(self) -> int:
        return self.scale_tokens // self.tokens_per_step

    def scale_train_config(self, autocast: bool | None = None) -> TrainConfig:
        """The TrainConfig of the scale-only phase: the same settings, latents frozen, its own step count."""
        steps = self.scale_steps
        optim = dataclasses.replace(self.train.optim, warmup_steps=warmup_steps_for(self.warmup, steps))
        return dataclasses.replace(self.train, steps=max(steps, 1), optim=optim, train_latents=False,
                                   autocast=self.train.autocast if autocast is None else autocast)

    def train_config(self, autocast: bool | None = None, budget_s: float | None = None) -> TrainConfig:
        """The TrainConfig the trainer runs: steps and warm-up steps from the token budget, autocast resolved.

        With --job-minutes, `budget_s` is the training time the job decided after its block stage; without it the
        config holds the whole job's minutes (what run.json records, the same in every session of a run)."""
        steps = self.steps
        timed = self.time_budgeted
        if budget_s is None:
            budget_s = 60.0 * (self.train_minutes or self.job_minutes) if timed else 0.0
        # a time budget starts with a warm-up as long as its provisional steps: a near-zero rate for its first
        # timed step (the loop sizes a provisional schedule for the next ones)
        warmup = steps if timed else warmup_steps_for(self.warmup, steps)
        optim = dataclasses.replace(self.train.optim, warmup_steps=warmup)
        return dataclasses.replace(self.train, steps=steps, optim=optim, time_budget_s=budget_s,
                                   budget_warmup=self.warmup if timed else TrainConfig.budget_warmup,
                                   autocast=self.train.autocast if autocast is None else autocast)

    def for_processes(self, world_size: int) -> "JobSpec":
        """This job as `world_size` processes run it: the global micro-batch (batch_size rows) must split evenly
        across them. With the default batch, the rows of an optimizer step are regrouped into fewer, larger
        micro-batches (same rows per step, so the same global batch, schedule and result); a batch the user set
        that does not split is an error."""
        t = self.train
        if t.batch_size % world_size == 0:
            return self
        rows = t.batch_size * t.grad_accum
        if self.auto_split and rows < world_size and world_size % rows == 0:
            # a default step smaller than the processes (frozen latents: one sequence): one sequence per process
            # per step, so more sequences per step than one process takes (a resume keeps the process count)
            return dataclasses.replace(self, train=dataclasses.replace(t, batch_size=world_size, grad_accum=1))
        if self.auto_split and rows % world_size == 0:
            batch = next(b for b in range(world_size, rows + 1, world_size) if rows % b == 0)
            return dataclasses.replace(self, train=dataclasses.replace(t, batch_size=batch, grad_accum=rows // batch))
        if self.auto_split:
            raise ValueError(f"an optimizer step of {rows} sequences ({t.batch_size} x {t.grad_accum}) cannot be "
                             f"split evenly across {world_size} processes; choose --batch-size and --grad-accum "
                             f"with a batch divisible by {world_size}")
        raise ValueError(f"--batch-size {t.batch_size} is the global micro-batch and must be divisible by the "
                         f"{world_size} processes (or leave --batch-size and --grad-accum at their defaults to have "
                         "the step split automatically)")

    def split_description(self, world_size: int) -> str:
        t = self.train
        per = t.batch_size // world_size
        return (f"{t.batch_size * t.grad_accum} sequences per step = {t.grad_accum} micro-batch(es) of "
                f"{t.batch_size} ({per} per process x {world_size} process(es))")

    def run_record(self, model_path: str, train_sequences: int, autocast: bool, train_bos: bool = False,
                   eval_bos: bool | None = None) -> dict:
        """run.json: what this run is (compared on --resume with identity_changes)."""
        tcfg = self.train_config(autocast)
        d = self.data
        return to_plain({
            "format": "rabit-quantize-run", "version": 1, "model": self.model, "model_path": model_path,
            "rabit_config": self.rabit.to_dict(), "train": tcfg.to_dict(),
            # the token budget; None with a time budget, whose steps are chosen as it runs (summary.json has them)
            "tokens": None if self.time_budgeted else self.steps * self.tokens_per_step,
            "data": {"train": d.declared_sources, "mix": d.mix, "seq_len": d.seq_len, "val_fraction": d.val_fraction,
                     "train_sequences": int(train_sequences), "calib": d.declared_calib_sources,
                     "calib_samples": d.calib_samples, "calib_len": d.calib_len, "bos": bool(train_bos)},
            "eval": {"data": self.eval.data, "seq_len": self.eval.seq_len, "windows": self.eval.windows,
                     "bos": self.eval.bos if eval_bos is None else bool(eval_bos), "val_sequences": d.val_sequences, "skip_init": self.eval.skip_init,
                     "stage_windows": self.eval.stage_windows,
                     "ood_data": self.eval.ood_data, "ood_windows": self.eval.ood_windows},
            "stages": {"blocks": self.blocks.to_dict() if self.block_stage else None,
                       "scale_tokens": self.scale_steps * self.tokens_per_step},
            # only when set, so that run.json of runs without it stays as it was (a resume compares them)
            **({"job_minutes": self.job_minutes} if self.job_minutes else {}),
            # how the source model was rewritten before quantization (its seed is train.seed); call after
            # load_teacher resolved rotate
            "rotation": self.rotation,
        })


def slug(name: str) -> str:
    base = Path(name.rstrip("/")).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _sources(spec: str) -> list[str]:
    out = [s.strip() for s in spec.split(",") if s.strip()]
    if not out:
        raise ValueError("no training corpus given")
    return out


