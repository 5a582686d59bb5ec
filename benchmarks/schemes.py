"""quantcache's own contenders for the benchmarks: which schemes exist, how to calibrate them, how big they are.

The core library grows while the benchmarks stay put, so this module finds what the
installed quantcache offers instead of naming it: the msModelSlim "seed" schemes (INT8
per-channel, symmetric and asymmetric) always, every preset when ``KVQuantConfig.preset``
exists, and a packed-storage variant of a frozen cache when the library has one. The
benchmarks only ever go through :data:`SCHEMES`, :func:`schemes`, :func:`calibrated`,
:func:`packed_variant` and :func:`effective_bits`, so extending the list or teaching one of
those functions a new API is the only edit a new feature needs.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantcache import KVQuantConfig, QuantizedCalibratingCache
from quantcache.calibration.calibrate import calibrate
from quantcache.models.data import TextSource, token_windows

__all__ = [
    "CANDIDATE_PRESETS",
    "DEFAULT_WIKITEXT",
    "SCHEMES",
    "Scheme",
    "calibrated",
    "calibration_windows",
    "effective_bits",
    "model_dtype",
    "packed_variant",
    "preset_names",
    "schemes",
]

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
"""WikiText-2 (``valid.txt``, ``test.txt``) beside the project root; override with ``--wikitext DIR``."""


@dataclass(frozen=True)
class Scheme:
    """A quantcache configuration under test: ``key`` for the command line, ``name`` for tables."""

    key: str
    name: str
    config: KVQuantConfig


SCHEMES: list[Scheme] = [
    Scheme("seed-sym", "quantcache seed INT8 per-channel sym", KVQuantConfig(symmetric=True)),
    Scheme("seed-asym", "quantcache seed INT8 per-channel asym", KVQuantConfig(symmetric=False)),
]
"""Schemes measured in every run, whatever presets exist. Append new fixed schemes here."""

CANDIDATE_PRESETS: tuple[str, ...] = ("seed", "int8", "int4", "int3", "int2", "fp8")
"""Preset names tried when ``KVQuantConfig.preset`` exists but does not list its presets."""


def preset_names() -> list[str]:
    """The names ``KVQuantConfig.preset(name)`` accepts in the installed quantcache ([] before presets exist).

    Looks for a listing first (``KVQuantConfig.preset_names()``, ``KVQuantConfig.PRESETS``,
    ``quantcache.scheme.presets.PRESETS``, ``quantcache.scheme.config.PRESETS``), then tries
    :data:`CANDIDATE_PRESETS` one by one.
    """
    preset = getattr(KVQuantConfig, "preset", None)
    if not callable(preset):
        return []
    import importlib

    owners: list[tuple[Any, str]] = [(KVQuantConfig, "preset_names"), (KVQuantConfig, "PRESETS")]
    for module_name in ("quantcache.scheme.presets", "quantcache.scheme.config"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owners += [(module, "PRESETS"), (module, "PRESET_NAMES")]
    for owner, attribute in owners:
        listing = getattr(owner, attribute, None)
        if callable(listing):
            listing = listing()
        if isinstance(listing, dict):
            return [str(name) for name in listing]
        if isinstance(listing, (list, tuple)) and all(isinstance(name, str) for name in listing):
            return list(listing)
    names = []
    for name in CANDIDATE_PRESETS:
        try:
            preset(name)
        except Exception:  # not a preset of this version
            continue
        names.append(name)
    return names


def schemes(keys: list[str] | None = None) -> list[Scheme]:
    """:data:`SCHEMES` plus one ``preset-NAME`` scheme per preset, optionally filtered by key.

    A key ``config:PATH`` adds the config a YAML file holds (``quantcache suggest-bits -o``).

    A preset whose config equals one of :data:`SCHEMES` (``seed`` is the symmetric seed) is
    listed once, under the fixed scheme's key.
    """
    found = list(SCHEMES)
    for name in preset_names():
        config = KVQuantConfig.preset(name)  # type: ignore[attr-defined]
        if any(scheme.config == config for scheme in found):
            continue
        found.append(Scheme(f"preset-{name}", f"quantcache preset {name}", config))
    if keys is None:
        return found
    by_key = {scheme.key: scheme for scheme in found}
    for key in keys:  # "config:PATH": a YAML config (a suggest-bits mix, say), named by its file stem
        if key.startswith("config:"):
            path = Path(key.split(":", 1)[1])
            by_key[key] = Scheme(key, f"quantcache config {path.stem}", KVQuantConfig.from_yaml(path))
    unknown = [key for key in keys if key not in by_key]
    if unknown:
        raise ValueError(f"unknown quantcache scheme(s) {', '.join(unknown)}; available: {', '.join(by_key)}")
    return [by_key[key] for key in keys]


# ---------------------------------------------------------------------------- calibration
def calibration_windows(
    tokenizer: Any, source: str, *, samples: int, seq_len: int, seed: int, wikitext: Path = DEFAULT_WIKITEXT
) -> torch.Tensor:
    """Calibration token windows from WikiText-2 ``valid.txt`` (``source="wikitext2"``) or the built-in corpus."""
    if source == "wikitext2":
        documents = TextSource(kind="text_file", path=wikitext / "valid.txt").load()
    elif source == "builtin":
        documents = TextSource(kind="builtin", split="calibration").load()
    else:
        raise ValueError(f"unknown calibration source {source!r}; use wikitext2 or builtin")
    return token_windows(tokenizer, documents, num_samples=samples, seq_len=seq_len, seed=seed)


def calibrated(model: nn.Module, scheme: Scheme, windows: torch.Tensor) -> QuantizedCalibratingCache:
    """A frozen, empty cache for ``scheme`` calibrated on ``windows`` (a new cache of the quantizer ``calibrate``
    returns; older releases returned the cache itself)."""
    frozen = calibrate(model, windows, quant_config=scheme.config, progress=False)
    new_cache = getattr(frozen, "new_cache", None)
    return new_cache() if callable(new_cache) else frozen  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- packed storage
def packed_variant(model: nn.Module, frozen: QuantizedCalibratingCache) -> QuantizedCalibratingCache | None:
    """An empty frozen cache like ``frozen`` that stores codes (``storage="packed"``), or ``None`` while there is none.

    Tries, in order: a new cache of the same calibration (``frozen.quantizer.new_cache(storage=...)``;
    storage is chosen per cache, not in the scheme), then a ``storage`` keyword of ``empty_copy``
    and of ``freeze``. Adjust this one function if the option lands elsewhere.
    """
    quantizer = getattr(frozen, "quantizer", None)
    if quantizer is not None and "storage" in _parameters(quantizer.new_cache):
        packed: QuantizedCalibratingCache = quantizer.new_cache(storage="packed")
        return packed
    if "storage" in _parameters(frozen.empty_copy):
        return frozen.empty_copy(storage="packed")  # type: ignore[call-arg]
    if "storage" in _parameters(frozen.freeze):
        return frozen.empty_copy().unfreeze().freeze(storage="packed")  # type: ignore[call-arg]
    return None


def _parameters(function: Any) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


# ---------------------------------------------------------------------------- size
def effective_bits(cache: QuantizedCalibratingCache, seq_len: int, dtype: torch.dtype) -> tuple[float, str]:
    """Bits per key/value element the scheme of ``cache`` needs after ``seq_len`` tokens of one sequence, and how.

    Uses the library's own figure when it has one (a ``cache.effective_bits(seq_len)`` method
    or property). Otherwise, for a seed scheme only (a config that differs from the default
    one in ``symmetric``, ``include`` and ``exclude`` at most): 8-bit codes plus the
    per-(kv-head, channel) parameters needed to dequantize (fp32 scale; int32 zero point when
    asymmetric), stored once per model and counted against one sequence of ``seq_len``
    tokens; layers left out by ``exclude`` stay in ``dtype``. Any other scheme gets NaN: its
    size is the library's to state.
    """
    own = getattr(cache, "effective_bits", None)
    full = torch.empty((), dtype=dtype).element_size() * 8
    if callable(own):
        keywords = {"unquantized_bits": full} if "unquantized_bits" in _parameters(own) else {}
        for call in (lambda: own(seq_len, **keywords), lambda: own(seq_len=seq_len, **keywords)):
            try:
                return float(call()), "quantcache's own cache.effective_bits(L)"
            except TypeError:
                continue
    elif isinstance(own, (int, float)):
        return float(own), "quantcache's own effective_bits"
    config = cache.quant_config
    symmetric = bool(config.key.symmetric)
    seed_like = KVQuantConfig(symmetric=symmetric, include=config.include, exclude=config.exclude)
    if config != seed_like:
        return math.nan, "unknown: this quantcache gives no effective_bits for a non-seed scheme"
    param_bits = 32 if symmetric else 64
    per_layer = [(8.0 + param_bits / seq_len) if q.enabled else float(full) for q in cache.quantizers]
    formula = f"8 + {param_bits} / L (INT8 codes; fp32 scale{'' if symmetric else ' + int32 zero point'} per channel)"
    return sum(per_layer) / len(per_layer), formula


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (the dtype its KV states have)."""
    return next(model.parameters()).dtype
