"""The command-line options of a job: one table from flags to JobSpec fields, read both ways.

`add_job_arguments` builds the argparse options (their defaults read from JobSpec, the only defaults),
`job_from_args` turns parsed arguments into a JobSpec, and `job_to_argv` turns a JobSpec back into the flags that
reproduce it (rabit ablate runs its cells as `rabit quantize` subprocesses this way).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

from ..config import INITS, LATENT_INITS, MODES, STES
from ..data import MIXES
from ..ops.refine import DAMP_REFERENCES
from ..train.blockwise import BLOCK_LOSSES, REFINE_INPUTS
from ..job import EVAL_DTYPES, JobSpec

TEACHER_MODES = ("shard", "bf16", "replicate")
MUON_MODES = ("owner", "dtensor")


@dataclass(frozen=True)
class Option:
    flag: str
    path: str                  # dotted JobSpec field
    group: str
    help: str
    kind: str = "value"        # value | true (store_true) | false (store_false, the flag turns a default True off)
    type: type | None = None
    choices: tuple | None = None
    append: bool = False


_OPTIONS = [
    Option("--model", "model", "model and output", "model name or local Hugging Face folder (offline)"),
    Option("--out", "run.out", "model and output", "run folder (default: runs/<model>-<mode>)"),
    Option("--overwrite", "run.overwrite", "model and output",
           "start over in a folder that holds another run (removes that run's files only)", "true"),
    Option("--resume", "run.resume", "model and output", "continue the run in --out from its last checkpoint", "true"),
    Option("--no-verify", "run.verify", "model and output",
           "--resume without checking the checkpoint's checksums (at your own risk)", "false"),
    Option("--keep-fp32", "run.keep_fp32", "model and output", "store the unquantized tensors (embeddings, head, "
           "norms) of the saved model in fp32 (default: 16 bits, the source checkpoint's dtype or bf16)", "true"),
    Option("--embed-bits", "run.embed_bits", "model and output", "also quantize the embedding and full-precision "
           "output head of the saved model group-wise to 8 or 4 bits (default: keep them in 16 bits; see "
           "docs/RESULTS.md for the cost)", type=int, choices=(8, 4)),
    Option("--embed-group-size", "run.embed_group_size", "model and output", "values per scale with --embed-bits",
           type=int),
    Option("--device", "run.device", "model and output", "cpu or cuda[:N]"),
    Option("--no-progress", "run.progress", "model and output", "no progress bars", "false"),
    Option("--threads", "run.threads", "model and output",
           "CPU threads for torch (default: torch's choice, usually the number of cores)", type=int),

    Option("--mode", "rabit.mode", "RaBiT layers", "coupled = RaBiT (one shared latent), independent = residual QAT, "
           "frozen = independent with all but the last path frozen", choices=MODES),
    Option("--num-paths", "rabit.num_paths", "RaBiT layers", "binary paths per layer = bits per weight", type=int),
    Option("--init", "rabit.init", "RaBiT layers", "path initialization", choices=INITS),
    Option("--isvid-rounds", "rabit.isvid_rounds", "RaBiT layers", "Gauss-Seidel rounds of iterative residual SVID",
           type=int),
    Option("--svid-power-iters", "rabit.svid_power_iters", "RaBiT layers", "power iterations of each SVID", type=int),
    Option("--no-add-bias", "rabit.add_bias", "RaBiT layers",
           "leave quantized layers without a bias where the source has none (by default each gets one: the block "
           "stage fits the binary paths to their inputs' deviations from the mean and sets the bias to the mean "
           "output error; distillation trains it)", "false"),
    Option("--alpha-in", "rabit.alpha_in", "RaBiT layers", "input-channel preconditioning exponent", type=float),
    Option("--alpha-out", "rabit.alpha_out", "RaBiT layers", "output-channel preconditioning exponent", type=float),
    Option("--ste", "rabit.ste", "RaBiT layers", "straight-through estimator", choices=STES),
    Option("--ste-clip", "rabit.ste_clip", "RaBiT layers", "clipped STE: the bound, in representable magnitudes",
           type=float),
    Option("--latent-init", "rabit.latent_init", "RaBiT layers",
           "coupled mode: start the latent from the original weight or the reconstruction", choices=LATENT_INITS),
    Option("--exclude", "rabit.exclude", "RaBiT layers",
           "module-name regex kept in full precision (repeatable; default: embed, lm_head)", append=True),
    Option("--no-rotate-values", "rotate_values", "RaBiT layers", "rotate the residual stream only, not also each "
           "attention head's values (v_proj rows, o_proj columns)", "false"),
    Option("--no-init-cache", "run.init_cache", "RaBiT layers",
           "always calibrate and initialize from scratch (default: reuse initialized paths from ~/.cache/rabit/init "
           "when the model, init settings and calibration data are the same)", "false"),

    Option("--train-data", "data.train", "data", "training corpora, comma-separated: built-in names (wikitext2-valid, "
           "austen), .txt/.jsonl files or folders, hf:NAME[:CONFIG][:SPLIT], or teacher[:TOKENS]: text sampled "
           "from the full-precision model itself (32768 tokens by default; cached per model, length and seed)"),
    Option("--data-mix", "data.mix", "data", "how several training corpora mix: size (in proportion to their "
           "sizes), equal (the same number of sequences from each, as many as the smallest has) or balanced (the "
           "same share each, every sequence kept: the smaller corpora repeat)", choices=MIXES),
    Option("--seq-len", "data.seq_len", "data", "training sequence length (default: 256 with frozen latents, 512 "
           "with --train-latents)", type=int),
    Option("--val-fraction", "data.val_fraction", "data", "held-out share of the training text", type=float),
    Option("--val-sequences", "data.val_sequences", "data",
           "held-out sequences for the before/after distillation loss (0: skip)", type=int),
    Option("--calib-data", "data.calib", "data", "calibration corpus (default: the first --train-data)"),
    Option("--calib-samples", "data.calib_samples", "data", "calibration sequences", type=int),
    Option("--calib-len", "data.calib_len", "data", "calibration sequence length", type=int),

    Option("--no-blocks", "block_stage", "block-wise stage", "skip the block-wise stage (refinement and block "
           "training) between initialization and end-to-end distillation", "false"),
    Option("--block-samples", "blocks.samples", "block-wise stage", "calibration sequences of the block stage "
           "(drawn from --train-data; --job-minutes cuts the later blocks' to what its budget affords)", type=int),
    Option("--block-seq-len", "blocks.seq_len", "block-wise stage", "their length", type=int),
    Option("--block-epochs", "blocks.epochs", "block-wise stage", "training passes over the samples per block "
           "(0: closed-form refinement only)", type=int),
    Option("--block-batch-size", "blocks.batch_size", "block-wise stage", "sequences per block training step",
           type=int),
    Option("--block-latent-lr", "blocks.latent_lr", "block-wise stage", "Muon learning rate of the latents in "
           "block training (0: scales and norms only)", type=float),
    Option("--block-scale-lr", "blocks.scale_lr", "block-wise stage", "AdamW learning rate of scales and norms in "
           "block training", type=float),
    Option("--block-loss", "blocks.loss", "block-wise stage", "relative (per-token relative error, robust to "
           "massive activations) or mse", choices=BLOCK_LOSSES),
    Option("--refine-rounds", "blocks.refine_rounds", "block-wise stage", "rounds of output-aware refinement "
           "(GPTQ-style signs + least-squares scales) per layer (0: none)", type=int),
    Option("--refine-samples", "blocks.refine_samples", "block-wise stage", "sequences whose activations form the "
           "refinement's output metric (drawn from the --block-samples ones; default: all of them)", type=int),
    Option("--refine-damp", "blocks.target_damp", "block-wise stage", "ridge of the refinement's least-squares "
           "targets, relative to the mean input energy (larger: targets nearer the original weight, less fitted to "
           "the calibration tokens)", type=float),
    Option("--refine-metric-damp", "blocks.metric_damp", "block-wise stage", "damping of the refinement's output "
           "metric H (signs and scales), relative to the mean input energy (larger: nearer a plain weight-space "
           "fit)", type=float),
    Option("--refine-damp-reference", "blocks.damp_reference", "block-wise stage", "what both dampings are "
           "relative to: the mean input energy (mean), or that mean with each channel's energy clipped at 10x the "
           "median channel's (clipped: a few massive-activation channels do not set the damping of all the others; "
           "measured worse on the default model)",
           choices=DAMP_REFERENCES),
    Option("--refine-descent", "blocks.descent_passes", "block-wise stage", "passes of coordinate descent on the "
           "signs after the refinement's rounds, each weight moved to the level that lowers its row's output error "
           "most (0: none)", type=int),
    Option("--refine-guard-rows", "blocks.guard_rows", "block-wise stage", "rows (the first of the stage's, whole "
           "batches) on which each block's refinement is checked against the unrefined block: undone when it raised "
           "both the mean and the median block loss there (0: no check)", type=int),
    Option("--no-refine-act-order", "blocks.act_order", "block-wise stage", "round the refinement's signs in the "
           "columns' natural order instead of GPTQ's act order (decreasing input energy)", "false"),
    Option("--refine-inputs", "blocks.refine_inputs", "block-wise stage", "inputs and targets of the refinement: "
           "block (the student's own inputs, targets the teacher's outputs, and the block's last layer the "
           "teacher block's output), residual (block, and the attention's output projection, where it joins the "
           "residual stream, targets the teacher's stream there), corrected (block without the last-layer rule), "
           "quantized (the student's inputs, GPTQ's sequential rule) or fp (the full-precision inputs)", choices=REFINE_INPUTS),
    Option("--train-latents", "train.train_latents", "distillation", "end-to-end distillation also trains the "
           "latent weights (Muon), RaBiT's full QAT, for budgets of millions of tokens; by default only scales and "
           "norms train: after the block stage, at 40k tokens, 5%% better out of domain, 10%% worse in domain and "
           "25%% cheaper per step (docs/RESULTS.md section 13)",
           "true"),
    Option("--scale-tokens", "scale_tokens", "distillation", "token budget of a final end-to-end phase that trains "
           "only scales and norms, after a --train-latents phase (no Muon: 1.25x cheaper per token on an AVX2 CPU, "
           "~3x with bf16 AMX; 0: none)", type=int),
    Option("--tokens", "tokens", "distillation", "training token budget (the default is ~10 minutes of training on 2 "
           "CPU cores with the default model)", type=int),
    Option("--train-minutes", "train_minutes", "distillation", "a time budget instead of --tokens: end-to-end "
           "training takes about this many minutes on any machine (the steps are chosen after timing the first "
           "3, the first of which runs at a near-zero learning rate; evaluations and checkpoint writes are not "
           "counted)",
           type=float),
    Option("--job-minutes", "job_minutes", "distillation", "a time budget for the whole job instead of --tokens: "
           "after the block stage, end-to-end training gets the minutes left once an estimate of the final "
           "evaluation is set aside (at least a tenth of the budget, at most a minute), so that the job ends about this long after it started on any "
           "machine (a --scale-tokens phase is not counted; `make demo` uses 13)", type=float),
    Option("--batch-size", "train.batch_size", "distillation", "sequences per micro-batch (the global micro-batch "
           "with --nproc; default 1, or 4 with --train-latents; left at the default, a step is split across "
           "processes automatically)", type=int),
    Option("--grad-accum", "train.grad_accum", "distillation", "micro-batches per optimizer step (default 1: with "
           "frozen latents a step costs the same per token at any size and more steps trained better; with "
           "--train-latents a step is one micro-batch of 4 sequences, as Muon's orthogonalization costs about 1.6 "
           "micro-batches of 512 tokens on CPU, so fewer, larger steps are faster, and one micro-batch of 4 is "
           "~1.15x faster than 4 of 1)", type=int),
    Option("--latent-lr", "train.optim.latent_lr", "distillation",
           "Muon learning rate of the latent weights, AdamW-matched RMS (default: 1e-4 after the block stage, "
           "else 3e-3)", type=float),
    Option("--scale-lr", "train.optim.scale_lr", "distillation", "AdamW learning rate of scales and norms (default on a "
           "rotated model: 1.5e-4 with frozen latents, 3e-4 with --train-latents; else 1e-3)", type=float),
    Option("--weight-decay", "train.optim.weight_decay", "distillation", "AdamW weight decay", type=float),
    Option("--latent-weight-decay", "train.optim.latent_weight_decay", "distillation", "Muon weight decay",
           type=float),
    Option("--warmup", "warmup", "distillation", "warm-up: a fraction of the steps if < 1, else a number of steps",
           type=float),
    Option("--min-lr-ratio", "train.optim.min_lr_ratio", "distillation", "cosine decay floor", type=float),
    Option("--gamma", "train.gamma", "distillation", "weight of the per-block hidden-state term (0: logits KL only, "
           "which trained best on SmolLM2 at CPU budgets, see docs/RESULTS.md; the paper uses 100 for Llama, 0 for "
           "Gemma 3)", type=float),
    Option("--hidden-loss", "train.hidden_loss", "distillation", "hidden-state term: mse (the paper's) or relative "
           "(per-token ||s-t||^2/||t||^2, every token and block weighted equally; use a gamma around 1-10)",
           choices=("mse", "relative")),
    Option("--temperature", "train.temperature", "distillation", "KL temperature", type=float),
    Option("--max-grad-norm", "train.max_grad_norm", "distillation", "gradient clipping (0: off)", type=float),
    Option("--gradient-checkpointing", "train.gradient_checkpointing", "distillation",
           "recompute activations in backward", "true"),
    Option("--save-every", "train.save_every", "distillation", "checkpoint every N steps (also at the end)", type=int),
    Option("--muon-ns-steps", "train.optim.muon_ns_steps", "distillation",
           "Newton-Schulz iterations in Muon (fewer is faster, less orthogonal)", type=int),
    Option("--teacher-bf16", "train.teacher_bf16", "distillation",
           "run a bf16 copy of the teacher (more memory; no faster than autocast on CPU)", "true"),
    Option("--seed", "train.seed", "distillation", "seed of the data order and of training", type=int),

    Option("--eval-data", "eval.data", "evaluation", "perplexity corpus"),
    Option("--eval-seq-len", "eval.seq_len", "evaluation", "perplexity window", type=int),
    Option("--eval-windows", "eval.windows", "evaluation",
           "evaluate the first N windows (0 = the whole corpus, ~13 min per model on 2 CPU cores)", type=int),
    Option("--eval-bos", "eval.bos", "evaluation",
           "prefix each perplexity window with BOS even where --bos / the tokenizer says not to", "true"),
    Option("--stage-eval-windows", "eval.stage_windows", "evaluation",
           "score the intermediate stages (init, block stage) on the first N windows only; the FP and final "
           "models report that figure too (0 = as many as --eval-windows)", type=int),
    Option("--skip-init-eval", "eval.skip_init", "evaluation",
           "do not measure the perplexity of the initialized model before training", "true"),
    Option("--eval-dtype", "eval.dtype", "evaluation", "precision of every perplexity the job measures (FP and "
           "2-bit): auto = bf16 autocast where training uses it (native bf16 CPUs, GPUs; 1.5x faster per window, "
           "figures within 0.1%%), else float32", choices=EVAL_DTYPES),
    Option("--ood-data", "eval.ood_data", "evaluation", "a corpus of a domain not trained on, scored FP and 2-bit at "
           "the end (\"\": skip)"),
    Option("--ood-windows", "eval.ood_windows", "evaluation", "its windows of --eval-seq-len tokens (0: skip)",
           type=int),

    Option("--nproc", "dist.nproc", "multi-process (torch.distributed)",
           "train in N processes on this machine (with --device cuda one GPU per process); not needed under torchrun",
           type=int),
    Option("--teacher-placement", "dist.teacher", "multi-process (torch.distributed)",
           "shard the frozen teacher like the student, or keep a full bf16 / full-precision replica on every rank",
           choices=TEACHER_MODES),
    Option("--dist-muon", "dist.muon", "multi-process (torch.distributed)",
           "orthogonalize each latent on one owner rank, or run torch.optim.Muon on the sharded DTensors",
           choices=MUON_MODES),
    Option("--dist-timeout", "dist.timeout_minutes", "multi-process (torch.distributed)",
           "minutes a rank waits in a collective (rank 0 initializes the student alone)", type=float),
    Option("--memory-report", "dist.memory_report", "multi-process (torch.distributed)",
           "write memory.json (peak memory, optimizer-state bytes per rank)", "true"),
]
OPTIONS = {o.flag: o for o in _OPTIONS}
# Flags whose default JobSpec.resolve_batch fills in when they are left unset, and the JobSpec field that says so:
# the batch flags let a multi-process run regroup the rows of a step (auto_split); the training sequence length
# follows whether the latents train, the latents' learning rate whether they train from the block stage's start,
# the scales' learning rate and the preconditioning follow the rotation, and the refinement's rows the block
# stage's. argparse gives them None, so that "unset" can be told from the default.
_AUTO = {"--batch-size": "auto_split", "--grad-accum": "auto_split", "--seq-len": "auto_seq_len",
         "--scale-lr": "auto_scale_lr", "--latent-lr": "auto_latent_lr", "--precondition": "auto_precondition",
         "--refine-samples": "auto_refine_samples"}
# Settings turned on and off by a --x / --no-x pair (added to the parser by add_job_arguments, default None): None
# means "as the job decides" (bf16 where the device has it, BOS as the tokenizer, rotation where supported), except
# for the flags in _AUTO, whose JobSpec field records that neither was given.
_PAIRS = [Option("--bf16", "train.autocast", "", ""), Option("--bos", "data.bos", "", ""),
          Option("--block-bf16", "blocks.autocast", "", ""), Option("--block-bf16-sums", "blocks.sums_bf16", "", ""),
          Option("--rotate", "rotate", "", ""),
          Option("--precondition", "rabit.precondition", "", "")]
_PATHS = {o.flag: o.path for o in _OPTIONS + _PAIRS}


def get_field(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_field(obj, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = JobSpec()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in _OPTIONS:
        g = groups.get(o.group) or groups.setdefault(o.group, parser.add_argument_group(o.group))
        default = get_field(defaults, o.path)
        if o.kind == "true":
            g.add_argument(o.flag, dest=o.path, action="store_true", help=o.help)
        elif o.kind == "false":
            g.add_argument(o.flag, dest=o.path, action="store_false", help=o.help)
        else:
            shown = "" if default is None or "(default:" in o.help else f" (default: {default})"
            g.add_argument(o.flag, dest=o.path, type=o.type, choices=o.choices,
                           metavar=None if o.choices else o.flag[2:].upper().replace("-", "_"),
                           action="append" if o.append else "store",
                           default=None if o.flag in _AUTO or o.append else default, help=o.help + shown)
    import argparse as _argparse

    groups["RaBiT layers"].add_argument(
        "--rotate", dest="rotate", action=_argparse.BooleanOptionalAction, default=None,
        help="before calibration, fold the norms into the layers and rotate the residual stream by a random "
             "orthogonal matrix (seeded by --seed): the same function, weights without outlier channels, a better "
             "2-bit model (docs/TRAINING.md); the saved model then stores its own output head (default: on for "
             "Llama, Mistral and Qwen, which it supports)")
    groups["RaBiT layers"].add_argument(
        "--precondition", dest="rabit.precondition", action=_argparse.BooleanOptionalAction, default=None,
        help="initialize on the weight scaled by input-activation and output-gradient importance from a calibration "
             "pass (--alpha-in, --alpha-out) (default: only on a model that is not rotated; rotated, the block "
             "stage's refinement reaches the same output error from plain ISVID, without the calibration pass)")
    groups["data"].add_argument("--bos", dest="data.bos", action=_argparse.BooleanOptionalAction, default=None,
                                help="start training, calibration and perplexity sequences with BOS (default: as "
                                     "the tokenizer does when encoding text)")
    bf16 = groups["distillation"]
    bf16.add_argument("--bf16", dest="train.autocast", action="store_true", default=None,
                      help="bf16 autocast (default: on where the device has native bf16)")
    bf16.add_argument("--no-bf16", dest="train.autocast", action="store_false", help="train in fp32")
    groups["block-wise stage"].add_argument(
        "--block-bf16", dest="blocks.autocast", action=_argparse.BooleanOptionalAction, default=None,
        help="the block stage's forward passes (and block training) under bf16 autocast; its refinement's solves "
             "stay fp32 (default: on where the device has native bf16)")
    groups["block-wise stage"].add_argument(
        "--block-bf16-sums", dest="blocks.sums_bf16", action=_argparse.BooleanOptionalAction, default=None,
        help="the refinement's sums over tokens (H, targets) as bf16 products of the deviations from each batch's "
             "means, summed in fp32 (default: when the stage's passes run in bf16)")


def job_from_args(args: argparse.Namespace) -> JobSpec:
    """The JobSpec of parsed `rabit quantize` arguments (nothing is checked here: JobSpec.validate does that)."""
    spec = JobSpec()
    values = vars(args)
    for o in _OPTIONS + _PAIRS:
        value = values.get(o.path)
        if o.append and value is not None:
            value = tuple(value)
        if value is None and (o.flag in _AUTO or o.append):
            continue
        _set_field(spec, o.path, value)
    if spec.train_minutes is not None and spec.tokens != JobSpec.tokens:
        raise ValueError("give one training budget: --tokens or --train-minutes, not both")
    if spec.job_minutes is not None and spec.tokens != JobSpec.tokens:
        raise ValueError("give one training budget: --tokens or --job-minutes, not both")
    for field in set(_AUTO.values()):
        setattr(spec, field, all(values.get(_PATHS[f]) is None for f, a in _AUTO.items() if a == field))
    spec.resolve_batch()   # latent training keeps Muon's larger step (one sequence per step is for frozen latents)
    return spec


def job_to_argv(spec: JobSpec) -> list[str]:
    """The `rabit quantize` flags that rebuild `spec` (only those that differ from the defaults)."""
    defaults = JobSpec()
    # what job_from_args gives a resolved flag left unset, for this spec's latents and rotation
    resolved = JobSpec(rotate=spec.rotate)
    resolved.train.train_latents, resolved.block_stage = spec.train.train_latents, spec.block_stage
    resolved.blocks.samples = spec.blocks.samples
    resolved.resolve_batch()
    argv: list[str] = []
    for o in _OPTIONS:
        auto = _AUTO.get(o.flag)
        value, default = get_field(spec, o.path), get_field(resolved if auto else defaults, o.path)
        forced = auto is not None and not getattr(spec, auto)
        if value == default and not forced:
            continue
        if o.kind in ("true", "false"):
            if value != (o.kind == "true"):
                raise ValueError(f"{o.path}={value!r} cannot be expressed with {o.flag}")
            argv.append(o.flag)
        elif o.append:
            for v in value or ():
                argv += [o.flag, str(v)]
        else:
            argv += [o.flag, str(value)]
    for o in _PAIRS:
        value, auto = get_field(spec, o.path), _AUTO.get(o.flag)
        if (value is not None) if auto is None else not getattr(spec, auto):
            argv.append(o.flag if value else "--no-" + o.flag[2:])
    return argv


def flag_for(record_key: str) -> str | None:
    """The flag that sets a run.json setting (by its last component), if one does."""
    last = record_key.rsplit(".", 1)[-1]
    for o in _OPTIONS:
        if o.path.rsplit(".", 1)[-1] == last and o.kind == "value" and not o.append:
            return o.flag
    return None


# run.json settings with a few values, each set by flags rather than by a flag and its value: the flags that give
# each value, by the setting's key in the record (a value missing here is only the default's)
_VALUE_FLAGS = {"rabit_config.precondition": {True: "--precondition", False: "--no-precondition"},
                "data.bos": {True: "--bos", False: "--no-bos"},
                "rabit_config.add_bias": {False: "--no-add-bias"},
                "rotation": {"none": "--no-rotate", "residual": "--rotate --no-rotate-values",
                             "residual+values": "--rotate"}}


def flags_for_value(record_key: str, value) -> str | None:
    """The flags that give a run.json setting of _VALUE_FLAGS the value `value`, if flags do."""
    if not isinstance(value, (bool, str)):
        return None
    return _VALUE_FLAGS.get(record_key, {}).get(value)


def copy_job(spec: JobSpec) -> JobSpec:
    return copy.deepcopy(spec)
