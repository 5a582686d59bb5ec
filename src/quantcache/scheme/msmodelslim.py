"""msModelSlim's ``dynamic_cache`` processor item, the shape configs are read from and written in.

A processor item is ``{type: dynamic_cache, qconfig: {...}, include: [...], exclude: [...]}``;
quantcache adds ``qconfig.key`` / ``qconfig.value`` for streams configured apart, ``layers`` for
per-layer overrides and the whole-cache settings. It may stand alone, as a one-item list, or inside
a full msModelSlim document (``spec: {process: [...]}``) beside processors of other tools. This
module turns any of those into the keyword arguments of
:class:`~quantcache.scheme.config.KVQuantConfig`, refusing what is not a config with the key named.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from quantcache.errors import ConfigError
from quantcache.scheme.documents import load_yaml
from quantcache.scheme.settings import STREAM_KEYS, short_repr

__all__ = ["ITEM_FIELDS", "PROCESSOR_TYPE", "STORAGE_MOVED", "item_fields", "key_text", "read_yaml_item"]

PROCESSOR_TYPE = "dynamic_cache"
ITEM_FIELDS = (
    "include",
    "exclude",
    "layers",
    "sink_tokens",
    "residual_window",
    "residual_block",
    "pre_rope_keys",
    "rope_center",
)
"""The processor item's own keys beside ``type`` and ``qconfig``: each is a KVQuantConfig field of that name."""
_ITEM_KEYS = ("type", "qconfig", *ITEM_FIELDS)
_STREAMS = ("key", "value")
STORAGE_MOVED = (
    "storage (fake or packed) is what one cache keeps, chosen per cache and not part of the scheme: "
    "quantizer.new_cache(storage=...) or QuantizedCalibratingCache(model, config, storage=...)"
)


def key_text(key: Any) -> str:
    """A mapping key as an error message shows it: the string itself (cut), or a bounded repr."""
    return key[:80] if isinstance(key, str) else short_repr(key)


def item_fields(data: Mapping[str, Any], *, stored: bool = False) -> dict[str, Any]:
    """The ``KVQuantConfig`` keyword arguments of a processor item or a full document.

    The flat ``qconfig`` keys describe both streams; ``qconfig.key`` / ``qconfig.value`` are
    mappings the config merges onto them. ``stored``: a config quantcache saved, whose
    ``storage`` key (written by earlier versions) is dropped; elsewhere it is an error.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping at the top of the config, got {type(data).__name__}")
    if "spec" in data:
        data = _document_item(data)
    if "storage" in data:
        if not stored:
            raise ConfigError(f"storage: {STORAGE_MOVED}; remove storage from the config")
        data = {key: item for key, item in data.items() if key != "storage"}
    unknown = [key for key in data if key not in _ITEM_KEYS]
    if unknown:
        raise ConfigError(f"unknown key '{key_text(unknown[0])}' in processor item; allowed: {', '.join(_ITEM_KEYS)}")
    kind = data.get("type", PROCESSOR_TYPE)
    if kind != PROCESSOR_TYPE:
        raise ConfigError(f"type: expected {PROCESSOR_TYPE!r}, got {short_repr(kind)}")
    qconfig = data.get("qconfig", {}) or {}
    if not isinstance(qconfig, Mapping):
        raise ConfigError(f"qconfig: expected a mapping, got {type(qconfig).__name__}")
    allowed = (*STREAM_KEYS, *_STREAMS)
    unknown = [key for key in qconfig if key not in allowed]
    if unknown:
        raise ConfigError(f"unknown key 'qconfig.{key_text(unknown[0])}'; allowed: {', '.join(allowed)}")
    fields: dict[str, Any] = {key: qconfig[key] for key in STREAM_KEYS if key in qconfig}
    for stream in _STREAMS:
        if stream in qconfig:
            overrides = qconfig[stream]
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"qconfig.{stream}: expected a mapping, got {type(overrides).__name__}")
            fields[stream] = overrides  # merged onto the flat keys by the config
    for key in ITEM_FIELDS:
        if key in data and data[key] is not None:
            fields[key] = data[key]
    return fields


def _document_item(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The one ``dynamic_cache`` item of a full msModelSlim document."""
    spec = data["spec"]
    if not isinstance(spec, Mapping) or "process" not in spec:
        raise ConfigError("spec: expected a mapping with a 'process' list")
    process = spec["process"]
    if not isinstance(process, list):
        raise ConfigError(f"spec.process: expected a list of processor items, got {type(process).__name__}")
    items = [item for item in process if isinstance(item, Mapping) and item.get("type") == PROCESSOR_TYPE]
    if not items:
        kinds = short_repr([item.get("type") for item in process[:20] if isinstance(item, Mapping)])
        raise ConfigError(f"spec.process has no 'dynamic_cache' item (found types: {kinds})")
    if len(items) > 1:
        raise ConfigError(f"spec.process has {len(items)} 'dynamic_cache' items; keep exactly one")
    item: Mapping[str, Any] = items[0]
    return item


def read_yaml_item(source: str | Path) -> Any:
    """The YAML of a file path or a string, a one-item list unwrapped (:func:`item_fields` judges the rest)."""
    text: str
    named_file = "\n" not in str(source) and (str(source).endswith((".yaml", ".yml")) or Path(source).is_file())
    if isinstance(source, Path) or named_file:
        path = Path(source)
        if not path.is_file():
            what = "is a directory, not a config file" if path.is_dir() else "not found"
            raise ConfigError(f"config file {what}: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start})") from error
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from error
    else:
        text = source
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config is not valid YAML: {str(error)[:300]}") from error
    if isinstance(data, list):
        items = [item for item in data if isinstance(item, Mapping) and item.get("type") == PROCESSOR_TYPE]
        if len(items) != 1:
            raise ConfigError(f"expected exactly one 'dynamic_cache' item in the list, found {len(items)}")
        data = items[0]
    if data is None:
        raise ConfigError("config is empty")
    return data
