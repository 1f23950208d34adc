"""Zero-shot tasks through lm-eval, with our model object wrapped in lm-eval's HFLM.

The model passed in is evaluated as is (a packed 2-bit model runs its packed kernels). Tasks whose data ships
with rabit (see rabit/eval/tasks/, e.g. `piqa`) are defined locally and shadow lm-eval's tasks of the same name,
so they run offline; any other lm-eval task name is passed through and works when its dataset is reachable
(in the Hugging Face datasets cache, or online), with a clear error when it is not.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, UnavailableError

__all__ = ["LOCAL_TASKS_DIR", "local_task_names", "lm_eval_available", "make_task_manager", "check_tasks",
           "prepare_tasks", "PreparedTasks", "evaluate_tasks", "TaskDataError"]

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class TaskDataError(InputError, RuntimeError):
    """A task exists but its data cannot be loaded (not shipped, not cached, and the hub is not reachable)."""


class _DropExpected(logging.Filter):
    """Drops lm-eval warnings that are expected here (our custom_dataset PIQA, a model object for HFLM)."""

    EXPECTED = ("Custom kwargs can be passed", "For example --metadata=", "model kwarg is not of type `str`",
                "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(e in msg for e in self.EXPECTED)


_FILTER = _DropExpected()
for _name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)


def local_task_names(extra_paths: list[str] | None = None) -> list[str]:
    """Names of the tasks defined in LOCAL_TASKS_DIR (and `extra_paths`): the `task:` key of each YAML file."""
    names = []
    for root in [LOCAL_TASKS_DIR, *[Path(p) for p in (extra_paths or [])]]:
        files = [root] if root.is_file() else sorted(root.rglob("*.yaml"))
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except OSError:
                continue
            m = re.search(r"^task:\s*([^\s#]+)", text, re.MULTILINE)
            if m:
                names.append(m.group(1).strip("\"'"))
    return names


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def make_task_manager(tasks: list[str], include_paths: list[str] | None = None):
    """An lm-eval TaskManager with our local tasks (and the task YAML folders `include_paths`); lm-eval's own
    task index (slow to build, ~10-30 s) is included only when some requested name is not defined locally."""
    from lm_eval.tasks import TaskManager

    include_paths = [str(p) for p in (include_paths or [])]
    for p in include_paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"task folder {p} does not exist")
    local = set(local_task_names(include_paths))
    need_defaults = any(t not in local for t in tasks)
    # Our local tasks deliberately override the built-in ones of the same name: quiet that warning.
    index_log = logging.getLogger("lm_eval.tasks._index")
    old = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        return TaskManager(include_path=[str(LOCAL_TASKS_DIR), *include_paths], include_defaults=need_defaults)
    finally:
        index_log.setLevel(old)


def check_tasks(tasks: list[str], task_manager) -> list[str]:
    """Validate task names (globs allowed, as in lm-eval); ValueError naming the unknown ones."""
    if not tasks:
        raise ValueError("no tasks given")
    known = task_manager.all_tasks
    unknown = []
    for t in tasks:
        if t in known:
            continue
        if any(c in t for c in "*?[") and task_manager.match_tasks([t]):
            continue
        unknown.append(t)
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, known, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {'; '.join(hints)}. "
                         f"Tasks that work offline: {', '.join(local_task_names())}")
    expanded = []
    for t in tasks:
        expanded += [t] if t in known else task_manager.match_tasks([t])
    return list(dict.fromkeys(expanded))


def _load_tasks(task_manager, tasks: list[str]):
    """Load the tasks (this downloads/reads their datasets) and turn data failures into TaskDataError."""
    try:
        return task_manager.load(tasks)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        local = set(local_task_names())
        remote = [t for t in tasks if t not in local]
        where = ("the hub is not reachable offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if _offline()
                 else "it is neither in the Hugging Face datasets cache nor downloadable")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskDataError(
            f"cannot load the data of task(s) {', '.join(remote) or ', '.join(tasks)}: {where} "
            f"({type(e).__name__}: {msg[:300]}). Tasks that work offline: {', '.join(sorted(local))}") from e


@contextlib.contextmanager
def _hide_foreign_quantization_config(model):
    """HFLM turns config.quantization_config into a transformers quantizer config, which fails for our own
    quant_method 'rabit'; hide it while the wrapper is built (our model object is already loaded)."""
    cfg = getattr(model, "config", None)
    q = getattr(cfg, "quantization_config", None) if cfg is not None else None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if q is None or str(method) not in ("rabit", "QuantizationMethod.RABIT"):
        yield
        return
    delattr(cfg, "quantization_config")
    try:
        yield
    finally:
        cfg.quantization_config = q


def _metric_table(results: dict, n_samples: dict, backend: str) -> dict[str, dict[str, Any]]:
    out = {}
    for task, metrics in results.items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            if isinstance(value, (int, float)):
                value = float(value)
                row[metric] = None if math.isnan(value) else value
        ns = n_samples.get(task) or {}
        if "effective" in ns:
            row["n"] = int(ns["effective"])
        if "original" in ns:
            row["n_total"] = int(ns["original"])
        row["backend"] = backend
        out[task] = row
    return out


@dataclass
class PreparedTasks:
    """Validated task names with their data loaded, ready for evaluate_tasks (see prepare_tasks)."""

    names: list[str]
    backend: str
    task_manager: Any = None
    loaded: Any = None


def prepare_tasks(tasks: list[str], backend: str = "auto", include_paths: list[str] | None = None
                  ) -> PreparedTasks:
    """Check the task names and load their data, before any model is loaded (so bad input fails fast).

    backend: "lm-eval" (HFLM around the model object), "native" (our own PIQA scorer, piqa only, same
    protocol) or "auto" (lm-eval when installed, else native). include_paths: extra folders of lm-eval task
    YAML files. Raises ValueError for unknown tasks,
    TaskDataError (a RuntimeError) when a task's data cannot be loaded.
    """
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ValueError("no tasks given")
    if backend not in ("auto", "lm-eval", "native"):
        raise ValueError(f"unknown zero-shot backend {backend!r}; choose auto, lm-eval or native")
    if backend == "auto":
        backend = "lm-eval" if lm_eval_available() else "native"
    if backend == "native":
        bad = [t for t in tasks if t != "piqa"]
        if include_paths:
            raise ValueError("task folders (include_paths) need the lm-eval backend")
        if bad:
            raise ValueError(f"the native backend only evaluates piqa, not {', '.join(bad)} "
                             "(install lm-eval: pip install 'rabit[eval]')")
        from .piqa import load_piqa

        load_piqa()  # the data is there and readable
        return PreparedTasks(names=["piqa"], backend="native")
    if not lm_eval_available():
        raise UnavailableError("zero-shot tasks need lm-eval: pip install 'rabit[eval]' (or the native backend "
                               "for piqa)")
    tm = make_task_manager(tasks, include_paths)
    names = check_tasks(tasks, tm)
    loaded = _load_tasks(tm, names) if hasattr(tm, "load") else None
    return PreparedTasks(names=names, backend="lm-eval", task_manager=tm, loaded=loaded)


def evaluate_tasks(model, tokenizer, tasks: list[str] | PreparedTasks, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int | str = 1, backend: str = "auto",
                   seed: int = 1234) -> dict[str, dict]:
    """Evaluate `model` on lm-eval tasks: {task: {metric: value, metric_stderr: value, n, n_total, backend}}.

    tasks: names (validated and loaded here with prepare_tasks(tasks, backend)) or a PreparedTasks.
    limit: the first N examples of each task. The model object is evaluated as is (HFLM(pretrained=model)).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    prep = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(list(tasks), backend)
    if prep.backend == "native":
        from .piqa import evaluate_piqa, load_piqa

        total = len(load_piqa())
        bs = batch_size if isinstance(batch_size, int) else 8
        res = evaluate_piqa(model, tokenizer, limit=limit, batch_size=bs)
        n = res.pop("n")
        return {"piqa": {**res, "n": n, "n_total": total, "backend": "native"}}

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = prep.task_manager
    if prep.loaded is not None:
        loaded = prep.loaded
        prep.loaded = None  # simple_evaluate changes the task objects: use them once
        tm.load = lambda *_a, **_k: loaded  # simple_evaluate would load (and read the data) again
    with _hide_foreign_quantization_config(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=prep.names, task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    finally:
        if "load" in vars(tm):
            del tm.load
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    return _metric_table(out.get("results", {}), out.get("n-samples", {}), "lm-eval")
