"""rabit: 2-bit LLM compression with RaBiT (Residual-Aware Binarization Training) and fast 2-bit inference."""
from .config import RaBiTConfig
from .layer import RaBiTLinear
from .quantize import collect_channel_stats, find_linear_layers, quantize_, rabit_layers

__version__ = "0.1.0"

__all__ = ["RaBiTConfig", "RaBiTLinear", "quantize_", "collect_channel_stats", "find_linear_layers",
           "rabit_layers", "__version__"]
