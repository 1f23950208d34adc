"""What the user sees at the end of a run: the loss-curve PNG and the summary table."""
from __future__ import annotations

import math
from pathlib import Path


def plot_losses(rows: list[dict], path: str | Path, gamma: float | None = None, title: str | None = None) -> Path:
    """Plot total / KL / (gamma x) MSE per step, log-scale, from log.jsonl rows; write a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    series = [("loss", "total loss", 1.0), ("kl", "KL(teacher || student)", 1.0)]
    if gamma:
        series.append(("mse", f"{gamma:g} x hidden MSE", gamma))
    for key, label, mult in series:
        ys = [r.get(key, float("nan")) * mult for r in rows]
        if any(math.isfinite(y) and y > 0 for y in ys):
            ax.plot(steps, ys, label=label, linewidth=1.0, alpha=0.85,
                    marker="o" if len(steps) < 20 else None)  # a short run would show no line at all
            # A moving average makes the trend readable through the per-batch noise.
            w = max(1, len(ys) // 20)
            if w > 1:
                avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
                ax.plot(steps, avg, color=ax.lines[-1].get_color(), linewidth=2.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or "RaBiT distillation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def summary_markdown(s: dict) -> str:
    """A short Markdown table from the summary dict the quantize command builds."""
    ev = s.get("eval", {})
    k = s.get("num_paths", 2)
    st = s.get("stages") or {}
    sw = ev.get("stage_windows")  # intermediate stages scored on the first sw windows only (None: on all)
    rot = s.get("rotation")
    rot = (f", residual stream rotated{' with the attention values' if rot.get('values') else ''} (seed "
           f"{rot.get('seed')})") if rot else ""
    lines = [f"RaBiT {k}-bit ({s.get('mode')}) of {s.get('model')}{rot}", "",
             f"Perplexity: {ev.get('description', '')}"
             + (f"; the intermediate stages on the first {sw} of them" if sw else ""), ""]
    if sw:
        lines += [f"| model | perplexity | first {sw} windows | stage time |", "|---|---|---|---|"]
    else:
        lines += ["| model | perplexity | stage time |", "|---|---|---|"]

    def secs(key):
        return f"{_fmt(st.get(key), '.0f')} s" if st.get(key) is not None else "-"

    def row(what, full, stage, time_key):
        cells = [what] + ([_fmt(full), _fmt(stage)] if sw else [_fmt(stage if full is None else full)])
        return "| " + " | ".join(cells + [secs(time_key) if time_key else ""]) + " |"

    lines.append(row("full precision", ev.get("fp"), ev.get("fp_stage"), None))
    if ev.get("init") is not None:
        lines.append(row(f"{k}-bit after initialization (no training)", None, ev.get("init"), "init_seconds"))
    if ev.get("blocks") is not None:
        lines.append(row(f"{k}-bit after the block-wise stage", None, ev.get("blocks"), "blocks_seconds"))
    if ev.get("e2e") is not None:
        lines.append(row(f"{k}-bit after end-to-end distillation", None, ev.get("e2e"), "e2e_seconds"))
        lines.append(row(f"{k}-bit after the scale-only phase", ev.get("final"), ev.get("final_stage"),
                         "scale_seconds"))
    else:
        lines.append(row(f"{k}-bit after distillation", ev.get("final"), ev.get("final_stage"), "e2e_seconds"))
    ood = ev.get("ood")
    if ood:
        lines += ["", f"Out of domain: {ood.get('description')}", "", "| model | perplexity |", "|---|---|",
                  f"| full precision | {_fmt(ood.get('fp'))} |", f"| {k}-bit | {_fmt(ood.get('final'))} |"]
    t = s.get("train", {})
    lines += ["", "| training | |", "|---|---|",
              f"| steps | {t.get('steps')} |",
              f"| tokens | {t.get('tokens'):,} |" if t.get("tokens") is not None else "| tokens | - |",
              f"| training time | {_fmt(t.get('seconds'), '.0f')} s |",
              f"| throughput | {_fmt(t.get('tokens_per_second'), '.0f')} tokens/s |",
              f"| distillation loss (held-out) before -> after | {_fmt((t.get('val_before') or {}).get('loss'), '.4f')}"
              f" -> {_fmt((t.get('val_after') or {}).get('loss'), '.4f')} |",
              f"| total wall time | {_fmt(s.get('wall_seconds'), '.0f')} s |"]
    bos = s.get("bos") or {}
    for what, key in (("training/calibration", "train"), ("evaluation", "eval")):
        if isinstance(bos.get(key), dict):   # which BOS rule the run followed, and who chose it
            b = bos[key]
            lines.append(f"| BOS ({what}) | {'on' if b.get('use') else 'off'} "
                         f"({'from the tokenizer' if b.get('source') == 'tokenizer' else 'set by flag'}) |")
    return "\n".join(lines) + "\n"
