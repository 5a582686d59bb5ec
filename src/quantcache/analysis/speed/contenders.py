"""The caches a speed run compares: Transformers' own, and quantized caches of frozen quantizers.

A :class:`Contender` names a cache, says what kind it is and makes an empty one; whether the
model runs compiled or reads codes is part of it, so one run can measure the same cache several
ways side by side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.length_check import ContextLengthWarning
from quantcache.scheme.args import Storage
from quantcache.scheme.config import KVQuantConfig

__all__ = [
    "Contender",
    "ContenderKind",
    "calibrate_presets",
    "compiled_twins",
    "default_contenders",
    "dynamic_contender",
    "quantized_contender",
    "static_contender",
]

ContenderKind = Literal["dynamic", "static", "quantized"]
_PROBE_TOKENS = 16  # a StaticCache this long shows whether this Transformers can build one for the model


@dataclass(frozen=True)
class Contender:
    """A cache under test: its name in tables, its kind, and ``make(max_tokens)`` giving an empty one.

    ``max_tokens`` is the longest sequence the cache will hold (a ``StaticCache`` preallocates
    it; the others grow and ignore it).
    """

    name: str
    kind: ContenderKind
    make: Callable[[int], Any]
    compiled: bool = False
    """Run the model through ``torch.compile``, a compiled forward of its own (graphs not shared with other caches)."""
    reads_codes: bool = False
    """Run the model with ``attn_implementation="quantcache"``, which reads the cache's codes
    (:mod:`quantcache.cache.attention`); the others run with the model's own attention."""
    compiled_kernels: bool = False
    """The caches run their per-token work through compiled kernels (``new_cache(compiled=True)``,
    :mod:`quantcache.cache.compiled_kernels`), the model eager."""

    @property
    def compiles(self) -> bool:
        """Whether running it compiles graphs (the model's, or the cache's kernels), which the warm-up must cover."""
        return self.compiled or self.compiled_kernels


def compiled_twins(contenders: Sequence[Contender]) -> list[Contender]:
    """``contenders`` followed by a compiled twin of each (``NAME compiled``), measured side by side with them."""
    return [*contenders, *(replace(c, name=f"{c.name} compiled", compiled=True) for c in contenders)]


def dynamic_contender(model: nn.Module) -> Contender:
    """Transformers' ``DynamicCache`` for ``model``: the reference every ratio divides by."""
    config: Any = model.config
    return Contender("DynamicCache", "dynamic", lambda max_tokens: DynamicCache(config=config))


def static_contender(model: nn.Module) -> Contender | None:
    """Transformers' ``StaticCache`` for ``model``, or ``None`` where this Transformers cannot build one for it.

    A ``StaticCache`` allocates ``(batch, kv_heads, max_tokens, head_dim)`` per layer up front
    and attends over all of it, masked; it exists for ``torch.compile``, which is not used
    here, so its figures are those of eager decoding.
    """
    config: Any = model.config
    try:
        StaticCache(config=config, max_cache_len=_PROBE_TOKENS)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return None
    return Contender("StaticCache", "static", lambda max_tokens: StaticCache(config=config, max_cache_len=max_tokens))


def quantized_contender(
    name: str,
    quantizer: KVQuantizer,
    storage: Storage | str,
    *,
    read_codes: bool = False,
    compiled_kernels: bool = False,
) -> Contender:
    """Caches of a frozen ``quantizer`` with ``storage`` (``"packed"`` codes or ``"fake"`` dequantized states);
    ``read_codes``: packed caches read by the attention from codes (``new_cache(read_codes=True)``);
    ``compiled_kernels``: packed caches whose per-token work runs compiled (``new_cache(compiled=True)``)."""
    if not quantizer.is_frozen:
        raise ValueError(f"{name}: the quantizer is still calibrating; freeze it (or calibrate(..., freeze=True))")
    return Contender(
        name,
        "quantized",
        lambda max_tokens: quantizer.new_cache(storage=storage, read_codes=read_codes, compiled=compiled_kernels),
        reads_codes=read_codes,
        compiled_kernels=compiled_kernels,
    )


def default_contenders(
    model: nn.Module,
    quantizers: dict[str, KVQuantizer],
    storage: Storage | str,
    *,
    static: bool = True,
    read_codes: bool = False,
    compiled_kernels: bool = False,
) -> list[Contender]:
    """``DynamicCache``, ``StaticCache`` (when ``static`` and the model supports it), then one per quantizer.

    Quantized contenders are named ``"<name> <storage>"`` (``"int4 packed"``); ``read_codes`` (packed
    storage) adds ``"<name> codes"`` after each, the same cache read by the attention from codes;
    ``compiled_kernels`` (packed storage) adds ``"... kernels"`` after each of those, the same cache with its
    per-token work compiled.
    """
    storage_name = Storage(storage).value
    packed = Storage(storage) is Storage.PACKED
    if read_codes and not packed:
        raise ValueError("attention reads codes from packed storage only: leave the storage at 'packed'")
    if compiled_kernels and not packed:
        raise ValueError("compiled kernels encode and read packed codes: leave the storage at 'packed'")
    found = [dynamic_contender(model)]
    if static and (fixed := static_contender(model)) is not None:
        found.append(fixed)
    for name, quantizer in quantizers.items():
        for reading in (False, True) if read_codes else (False,):
            label = f"{name} codes" if reading else f"{name} {storage_name}"
            found.append(quantized_contender(label, quantizer, storage, read_codes=reading))
            if compiled_kernels:
                found.append(
                    quantized_contender(
                        f"{label} kernels", quantizer, storage, read_codes=reading, compiled_kernels=True
                    )
                )
    return found


def calibrate_presets(
    model: nn.Module, windows: torch.Tensor, presets: Sequence[str], *, progress: bool = False
) -> dict[str, KVQuantizer]:
    """A frozen quantizer per preset name, each calibrated on ``windows`` ``(samples, seq_len)`` token ids.

    Speed hardly depends on the calibrated values, but a scheme's cost can (sink tokens,
    outlier handling), so every preset is calibrated on real text as a user would. Whether the
    ranges would hold at serving lengths is not this measurement's question: its warning is not given.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLengthWarning)
        return {
            name: calibrate(model, windows, quant_config=KVQuantConfig.preset(name), progress=progress)
            for name in presets
        }
