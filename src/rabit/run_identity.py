"""Which settings define a run: the one rule used for run.json on --resume and for a checkpoint's training settings."""
from __future__ import annotations

import json


def to_plain(d: dict) -> dict:
    """d as JSON would give it back (tuples become lists), so that records compare equal to what was stored."""
    return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------------------ run identity
# run.json keys that may change between a run and its --resume (they do not affect the trained model).
# "distributed" marked multi-process runs before one checkpoint reader served both (any process count resumes).
# "tokens" is train.steps x the step's rows x seq_len, all compared themselves (with a time budget it was a
# provisional figure before it became None).
NON_IDENTITY = ("eval", "save_every", "keep_checkpoints", "progress", "version", "distributed", "tokens")
# Settings added after version 1 of run.json, with the value older runs implicitly used.
ADDED_SETTINGS = {"train.hidden_loss": "mse", "train.train_latents": True, "train.optim.muon_ns_dtype": "auto",
                  "stages.blocks": None, "stages.scale_tokens": 0,
                  "stages.blocks.refine_inputs": "fp",   # runs before it existed refined on FP inputs
                  "stages.blocks.target_damp": 0.01, "stages.blocks.metric_damp": 0.01,
                  "stages.blocks.act_order": False, "stages.blocks.descent_passes": 0,
                  "stages.blocks.damp_reference": "mean", "stages.blocks.guard_rows": 0,
                  "train.time_budget_s": 0.0, "train.budget_warmup": 0.05,
                  "train.budget_refined": False, "train.budget_checks": 0,
                  "data.bos": False, "data.mix": "size", "rotation": "none",
                  "rabit_config.add_bias": False}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k in NON_IDENTITY:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _normalized(record: dict) -> dict:
    flat = {**ADDED_SETTINGS, **_flatten(record)}
    # The rows of an optimizer step define the training; how they are grouped into micro-batches (per process
    # count) does not (the same rows, the same mean loss and gradient, up to float rounding).
    if "train.batch_size" in flat and "train.grad_accum" in flat:
        flat["train.sequences_per_step"] = flat.pop("train.batch_size") * flat.pop("train.grad_accum")
    return flat


def identity_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every setting that differs and defines the run. Works on run.json
    records and, wrapped as {"train": config}, on the training settings a checkpoint stores."""
    a, b = _normalized(to_plain(old)), _normalized(to_plain(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def train_settings_changes(saved: dict | None, current: dict) -> list[tuple[str, object, object]]:
    """identity_changes between a checkpoint's stored TrainConfig dict and this run's (TrainConfig.to_dict())."""
    return identity_changes({"train": saved or {}}, {"train": current})
