"""Saving and loading packed 2-bit RaBiT models as ordinary Hugging Face folders.

Folder layout (format version 1)
--------------------------------
``config.json``        the model's transformers config plus ``quantization_config``::

    {"quant_method": "rabit", "format_version": 1, "num_paths": 2,
     "packing": {"layout": "tiled16x32", "row_tile": 16, "in_align": 32, "bit_order": "lsb"},
     "scale_dtype": "float16", "modules": ["model.layers.0.self_attn.q_proj", ...],
     "bias_modules": ["model.layers.0.self_attn.q_proj", ...],          # those storing a bias (any may)
     "tied_weights": {"lm_head.weight": "model.embed_tokens.weight"},     # aliases not stored twice
     "storage_dtype": "bfloat16",                                          # of the unquantized tensors
     "component_modules": {"embeddings": "model.embed_tokens", "head": "lm_head"},   # for size_report
     "rabit_config": {...}}                                                # the RaBiTConfig used, if known

``model.safetensors``  for every quantized module ``M`` (an ``nn.Linear`` of the architecture):
``M.packed`` (uint8, ``rabit.sign_bits.packed_shape(k, out, in)``, the sign planes), ``M.g`` (k, out),
``M.h`` (k, in) and ``M.bias`` (out,) if listed in ``bias_modules``, in ``scale_dtype``; every other parameter /
persistent buffer of the model under its usual name (float tensors in ``storage_dtype``, 16 bits by default;
the config's ``dtype`` is the dtype the model computed in when saved, which loading restores).
Tokenizer files and ``generation_config.json`` as written by transformers. ``model.safetensors`` is written last;
its metadata ``rabit_checksums`` records every tensor and every other file (``rabit.integrity``), and
``quantization_config.checksums`` declares it; loading verifies them unless ``verify=False``.

Loading (``load_quantized`` or, after ``import rabit``, ``AutoModelForCausalLM.from_pretrained``) builds the
architecture on the meta device from config.json, swaps the listed linears for ``PackedRaBiTLinear``, checks the
safetensors header against it (every name, shape and dtype; a clear error naming the file and tensor otherwise)
and only then reads the tensors. No pickle, no remote code.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import embedquant, integrity, sign_bits, storage
from .atomic_io import atomic_save_safetensors, atomic_write_bytes

QUANT_METHOD = "rabit"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PACKING_INFO = {"layout": sign_bits.LAYOUT, "row_tile": sign_bits.ROW_TILE, "in_align": sign_bits.IN_ALIGN,
                "bit_order": "lsb"}
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_PACKED_KEYS = ("packed", "g", "h", "bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_classes():
    from .layer import RaBiTLinear
    from .packed_layer import PackedRaBiTLinear

    return RaBiTLinear, PackedRaBiTLinear


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ------------------------------------------------------------------------------------------------ conversion
def packed_layers(model: nn.Module) -> dict:
    """The PackedRaBiTLinear modules of `model` by qualified name."""
    _, Packed = _layer_classes()
    return {n: m for n, m in model.named_modules() if isinstance(m, Packed)}


def pack_model_(model: nn.Module, scale_dtype: torch.dtype = torch.float16, backend: str = "auto") -> nn.Module:
    """Replace every RaBiTLinear of `model` by a PackedRaBiTLinear (scales in `scale_dtype`), in place.

    The model's other modules are untouched; returns the model. Training state (latent weights) is dropped.
    """
    RaBiT, Packed = _layer_classes()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RaBiT)}
    if not layers and not packed_layers(model):
        raise ValueError("the model has no RaBiTLinear layers to pack (run rabit.quantize_ first)")
    for name, layer in layers.items():
        _set_module(model, name, Packed.from_rabit(layer, dtype=scale_dtype, backend=backend))
    return model


def _packed_tensors(layer, scale_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """{packed, g, h[, bias]} of a RaBiTLinear (packed on the fly) or PackedRaBiTLinear."""
    RaBiT, Packed = _layer_classes()
    if isinstance(layer, RaBiT):
        layer = Packed.from_rabit(layer, dtype=scale_dtype or torch.float16)
    out = {"packed": layer.packed, "g": layer.g, "h": layer.h}
    if layer.bias is not None:
        out["bias"] = layer.bias
    if scale_dtype is not None:
        for k in ("g", "h", "bias"):
            if k in out:
                out[k] = out[k].to(scale_dtype)
    return out


# ------------------------------------------------------------------------------------------------------- save
def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None,
                   scale_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (with RaBiTLinear or PackedRaBiTLinear layers) as a Hugging Face folder at `path`.

    RaBiTLinear layers are packed on the way without modifying `model` (use ``pack_model_`` to convert in place).
    scale_dtype: dtype of the g / h scales and biases of the quantized layers; None means float16, or the dtype
        the model's PackedRaBiTLinear layers already have. Use torch.float32 for logits identical to the unpacked
        model. dtype: the dtype the other floating-point tensors (embeddings, norms, lm_head) are stored in; None
        means 16 bits (``rabit.storage.storage_dtype``: the source checkpoint's dtype if 16-bit, else bf16);
        torch.float32 keeps them exact. The loaded model computes in the dtype `model` had (config ``dtype``),
        the stored tensors upcast on load. ``size_report(path)`` gives the bytes per component.
    Returns the folder path.
    """
    RaBiT, Packed = _layer_classes()
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("save_quantized needs a Hugging Face model (with a .config)")
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, (RaBiT, Packed))}
    if not qlayers:
        raise ValueError("the model has no RaBiT layers (run rabit.quantize_ first)")
    if scale_dtype is None:
        existing = [m.g.dtype for m in qlayers.values() if isinstance(m, Packed)]
        scale_dtype = existing[0] if existing else torch.float16
    if _dtype_name(scale_dtype) not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {list(SCALE_DTYPES)}, got {scale_dtype}")
    if dtype is None:
        dtype = storage.storage_dtype(model)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)

    prefixes = tuple(n + "." for n in qlayers)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    float_dtype = None   # the dtype the model computes in, restored on load
    own_dtype = embedquant.fixed_dtype_keys(model)   # group-quantized embedding scales keep theirs
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=False).items():
            if key.startswith(prefixes):
                continue
            ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
            if ident is not None and ident in seen:   # tied weights (e.g. lm_head = embeddings): store once
                tied[key] = seen[ident]
                continue
            if ident is not None:
                seen[ident] = key
            if t.is_floating_point() and key not in own_dtype:
                float_dtype = float_dtype or t.dtype
                t = t.to(dtype)
            tensors[key] = t.detach().cpu().contiguous()
        num_paths = {}
        for name, layer in qlayers.items():
            for k, t in _packed_tensors(layer, scale_dtype).items():
                tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
            num_paths[name] = layer.num_paths
    # safetensors refuses tensors sharing memory: clone the rare views that still do
    ptrs: set[int] = set()
    for k, t in tensors.items():
        if t.numel() and t.untyped_storage().data_ptr() in ptrs:
            tensors[k] = t.clone()
        elif t.numel():
            ptrs.add(t.untyped_storage().data_ptr())

    ks = sorted(set(num_paths.values()))
    qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "num_paths": ks[0],
          "packing": dict(PACKING_INFO), "scale_dtype": _dtype_name(scale_dtype), "modules": sorted(qlayers)}
    if len(ks) > 1:
        qc["module_num_paths"] = {n: k for n, k in sorted(num_paths.items())}
    # the quantized layers with a bias, which need not be those of the architecture (RaBiTConfig.add_bias)
    biased = sorted(n for n, layer in qlayers.items() if layer.bias is not None)
    if biased:
        qc["bias_modules"] = biased
    if tied:
        qc["tied_weights"] = tied
    qc["storage_dtype"] = _dtype_name(dtype)
    eq = embedquant.describe(model)
    if eq:
        qc["embedding_quant"] = eq
    comps = storage.component_modules(model)
    if comps:
        qc["component_modules"] = comps
    from .rotation import ROTATION_ATTR

    if getattr(model, ROTATION_ATTR, None) is not None:   # how the source model was rotated before quantization
        qc["rotation"] = dict(getattr(model, ROTATION_ATTR))
    rc = getattr(model, "rabit_config", None)
    if rc is not None:
        if hasattr(rc, "to_dict"):
            qc["rabit_config"] = rc.to_dict()
        else:
            warnings.warn(f"model.rabit_config is a {type(rc).__name__}, not a RaBiTConfig: it is not saved",
                          RuntimeWarning, stacklevel=2)
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = qc
    if float_dtype is not None:
        cfg["dtype"] = _dtype_name(float_dtype)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if any(m is out_emb for m in qlayers.values()) and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False   # the quantized lm_head no longer shares the embedding matrix
    validate_quantization_config(qc)

    # The weights go last: their header records the checksums of every tensor and of the files written before
    # them (rabit.integrity), so a folder is only complete once its weights file is.
    qc[integrity.CONFIG_KEY] = integrity.ALGORITHM
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(path)
        except Exception as e:  # noqa: BLE001  (an invalid generation config must not lose the weights)
            warnings.warn(f"generation_config.json was not saved to {path} ({type(e).__name__}: {e}); the folder "
                          "loads with transformers' default generation settings", RuntimeWarning, stacklevel=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    weights = path / WEIGHTS_NAME
    atomic_save_safetensors(tensors, weights, metadata={"format": "pt", "rabit_format_version": str(FORMAT_VERSION),
                                                        **integrity.checksum_metadata(tensors,
                                                                                      integrity.folder_files(path))})
    umask = os.umask(0)
    os.umask(umask)
    for f in (weights, path / CONFIG_NAME):
        os.chmod(f, 0o666 & ~umask)
    return path


# ----------------------------------------------------------------------------------------------- validation
def validate_quantization_config(qc, source: str = "quantization_config") -> dict:
    """Check a rabit quantization_config dict; raises ValueError naming `source`."""
    if not isinstance(qc, dict):
        raise ValueError(f"{source}: missing or not an object (is this a folder written by rabit.save_quantized?)")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"{source}: quant_method is {method!r}, expected {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"{source}: format_version {version!r} is not supported by this rabit "
                         f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade rabit or re-save the model")
    k = qc.get("num_paths")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{source}: num_paths must be an integer >= 1, got {k!r}")
    pk = qc.get("packing")
    if not isinstance(pk, dict) or pk.get("layout") != sign_bits.LAYOUT:
        got = pk.get("layout") if isinstance(pk, dict) else pk
        raise ValueError(f"{source}: packing layout {got!r} is not supported (expected {sign_bits.LAYOUT!r})")
    for key in ("row_tile", "in_align"):
        if key in pk and pk[key] != PACKING_INFO[key]:
            raise ValueError(f"{source}: packing {key}={pk[key]!r}, expected {PACKING_INFO[key]}")
    if qc.get("scale_dtype") not in SCALE_DTYPES:
        raise ValueError(f"{source}: scale_dtype {qc.get('scale_dtype')!r} is not one of {list(SCALE_DTYPES)}")
    mods = qc.get("modules")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
        raise ValueError(f"{source}: modules must be a non-empty list of module names")
    per = qc.get("module_num_paths")
    if per is not None and (not isinstance(per, dict) or
                            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in per.values())):
        raise ValueError(f"{source}: module_num_paths must map module names to integers >= 1")
    biased = qc.get("bias_modules")
    if biased is not None and (not isinstance(biased, list) or not all(isinstance(m, str) for m in biased)
                               or not set(biased) <= set(mods)):
        raise ValueError(f"{source}: bias_modules must be a list of names from modules")
    sd = qc.get("storage_dtype")
    if sd is not None and sd not in SCALE_DTYPES:
        raise ValueError(f"{source}: storage_dtype {sd!r} is not one of {list(SCALE_DTYPES)}")
    if qc.get("embedding_quant") is not None:
        embedquant.validate_embedding_quant(qc["embedding_quant"], source)
    tied = qc.get("tied_weights")
    if tied is not None and (not isinstance(tied, dict) or
                             not all(isinstance(a, str) and isinstance(b, str) for a, b in tied.items())):
        raise ValueError(f"{source}: tied_weights must map tensor names to tensor names")
    if qc.get("rotation") is not None:
        from .rotation import check_rotation_record

        check_rotation_record(qc["rotation"], f"{source}: rotation")
    return qc


