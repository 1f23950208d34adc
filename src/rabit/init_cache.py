"""A disk cache of initialized paths, so runs that share an initialization compute it once.

Calibration plus iterative residual SVID costs minutes on a CPU (about 6 on 2 cores for the default model),
and the paths it produces do not depend on the training mode: coupled, independent and frozen runs all start
from the same (g_i, B_i, h_i) and differ only in how their latent weights are set from them (see
RaBiTLinear.load_paths). The cache stores, per quantized layer, the scales in fp32 and the signs packed 8 per
byte (``rabit.sign_bits.pack_bits``), in one safetensors file keyed by everything the initialization depends on.
A file that exists but cannot be used is reported in one line and the initialization is computed again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .atomic_io import atomic_save_safetensors
from .config import RaBiTConfig
from .sign_bits import pack_bits, unpack_bits

FORMAT = "rabit-init-paths"
# 2: the decomposition's paths; version 1 files could hold a coupled layer's re-derived signs instead.
# 3: signs packed by rabit.sign_bits.pack_bits (bit j of byte c = input 8c + j); version 2 used numpy's
#    most-significant-bit-first order.
VERSION = 3
# RaBiTConfig fields that change the initialized paths (mode, latent_init and the STE do not).
INIT_FIELDS = ("num_paths", "init", "isvid_rounds", "precondition", "alpha_in", "alpha_out", "exclude",
               "svid_power_iters")


def init_key(model_fingerprint: str, config: RaBiTConfig, calibration: dict | None) -> dict:
    """Everything the initialized paths depend on. `calibration` describes the calibration data and how the
    statistics were gathered (None when not preconditioned)."""
    fields = {f: getattr(config, f) for f in INIT_FIELDS}
    fields["exclude"] = list(config.exclude_patterns)
    return {"format": FORMAT, "version": VERSION, "model": model_fingerprint, "config": fields,
            "calibration": calibration if config.precondition else None}


def cache_path(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / f"{digest}.safetensors"


@contextlib.contextmanager
def lock(path: Path):
    """An exclusive advisory lock on `path` (a .lock file beside it) for the calling process; a no-op where
    fcntl or the folder is unavailable (the cache then only risks computing the same paths twice)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # releases the lock


def _pack_signs(B: torch.Tensor) -> torch.Tensor:
    return pack_bits(B.detach().cpu() > 0)


def _unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return unpack_bits(packed, in_features).to(torch.float32).mul_(2).sub_(1)


class PathRecorder:
    """Collects each layer's initialization paths as quantize_ produces them (pass it as `on_init`), signs
    packed to bits at once, then writes them with `save`.

    The initialization's paths, not a layer's paths(): a coupled layer re-derives B_2.. from its latent, which
    differs from the decomposition at a few weights, so a cache written from it would start independent and
    frozen runs from other signs than their own initialization gives."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, paths) -> None:
        for i, (g, B, h) in enumerate(paths):
            self.tensors[f"{name}.{i}.g"] = g.detach().float().cpu().contiguous()
            self.tensors[f"{name}.{i}.h"] = h.detach().float().cpu().contiguous()
            self.tensors[f"{name}.{i}.signs"] = _pack_signs(B).contiguous()

    def save(self, path: Path, key: dict) -> None:
        """Write the recorded paths atomically."""
        atomic_save_safetensors(self.tensors, path, metadata={"key": json.dumps(key, sort_keys=True)})


def _read(path: Path, layers: dict[str, nn.Module], key: dict) -> tuple[dict | None, str]:
    """(name -> paths, "") from the file, or (None, why it cannot be used)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != json.loads(json.dumps(key, sort_keys=True)):
                return None, "it was written for other settings"
            names = set(f.keys())
            if names != {f"{n}.{i}.{p}" for n, l in layers.items() for i in range(l.num_paths)
                         for p in ("g", "h", "signs")}:
                return None, "it holds other layers"
            plan = {}
            for name, layer in layers.items():
                paths = []
                for i in range(layer.num_paths):
                    g, h = f.get_tensor(f"{name}.{i}.g"), f.get_tensor(f"{name}.{i}.h")
                    B = _unpack_signs(f.get_tensor(f"{name}.{i}.signs"), layer.in_features)
                    if g.shape != (layer.out_features,) or h.shape != (layer.in_features,) or \
                            B.shape != (layer.out_features, layer.in_features):
                        return None, f"layer {name} has other shapes"
                    paths.append((g, B, h))
                plan[name] = paths
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: recompute rather than fail the run)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return plan, ""


def load_paths(path: Path, layers: dict[str, nn.Module], originals: dict[str, nn.Linear], key: dict) -> bool:
    """Fill `layers` (name -> uninitialized RaBiTLinear) from the cache file, with `originals` (name -> the
    full-precision nn.Linear it replaces) for the latent weights and biases. Returns False when the file is
    missing, or, after a one-line notice on stderr, when it cannot be used (damaged, written for another key,
    or not covering exactly these layers): the caller then initializes from scratch, never from a half-loaded
    model."""
    if not path.exists():
        return False
    plan, why = _read(path, layers, key)
    if plan is None:
        print(f"rabit: the init cache {path} cannot be used ({why}); initializing from scratch", file=sys.stderr,
              flush=True)
        return False
    for name, layer in layers.items():
        device = layer.scale_out[0].device
        linear = originals[name]
        w = linear.weight.detach().float().to(device)
        with torch.no_grad():
            layer.load_paths([(g.to(device), B.to(device), h.to(device)) for g, B, h in plan[name]], w)
            if layer.bias is not None and linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
    return True
