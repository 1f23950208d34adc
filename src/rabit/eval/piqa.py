"""PIQA (physical commonsense, 2 choices) from the local copy of the validation split, scored like lm-eval.

lm-eval's official task (lm_eval/tasks/piqa/piqa.yaml): context "Question: {goal}\\nAnswer:", choices
[sol1, sol2] each continued after a " " (the target delimiter), score = sum of the continuation tokens'
log-probabilities. acc = argmax of the score; acc_norm = argmax of score / len(choice) (characters of the
choice, as lm-eval computes it). `score_items` does exactly that with any log-likelihood function;
`model_loglikelihood` is one for a Hugging Face causal LM that tokenizes like lm-eval's HFLM, so this module
also evaluates PIQA without lm-eval installed (and cross-checks it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..data import CORPORA_DIR

__all__ = ["PIQA_DIR", "load_piqa", "context", "requests_for", "score_items", "model_loglikelihood",
           "evaluate_piqa"]

PIQA_DIR = CORPORA_DIR / "piqa"
TARGET_DELIMITER = " "


def load_piqa(split: str = "validation", limit: int | None = None, folder: str | Path | None = None) -> list[dict]:
    """PIQA items [{goal, sol1, sol2, label}] from valid.jsonl + valid-labels.lst (1838 validation items)."""
    if split not in ("validation", "valid"):
        raise ValueError(f"only the PIQA validation split is shipped, not {split!r}")
    folder = Path(folder) if folder is not None else PIQA_DIR
    data, labels = folder / "valid.jsonl", folder / "valid-labels.lst"
    for p in (data, labels):
        if not p.is_file():
            raise FileNotFoundError(f"PIQA file {p} is missing (the package data was not installed)")
    items = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    labs = [int(x) for x in labels.read_text().split()]
    if len(items) != len(labs):
        raise ValueError(f"{data} has {len(items)} items but {labels} has {len(labs)} labels")
    for it, lab in zip(items, labs):
        if lab not in (0, 1):
            raise ValueError(f"PIQA label {lab} is not 0 or 1")
        it["label"] = lab
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        items = items[:limit]
    return items


def context(item: dict) -> str:
    return f"Question: {item['goal']}\nAnswer:"


def choices(item: dict) -> list[str]:
    return [item["sol1"], item["sol2"]]


def requests_for(item: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for one item, in choice order."""
    ctx = context(item)
    return [(ctx, TARGET_DELIMITER + c) for c in choices(item)]


def score_items(items: Sequence[dict], loglikelihood: Callable[[list[tuple[str, str]]], list[float]]) -> dict:
    """acc / acc_norm (and their standard errors) of `items` given a log-likelihood function.

    loglikelihood(list of (context, continuation)) -> list of floats (log p(continuation | context)).
    Ties go to the first choice (numpy argmax, like lm-eval).
    """
    if not items:
        raise ValueError("no PIQA items to score")
    reqs = [r for it in items for r in requests_for(it)]
    lls = list(loglikelihood(reqs))
    if len(lls) != len(reqs):
        raise ValueError(f"loglikelihood returned {len(lls)} values for {len(reqs)} requests")
    acc, acc_norm, preds = [], [], []
    for j, it in enumerate(items):
        ll = [float(v) for v in lls[2 * j: 2 * j + 2]]
        ch = choices(it)
        norm = [v / len(c) if len(c) else -math.inf for v, c in zip(ll, ch)]
        pred = max(range(2), key=lambda i: (ll[i], -i))
        pred_n = max(range(2), key=lambda i: (norm[i], -i))
        preds.append(pred)
        acc.append(float(pred == it["label"]))
        acc_norm.append(float(pred_n == it["label"]))

    def mean_se(v):
        n = len(v)
        m = sum(v) / n
        se = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n) if n > 1 else float("nan")
        return m, se

    a, a_se = mean_se(acc)
    an, an_se = mean_se(acc_norm)
    return {"acc": a, "acc_stderr": a_se, "acc_norm": an, "acc_norm_stderr": an_se, "n": len(items),
            "predictions": preds}


def _encode_pair(tokenizer, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM._encode_pair (causal): trailing spaces of the context move to the continuation; the
    continuation tokens are those of encode(context + continuation) past encode(context)."""
    n_spaces = len(ctx) - len(ctx.rstrip())
    if n_spaces:
        cont = ctx[-n_spaces:] + cont
        ctx = ctx[:-n_spaces]
    whole = tokenizer.encode(ctx + cont)
    ctx_enc = tokenizer.encode(ctx)
    return ctx_enc, whole[len(ctx_enc):]


def model_loglikelihood(model, tokenizer, batch_size: int = 8, max_length: int | None = None
                        ) -> Callable[[list[tuple[str, str]]], list[float]]:
    """A log-likelihood function for `score_items` backed by a causal LM (right-padded batches)."""
    device = next(model.parameters()).device
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)

    @torch.no_grad()
    def fn(reqs: list[tuple[str, str]]) -> list[float]:
        encoded = []
        for ctx, cont in reqs:
            c, t = _encode_pair(tokenizer, ctx, cont)
            if not t:
                raise ValueError(f"continuation {cont!r} encodes to no tokens")
            seq = (c + t)[-(max_length + 1):]
            encoded.append((seq, len(t)))
        out = [0.0] * len(reqs)
        order = sorted(range(len(reqs)), key=lambda i: -len(encoded[i][0]))
        was_training = model.training
        model.eval()
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s: s + batch_size]
                inputs = [encoded[i][0][:-1] for i in idx]
                width = max(len(x) for x in inputs)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for r, x in enumerate(inputs):
                    ids[r, : len(x)] = torch.tensor(x)
                    mask[r, : len(x)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for r, i in enumerate(idx):
                    seq, n_cont = encoded[i]
                    n_in = len(seq) - 1
                    target = torch.tensor(seq[-n_cont:], device=logp.device)
                    rows = logp[r, n_in - n_cont: n_in]
                    out[i] = float(rows.gather(1, target[:, None]).sum())
        finally:
            model.train(was_training)
        return out

    return fn


def evaluate_piqa(model, tokenizer, limit: int | None = None, batch_size: int = 8,
                  items: Iterable[dict] | None = None) -> dict:
    """PIQA validation acc / acc_norm of a causal LM without lm-eval."""
    items = list(items) if items is not None else load_piqa(limit=limit)
    res = score_items(items, model_loglikelihood(model, tokenizer, batch_size=batch_size))
    res.pop("predictions")
    return res
