"""Hooks rabit into transformers' quantizer registry so that ``AutoModelForCausalLM.from_pretrained(folder)`` loads
folders written by ``rabit.save_quantized`` (``quantization_config.quant_method == "rabit"``).

``register()`` adds ``RaBiTQuantConfig`` / ``RaBiTHfQuantizer`` under the name "rabit" with
``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``. Importing
``transformers.quantizers.auto`` costs several seconds, so ``install()`` (called by ``import rabit``) registers at
once only when transformers' quantizers are already imported, and otherwise adds a post-import hook that registers
the moment they are (``from_pretrained`` always imports them first). Both are idempotent.

The quantizer only loads pre-quantized folders: before any weight is read it replaces the listed ``nn.Linear``
modules of the (meta-device) skeleton by ``PackedRaBiTLinear`` and checks every tensor of the safetensors files
(names, shapes, dtypes) with ``rabit.serialization.check_checkpoint``; transformers then loads the buffers.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

QUANT_METHOD = "rabit"
_TARGET = "transformers.quantizers.auto"
_lock = threading.RLock()
_registered = False
_classes: tuple | None = None
_failure: str | None = None   # why the last registration failed


def _build_classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class RaBiTQuantConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a rabit folder (see ``rabit.serialization`` for the fields)."""

        def __init__(self, quant_method: str = QUANT_METHOD, format_version: int = 1, num_paths: int = 2,
                     packing: dict | None = None, scale_dtype: str = "float16", modules: list | None = None,
                     **kwargs):
            self.quant_method = quant_method
            self.format_version = format_version
            self.num_paths = num_paths
            self.packing = packing
            self.scale_dtype = scale_dtype
            self.modules = list(modules or [])
            for k, v in kwargs.items():
                setattr(self, k, v)
            self.post_init()

        def post_init(self):
            from .serialization import validate_quantization_config

            validate_quantization_config(self.to_dict())

        def to_dict(self):
            import copy

            return copy.deepcopy(self.__dict__)

    class RaBiTHfQuantizer(HfQuantizer):
        """Loads pre-quantized rabit folders (packed sign planes + scales) into PackedRaBiTLinear modules."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            return

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .serialization import check_checkpoint, replace_with_packed_skeleton

            qc = self.quantization_config.to_dict()
            replace_with_packed_skeleton(model, qc, device="meta")
            if checkpoint_files:
                from pathlib import Path

                from .integrity import check_on_load

                check_on_load(Path(checkpoint_files[0]).parent)   # checksums (rabit.integrity)
                check_checkpoint(model, [str(f) for f in checkpoint_files], qc)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .serialization import _attach_rabit_config

            _attach_rabit_config(model, self.quantization_config.to_dict())
            return model

        def update_dtype(self, dtype):
            return dtype

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return False

    RaBiTQuantConfig.__module__ = __name__
    RaBiTHfQuantizer.__module__ = __name__
    return RaBiTQuantConfig, RaBiTHfQuantizer


def register() -> bool:
    """Register the rabit config and quantizer with transformers (imports transformers). Returns True if done;
    otherwise False, and ``failure()`` says why."""
    global _registered, _classes, _failure
    with _lock:
        if _registered:
            return True
        try:
            from transformers.quantizers import auto
        except Exception as e:  # noqa: BLE001  (transformers missing or broken)
            _failure = f"transformers.quantizers cannot be imported ({type(e).__name__}: {e})"
            return False
        if not hasattr(auto, "register_quantizer") or not hasattr(auto, "register_quantization_config"):
            _failure = "the installed transformers has no quantizer registry (need transformers >= 4.45)"
            return False
        try:
            cfg_cls, q_cls = _classes or _build_classes()
            _classes = (cfg_cls, q_cls)
            if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not cfg_cls:
                auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
                auto.register_quantization_config(QUANT_METHOD)(cfg_cls)
            if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not q_cls:
                auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
                auto.register_quantizer(QUANT_METHOD)(q_cls)
        except Exception as e:  # noqa: BLE001  (an incompatible transformers API)
            _failure = f"registering with this transformers failed ({type(e).__name__}: {e})"
            return False
        _registered = True
        _failure = None
        return True


def failure() -> str | None:
    """Why the last ``register()`` failed (None after a success or before any attempt)."""
    return _failure


def quantization_config_class():
    register()
    return _classes[0] if _classes else None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        global _failure
        self._inner.exec_module(module)
        try:  # never break transformers' import, but say when rabit folders will not load through it
            ok = register()
        except Exception as e:  # noqa: BLE001
            ok, _failure = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(f"rabit could not register its quantizer with transformers: {failure()}; "
                          "from_pretrained() will not load rabit folders", RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        _uninstall_hook()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_finder = _PostImportFinder()


def _uninstall_hook() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they get imported."""
    if _TARGET in sys.modules:
        register()
    elif _finder not in sys.meta_path and not _registered:
        sys.meta_path.insert(0, _finder)


__all__ = ["register", "failure", "install", "quantization_config_class", "QUANT_METHOD"]
