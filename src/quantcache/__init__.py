"""quantcache: calibrated INT8 KV-cache quantization for Hugging Face Transformers.

The core is three steps on one object: build a :class:`QuantizedCalibratingCache`
from the model, run calibration text through ``model(..., cache=cache)``,
then :meth:`~QuantizedCalibratingCache.freeze` it; the frozen cache fake-quantizes
every new key/value state and saves to a safetensors file that reloads exactly.
"""

from .cache import CACHE_KEYWORD, CacheMode, QuantizedCalibratingCache, attention_module_names
from .config import ConfigError, KVQuantConfig, QuantDtype, QuantMethod, QuantScope
from .observer import CalibrationError
from .quantization import QuantParams, channel_minmax, compute_qparams, dequantize, fake_quantize, quantize
from .serialization import QuantStateError

__version__ = "0.1.0"

__all__ = [
    "CACHE_KEYWORD",
    "CacheMode",
    "CalibrationError",
    "ConfigError",
    "KVQuantConfig",
    "QuantDtype",
    "QuantMethod",
    "QuantParams",
    "QuantScope",
    "QuantStateError",
    "QuantizedCalibratingCache",
    "__version__",
    "attention_module_names",
    "channel_minmax",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
]
