"""rabit: 2-bit LLM compression with RaBiT (Residual-Aware Binarization Training) and fast 2-bit inference."""
from . import hf_integration as _hf_integration
from .config import RaBiTConfig
from .layer import RaBiTLinear
from .quantize import collect_channel_stats, find_linear_layers, quantize_, rabit_layers
from .rotation import rotate_
from .serialization import load_quantized, pack_model_, save_quantized

# Registers the "rabit" quantizer with transformers lazily (when its quantizer code is imported), so that
# AutoModelForCausalLM.from_pretrained(path) loads saved rabit folders without slowing down `import rabit`.
_hf_integration.install()

__version__ = "0.1.0"

__all__ = ["RaBiTConfig", "RaBiTLinear", "quantize_", "collect_channel_stats", "find_linear_layers",
           "rabit_layers", "rotate_", "save_quantized", "load_quantized", "pack_model_", "__version__"]
