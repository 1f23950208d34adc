"""Diagnosing the paths of a quantized model: how the binary paths of each layer share the work (paper Table 1).

For each quantized layer and its real inputs x on calibration data (the inputs the layer receives inside the
quantized model's own forward pass):

    y_i = g_i * (B_i (h_i * x))          the output of path i (no bias)
    y_t = W_t x                          the full-precision teacher layer on the same x (no bias)

    corr_paths    = Corr(y_1, y_2)       RaBiT: clearly negative (paths correct each other), about -0.35 to -0.5
    corr_residual = Corr(y_t - y_1, y_2) RaBiT: path 2 tracks what path 1 leaves, about 0.58 to 0.65

Standard residual QAT with independent latents drifts to about 0 and weak values. Correlations are Pearson over
all (token, channel) entries of a layer, accumulated over the calibration batches.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .eval.correlation import PearsonAccumulator

__all__ = ["quantized_layers", "layer_paths", "path_correlations", "summarize", "plot_correlations",
           "PAPER_TABLE1"]

# Table 1 of the paper (ranges over layers/models), for reference lines in the plot and the summary.
PAPER_TABLE1 = {
    "rabit": {"corr_paths": (-0.5, -0.35), "corr_residual": (0.58, 0.65)},
    "standard_qat": {"corr_paths": (-0.1, 0.1), "corr_residual": (-0.1, 0.1)},
}


def _is_quantized(module: nn.Module) -> bool:
    from .layer import RaBiTLinear
    from .packed_layer import PackedRaBiTLinear

    return isinstance(module, (RaBiTLinear, PackedRaBiTLinear))


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The RaBiTLinear / PackedRaBiTLinear modules of a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if n and _is_quantized(m)}


@torch.no_grad()
def layer_paths(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The paths (g_i (out,), B_i (out, in) of +-1, h_i (in,)) of a RaBiTLinear or PackedRaBiTLinear, as fp32."""
    paths = None
    if callable(getattr(module, "paths", None)):
        paths = module.paths()
    elif callable(getattr(module, "unpacked", None)):
        unpacked = module.unpacked()
        paths = unpacked.paths() if callable(getattr(unpacked, "paths", None)) else unpacked
    elif callable(getattr(module, "signs", None)) and hasattr(module, "g") and hasattr(module, "h"):
        signs = module.signs()  # PackedRaBiTLinear: (k, out, in) of +-1, scales g (k, out), h (k, in)
        paths = [(module.g[i], signs[i], module.h[i]) for i in range(signs.shape[0])]
    elif hasattr(module, "packed") and hasattr(module, "g") and hasattr(module, "h"):
        from .sign_bits import unpack_signs

        signs = unpack_signs(module.packed, module.out_features, module.in_features)
        paths = [(module.g[i], signs[i], module.h[i]) for i in range(signs.shape[0])]
    if paths is None:
        raise ValueError(f"{type(module).__name__} has no paths() / unpacked() accessor")
    return [(g.detach().float(), B.detach().float(), h.detach().float()) for g, B, h in paths]


