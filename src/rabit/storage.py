"""What a saved rabit folder stores besides the packed layers: the dtype of the tensors kept unquantized, and
how the file's bytes split between quantized layers, embeddings, output head and the rest.

For small models with large vocabularies the embedding matrix is most of the file (SmolLM2-135M: 28M of 135M
parameters; Gemma 3 270M: 168M of 268M), so writing it in the fp32 the teacher was loaded in made a "2-bit"
folder larger than the source checkpoint. Unquantized tensors are therefore stored in 16 bits by default: the
source checkpoint's dtype when it was 16-bit, bf16 otherwise (bf16 keeps fp32's range, so no overflow).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
DEFAULT_STORAGE_DTYPE = torch.bfloat16
# Attribute set on a model by rabit.models.load_model: the dtype its checkpoint was stored in (transformers
# overwrites config.dtype with the dtype the model was loaded in). Copies (deepcopy) keep it.
SOURCE_DTYPE_ATTR = "rabit_source_dtype"
COMPONENTS = ("quantized_layers", "embeddings", "head", "other")
_ELEMENT_BYTES = {torch.uint8: 1, torch.int8: 1, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4,
                  torch.float64: 8, torch.int32: 4, torch.int64: 8, torch.bool: 1}


def checkpoint_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The floating-point dtype a Hugging Face folder's config.json declares (``dtype`` or ``torch_dtype``)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The 16-bit dtype to store `model`'s unquantized float tensors in.

    The source checkpoint's dtype if it was 16-bit (recorded by load_model), else the model's own config dtype
    or parameter dtype if 16-bit (a model the user loaded in bf16), else bf16.
    """
    config = getattr(model, "config", None)
    candidates = [getattr(model, SOURCE_DTYPE_ATTR, None), getattr(config, "dtype", None)]
    candidates += [p.dtype for p in list(model.parameters())[:1]]
    for dt in candidates:
        if isinstance(dt, str):
            dt = getattr(torch, dt, None)
        if dt in SIXTEEN_BIT:
            return dt
    return DEFAULT_STORAGE_DTYPE


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def component_modules(model: nn.Module) -> dict[str, str]:
    """{"embeddings": name, "head": name} of the input embedding and output projection modules (when found)."""
    out = {}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = module_name(model, get_in()) if get_in else None
    head = module_name(model, get_out()) if get_out else None
    if emb:
        out["embeddings"] = emb
    if head:
        out["head"] = head
    return out


def component_of(tensor: str, quantized_modules: set[str], modules: dict[str, str]) -> str:
    """Which of COMPONENTS a stored tensor belongs to. A quantized head counts as the head, not as a layer."""
    mod = tensor.rpartition(".")[0]
    for comp in ("embeddings", "head"):
        name = modules.get(comp)
        if name and (mod == name or tensor.startswith(name + ".")):
            return comp
    if mod in quantized_modules:
        return "quantized_layers"
    return "other"


def component_bytes(header: dict, qc: dict) -> dict[str, int]:
    """Bytes per component of a saved folder, from its safetensors header {name: (dtype, shape)} and
    quantization_config (folders written before the component names were recorded: guessed from the names)."""
    modules = qc.get("component_modules") or {}
    if not modules:
        names = [n.rpartition(".")[0] for n in header]
        modules = {"embeddings": next((n for n in names if n.endswith("embed_tokens")), None),
                   "head": next((n for n in names if n.endswith("lm_head")), None)}
    quantized = set(qc.get("modules") or ())
    out = dict.fromkeys(COMPONENTS, 0)
    for name, (dt, shape) in header.items():
        numel = 1
        for s in shape:
            numel *= s
        out[component_of(name, quantized, modules)] += numel * _ELEMENT_BYTES.get(dt, 4)
    return out


def format_size_report(report: dict) -> str:
    """One line per component of a size_report (MB = 10^6 bytes)."""
    comps = report.get("components") or {}
    total = sum(comps.values()) or 1
    parts = [f"{name.replace('_', ' ')} {b / 1e6:.1f} MB ({100 * b / total:.0f}%)" for name, b in comps.items() if b]
    line = f"saved model: {report['file_bytes'] / 1e6:.1f} MB"
    if report.get("storage_dtype"):
        line += f" (unquantized tensors in {report['storage_dtype']})"
    return line + ": " + ", ".join(parts)
