"""quantcache: calibrated KV-cache quantization for Hugging Face Transformers.

A :class:`KVQuantizer` holds one calibration: the scheme (:class:`KVQuantConfig`) and,
per attention layer, the statistics and frozen parameters of its keys and values.
:func:`calibrate` makes one from token windows; ``quantizer.new_cache()`` gives a
:class:`QuantizedCalibratingCache` (a ``transformers.DynamicCache``) that holds one
conversation and quantizes every new key/value state with the quantizer's parameters;
``quantizer.save()`` writes a checksummed safetensors file that ``KVQuantizer.load``
reads back exactly.

The package imports lazily (PEP 562): ``import quantcache`` loads neither torch nor
transformers until a name that needs them is used, so the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (users import these; everything else is reached by its module path)
_EXPORTS: dict[str, str] = {
    "KVQuantizer": "cache.kv_quantizer",
    "QuantizedCalibratingCache": "cache.cache",
    "CacheMode": "cache.kv_quantizer",
    "KVQuantConfig": "scheme.config",
    "QuantArgs": "scheme.args",
    "QuantDtype": "scheme.args",
    "QuantMethod": "scheme.args",
    "QuantScope": "scheme.args",
    "use_code_attention": "cache.attention",
    "calibrate": "calibration.calibrate",
    "evaluate": "analysis.evaluation",
    "load_model": "models.loading",
    "CalibrationError": "errors",
    "ConfigError": "errors",
    "QuantStateError": "errors",
    "QuantcacheError": "errors",
}

__all__ = [
    "CacheMode",
    "CalibrationError",
    "ConfigError",
    "KVQuantConfig",
    "KVQuantizer",
    "QuantArgs",
    "QuantDtype",
    "QuantMethod",
    "QuantScope",
    "QuantStateError",
    "QuantcacheError",
    "QuantizedCalibratingCache",
    "__version__",
    "calibrate",
    "evaluate",
    "load_model",
    "use_code_attention",
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
    from .analysis.evaluation import evaluate
    from .cache.attention import use_code_attention
    from .cache.cache import QuantizedCalibratingCache
    from .cache.kv_quantizer import CacheMode, KVQuantizer
    from .calibration.calibrate import calibrate
    from .errors import CalibrationError, ConfigError, QuantcacheError, QuantStateError
    from .models.loading import load_model
    from .scheme.args import QuantArgs, QuantDtype, QuantMethod, QuantScope
    from .scheme.config import KVQuantConfig