def _teacher_weight(teacher: nn.Module, name: str, student_layer: nn.Module) -> torch.Tensor:
    try:
        t = teacher.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the teacher has no module {name!r}: is it the model this one was quantized from?") \
            from None
    w = getattr(t, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(f"teacher module {name!r} ({type(t).__name__}) is not a dense linear layer")
    expect = (student_layer.out_features, student_layer.in_features)
    if tuple(w.shape) != expect:
        raise ValueError(f"teacher module {name!r} has weight shape {tuple(w.shape)}, the quantized layer "
                         f"{expect}: is it the model this one was quantized from?")
    return w.detach()


@torch.no_grad()
def path_correlations(student: nn.Module, teacher: nn.Module, calibration: torch.Tensor, batch_size: int = 4,
                      layers: list[str] | None = None, progress: bool = False
                      ) -> dict[str, dict[str, float]]:
    """Per quantized layer: {corr_paths, corr_residual, rel_err_1, rel_err_all, num_paths, tokens}.

    student: a model with RaBiTLinear or PackedRaBiTLinear layers; teacher: the full-precision model it came
    from (modules of the same names; only their weights are used, the teacher is not run). calibration:
    (n, seq_len) token ids, fed to the student in batches of `batch_size`; each quantized layer sees its real
    inputs x. corr_paths = Corr(y_1, y_2), corr_residual = Corr(y_t - y_1, y_2) (Pearson over all entries);
    rel_err_1 = ||y_t - y_1|| / ||y_t||, rel_err_all = ||y_t - sum_i y_i|| / ||y_t||. With a single path the
    two correlations are NaN. `layers` restricts the diagnosis to some layer names.
    """
    if calibration.ndim != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty (n_samples, seq_len) token tensor, "
                         f"got shape {tuple(calibration.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    found = quantized_layers(student)
    if not found:
        raise ValueError("the model has no quantized (RaBiTLinear / PackedRaBiTLinear) layers to diagnose")
    if layers is not None:
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(f"not quantized layers of the model: {', '.join(missing)}")
        found = {n: found[n] for n in layers}

    device = next(student.parameters()).device
    state: dict[str, dict] = {}
    for name, mod in found.items():
        w_t = _teacher_weight(teacher, name, mod)
        state[name] = dict(w_t=w_t, num_paths=0, acc_paths=PearsonAccumulator(),
                           acc_res=PearsonAccumulator(), sq_t=0.0, sq_e1=0.0, sq_eall=0.0, tokens=0)

    def hook(name: str) -> Callable:
        def fn(module, inputs, output):
            st = state[name]
            x = inputs[0].detach().float().reshape(-1, module.in_features)
            # The dense +-1 planes are rebuilt at each call rather than kept for every layer at once (that
            # would be k fp32 copies of the whole model); the cost is small next to the matmuls below.
            paths = layer_paths(module)
            st["num_paths"] = len(paths)
            ys = [F.linear(x * h.to(x.device), B.to(x.device)) * g.to(x.device) for g, B, h in paths]
            del paths
            y_t = F.linear(x, st["w_t"].to(device=x.device, dtype=torch.float32))
            r1 = y_t - ys[0]
            if len(ys) >= 2:
                st["acc_paths"].add(ys[0], ys[1])
                st["acc_res"].add(r1, ys[1])
            st["sq_t"] += float(y_t.double().square().sum())
            st["sq_e1"] += float(r1.double().square().sum())
            st["sq_eall"] += float((y_t - sum(ys)).double().square().sum())
            st["tokens"] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in found.items()]
    was_training = student.training
    student.eval()
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(calibration.split(batch_size), desc="diagnosing", disable=not progress):
            student(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        student.train(was_training)

    out = {}
    for name, st in state.items():
        norm = math.sqrt(st["sq_t"])
        out[name] = dict(
            corr_paths=st["acc_paths"].value,
            corr_residual=st["acc_res"].value,
            rel_err_1=math.sqrt(st["sq_e1"]) / norm if norm > 0 else float("nan"),
            rel_err_all=math.sqrt(st["sq_eall"]) / norm if norm > 0 else float("nan"),
            num_paths=st["num_paths"],
            tokens=st["tokens"],
        )
    return out


def summarize(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean, min and max of corr_paths / corr_residual over layers (NaNs ignored)."""
    summary = {"layers": len(results)}
    for key in ("corr_paths", "corr_residual", "rel_err_1", "rel_err_all"):
        vals = [r[key] for r in results.values() if not math.isnan(r[key])]
        if vals:
            summary[f"{key}_mean"] = sum(vals) / len(vals)
            summary[f"{key}_min"] = min(vals)
            summary[f"{key}_max"] = max(vals)
    return summary


def _short(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '3.q_proj'."""
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[-1]}.{parts[-1]}" if nums else parts[-1]


def plot_correlations(results: dict[str, dict[str, float]], path, title: str | None = None) -> None:
    """A PNG: corr_paths and corr_residual per layer (in model order), with the paper's RaBiT ranges shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(results)
    xs = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(min(18.0, max(8.0, 0.12 * len(names) + 3.0)), 4.5), dpi=120)
    ref = PAPER_TABLE1["rabit"]
    ax.axhspan(*ref["corr_paths"], color="tab:blue", alpha=0.12, label="paper, RaBiT: Corr(y1, y2)")
    ax.axhspan(*ref["corr_residual"], color="tab:orange", alpha=0.12, label="paper, RaBiT: Corr(yt - y1, y2)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.plot(xs, [results[n]["corr_paths"] for n in names], "o-", ms=3, lw=1, color="tab:blue",
            label="Corr(y1, y2)")
    ax.plot(xs, [results[n]["corr_residual"] for n in names], "s-", ms=3, lw=1, color="tab:orange",
            label="Corr(yt - y1, y2)")
    ax.set_ylim(-1.0, 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("Pearson correlation")
    if len(names) <= 80:
        ax.set_xticks(xs)
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