def replace_with_packed_skeleton(model: nn.Module, qc: dict, device="meta") -> nn.Module:
    """Swap the nn.Linear modules listed in qc["modules"] for empty PackedRaBiTLinear modules, in place."""
    _, Packed = _layer_classes()
    scale_dtype = SCALE_DTYPES[qc["scale_dtype"]]
    per = qc.get("module_num_paths") or {}
    # folders written before bias_modules existed: a quantized layer has a bias where the architecture has one
    biased = set(qc["bias_modules"]) if "bias_modules" in qc else None
    for name in qc["modules"]:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config lists module {name!r}, which the "
                             f"{type(model).__name__} architecture does not have") from None
        if isinstance(old, Packed):
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"quantization_config lists module {name!r}, which is a {type(old).__name__}, "
                             "not a linear layer")
        with torch.device(device):
            new = Packed(old.in_features, old.out_features, num_paths=per.get(name, qc["num_paths"]),
                         bias=name in biased if biased is not None else old.bias is not None,
                         scale_dtype=scale_dtype, device=device)
        _set_module(model, name, new)
    if qc.get("embedding_quant"):
        embedquant.build_skeleton_(model, qc["embedding_quant"], device)
    return model


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def read_safetensors_header(file: str | os.PathLike) -> dict[str, tuple[torch.dtype | str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors header, after rabit.integrity.read_layout's structural checks
    (byte ranges, file size). ValueError (IntegrityError) for a damaged file, FileNotFoundError for none."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        layout = integrity.read_layout(file)
    except integrity.IntegrityError as e:
        msg = str(e)
        if "truncated" not in msg:   # the header itself is unreadable
            msg = f"{file}: not a valid safetensors file ({msg.removeprefix(f'{file}: ')})"
        raise integrity.IntegrityError(msg) from None
    return {name: (_ST_DTYPES.get(info["dtype"]) or info["dtype"], tuple(int(s) for s in info["shape"]))
            for name, info in layout.header.items()}


def check_checkpoint(model: nn.Module, files: list[str], qc: dict) -> None:
    """Compare the tensors of the safetensors `files` with the (skeleton) `model`: names, shapes, dtypes."""
    _, Packed = _layer_classes()
    scale_dtype = SCALE_DTYPES[qc["scale_dtype"]]
    tied = qc.get("tied_weights") or {}
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()}
    packed_keys = {f"{n}.{k}" for n in packed_layers(model) for k in _PACKED_KEYS}
    tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(tied)
    found: dict[str, tuple] = {}
    where: dict[str, str] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"{f}: rabit folders only load .safetensors weights (no pickle files)")
        for name, info in read_safetensors_header(f).items():
            found[name] = info
            where[name] = f
    for name, (dt, shape) in found.items():
        f = where[name]
        if name not in expected:
            raise ValueError(f"{f}: unexpected tensor {name!r} (not a parameter of the "
                             f"{type(model).__name__} with the quantized modules of config.json)")
        edt, eshape = expected[name]
        if shape != eshape:
            raise ValueError(f"{f}: tensor {name!r} has shape {list(shape)}, expected {list(eshape)}")
        if name in packed_keys:
            want = torch.uint8 if name.endswith(".packed") else scale_dtype
            if dt != want:
                raise ValueError(f"{f}: tensor {name!r} has dtype {dt}, expected {want}")
        elif isinstance(dt, str) or (edt.is_floating_point != dt.is_floating_point) or \
                (not edt.is_floating_point and dt != edt):
            raise ValueError(f"{f}: tensor {name!r} has dtype {dt}, expected {edt}")
    missing = [k for k in expected if k not in found and k not in tied_targets]
    if missing:
        raise ValueError(f"{files[0]}: missing tensor {missing[0]!r}" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _attach_rabit_config(model: nn.Module, qc: dict) -> None:
    if qc.get("rotation") is not None:   # checked by validate_quantization_config
        from .rotation import ROTATION_ATTR

        setattr(model, ROTATION_ATTR, dict(qc["rotation"]))
    rc = qc.get("rabit_config")
    if rc is None:
        return
    try:
        from .config import RaBiTConfig

        if not isinstance(rc, dict):
            raise TypeError(f"expected an object, got {type(rc).__name__}")
        model.rabit_config = RaBiTConfig.from_dict(rc)
    except (ValueError, TypeError) as e:   # informational only: the weights load without it
        warnings.warn(f"the rabit_config of this folder cannot be read ({e}); model.rabit_config is not set",
                      RuntimeWarning, stacklevel=2)


# ------------------------------------------------------------------------------------------------------- load
def read_quantization_config(path: str | os.PathLike) -> dict:
    """The validated quantization_config of a rabit folder (errors name config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found (not a Hugging Face model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: not a JSON object")
    if "quantization_config" not in cfg:
        raise ValueError(f"{cfg_file}: no quantization_config (not a rabit folder; "
                         "write one with rabit.save_quantized)")
    return validate_quantization_config(cfg["quantization_config"], f"{cfg_file}: quantization_config")


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   backend: str = "auto", verify: bool = True):
    """Load a folder written by ``save_quantized``: a transformers model with PackedRaBiTLinear layers, in eval mode.

    dtype: dtype of the non-quantized float tensors (None: as stored); the scales keep their stored dtype.
    backend: kernel backend for the packed layers ("auto", "cpu", "cpu_int8", "triton", "reference").
    verify: check every tensor and file against the checksums saved with them (rabit.integrity) and raise
        rabit.integrity.IntegrityError, naming the file and tensor, on any mismatch; False skips the check.
    Never runs code from the folder (safetensors only, trust_remote_code=False).
    """
    from . import hf_integration

    path = Path(path)
    read_quantization_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.index.json"))
        raise FileNotFoundError(f"{weights} not found" + (f" (found {', '.join(others)}; rabit folders keep "
                                                          "all tensors in one model.safetensors)" if others else ""))
    read_safetensors_header(weights)   # fail fast on a truncated / corrupt file
    if verify:
        integrity.check_model_folder(path)
    if not hf_integration.register():
        raise RuntimeError(f"cannot load {path}: rabit could not register its quantizer with transformers: "
                           f"{hf_integration.failure()}")
    from transformers import AutoModelForCausalLM

    stored = json.loads((path / CONFIG_NAME).read_text()).get("dtype")
    if dtype is None:
        dtype = getattr(torch, stored, None) if isinstance(stored, str) else None
        if not isinstance(dtype, torch.dtype):
            dtype = torch.float32
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with integrity.verification_skipped():   # checked above (or skipped on request)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=False, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"cannot load {path}: {e}") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.to(device)
    for m in packed_layers(model).values():
        m.backend = backend
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------------ sizes
def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over all quantized layers of `model` (sign bits + scales; bias not counted)."""
    RaBiT, Packed = _layer_classes()
    bits = n = 0
    for m in model.modules():
        if isinstance(m, Packed):
            w = m.out_features * m.in_features
            bits += m.bits_per_weight() * w
            n += w
        elif isinstance(m, RaBiT):
            w = m.out_features * m.in_features
            bits += (m.num_paths * w + 16 * m.num_paths * (m.out_features + m.in_features))
            n += w
    if n == 0:
        raise ValueError("the model has no RaBiT layers")
    return bits / n


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def size_report(path: str | os.PathLike) -> dict:
    """Sizes of a saved rabit folder (from the safetensors header only).

    quantized_bits_per_weight: (sign bits + g/h scale bits) / weights of the quantized layers;
    file_bytes: model.safetensors; folder_bytes: every file in the folder;
    bf16_bytes: the same model with every weight (quantized layers dense) in bf16, tied weights once;
    components: bytes of the quantized layers, embeddings, head (when stored: not tied, or quantized) and other
    tensors (norms, biases); storage_dtype: the dtype of the unquantized tensors.
    """
    path = Path(path)
    qc = read_quantization_config(path)
    header = read_safetensors_header(path / WEIGHTS_NAME)
    elsize = {torch.uint8: 1, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
    q_bits = q_weights = bf16_params = 0
    mods = set(qc["modules"])
    for name, (dt, shape) in header.items():
        numel = 1
        for s in shape:
            numel *= s
        mod, _, leaf = name.rpartition(".")
        if mod in mods:
            if leaf == "g":
                out_f = shape[1]
                in_f = header[f"{mod}.h"][1][1]
                q_weights += out_f * in_f
                bf16_params += out_f * in_f
                q_bits += shape[0] * out_f * in_f            # sign bits (padding not counted)
            if leaf in ("g", "h"):
                q_bits += numel * elsize.get(dt, 4) * 8
            if leaf == "bias":
                bf16_params += numel
        else:
            bf16_params += numel
    file_bytes = (path / WEIGHTS_NAME).stat().st_size
    return {"quantized_modules": len(mods), "quantized_weights": q_weights,
            "quantized_bits_per_weight": q_bits / max(q_weights, 1), "file_bytes": file_bytes,
            "folder_bytes": _folder_bytes(path), "bf16_bytes": 2 * bf16_params,
            "ratio_vs_bf16": file_bytes / max(2 * bf16_params, 1),
            "components": storage.component_bytes(header, qc), "storage_dtype": qc.get("storage_dtype")}


__all__ = ["save_quantized", "load_quantized", "pack_model_", "packed_layers", "bits_per_weight", "size_report",
           "read_quantization_config", "validate_quantization_config", "check_checkpoint",
           "read_safetensors_header", "FORMAT_VERSION"]
