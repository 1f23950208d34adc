"""Memory measurement of training processes: peak RSS / CUDA peak, and bytes of (sharded) tensors."""
from __future__ import annotations

import os

import torch

from .fsdp import _local


def _rss_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring peak memory from now: CUDA allocator peak, or the process' peak RSS (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _tensor_bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (local shards of DTensors)."""
    return sum(_tensor_bytes(s.values()) for s in opt.state.values())


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def memory_markdown(reports: list[dict]) -> str:
    """A Markdown table of memory reports (one row per rank of each report)."""
    lines = ["| mode | procs | rank | peak, training steps (MiB) | peak, incl. checkpoint (MiB) | "
             "optimizer state (MiB) | latent params (MiB) | student params (MiB) | teacher params (MiB) | "
             "peak grads (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        for r in rep["ranks"]:
            lines.append(f"| {rep.get('mode')} | {rep['world_size']} | {r['rank']} | "
                         f"{_mib(r.get('train_peak_bytes'))} | {_mib(r['peak_bytes'])} | "
                         f"{_mib(sum(r['optimizer_state_bytes'].values()))} | {_mib(r['latent_param_bytes'])} | "
                         f"{_mib(r['student_param_bytes'])} | {_mib(r['teacher_param_bytes'])} | "
                         f"{_mib(r['peak_grad_bytes'])} |")
    kinds = sorted({rep["peak_kind"] for rep in reports})
    return "\n".join(lines) + f"\n\npeak memory: {', '.join(kinds)}; all other columns are this rank's shards.\n"
