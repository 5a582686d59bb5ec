"""quantcache: calibrated KV-cache quantization for Hugging Face Transformers.

The core is three steps on one object: build a :class:`QuantizedCalibratingCache`
from the model, run calibration text through ``model(..., cache=cache)``,
then :meth:`~QuantizedCalibratingCache.freeze` it; the frozen cache quantizes
every new key/value state and saves to a safetensors file that reloads exactly.

The package imports lazily (PEP 562): ``import quantcache`` loads neither torch nor
transformers until a name that needs them is used, so the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "CACHE_KEYWORD": "cache",
    "CacheMode": "cache",
    "QuantizedCalibratingCache": "cache",
    "attention_module_names": "cache",
    "CalibrationError": "errors",
    "ConfigError": "errors",
    "QuantStateError": "errors",
    "QuantcacheError": "errors",
    "KVQuantConfig": "config",
    "QuantDtype": "config",
    "QuantMethod": "config",
    "QuantScope": "config",
    "QuantParams": "quantization",
    "channel_minmax": "quantization",
    "compute_qparams": "quantization",
    "dequantize": "quantization",
    "fake_quantize": "quantization",
    "quantize": "quantization",
}

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
    "QuantcacheError",
    "QuantizedCalibratingCache",
    "__version__",
    "attention_module_names",
    "channel_minmax",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'quantcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static type checkers see the eager imports
    from .cache import CACHE_KEYWORD, CacheMode, QuantizedCalibratingCache, attention_module_names
    from .config import KVQuantConfig, QuantDtype, QuantMethod, QuantScope
    from .errors import CalibrationError, ConfigError, QuantcacheError, QuantStateError
    from .quantization import QuantParams, channel_minmax, compute_qparams, dequantize, fake_quantize, quantize
