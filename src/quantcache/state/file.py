"""The calibration state: one schema, one validator, one safetensors file with JSON metadata.

A state is what calibration produced for one model: the config, the model it was made
for, and per layer and stream the observer's statistics (``min``, ``max``) and, once
frozen, the parameters (``scale``, ``zero_point``). In memory it is a flat tensor dict
(:meth:`QuantizedCalibratingCache.state_dict`, keys ``layers.{i}.{key,value}.{field}``)
plus a :class:`StateFile`; on disk it is a safetensors file (no pickle) whose metadata
values are each one JSON document (format version 2, see README's "State file format"):

=====================  ======================================================================
``format``             ``"quantcache.kv_state"``
``format_version``     ``2``
``checksum``           ``"sha256:..."`` of every tensor (name, dtype, shape, bytes) and every
                       other metadata field; any flipped byte is refused on read
``config``             the :class:`~quantcache.scheme.config.KVQuantConfig` (``to_dict``)
``mode``               ``"calibrate"`` (statistics only) or ``"frozen"`` (with parameters)
``model``              ``model_type``, ``num_layers``, ``kv_heads``, ``head_dim``,
                       ``layer_names``, and where known ``name``, ``revision``, ``config_sha256``
``encoding``           value range, rounding, dequantization formula and tensor axis layout
``origin``             ``"calibrated"`` or ``"imported from FORMAT"``
``calibration``        where recorded, ``{"tokens_per_window": N, "windows": M}``: how long the
                       calibration windows were (absent in older files and imported states)
=====================  ======================================================================

Version 1 files (before the checksum) still load; anything newer than this reader
is refused with the version named. :func:`validate_state` is the one judge of a state:
writing (:func:`write_state_file`), reading (:func:`read_state_file`) and ``quantcache
inspect`` all ask it through :func:`check_state`, so a state that one of them accepts is
never refused by another, and a truncated, corrupted, inconsistent or foreign file fails
with a message that names the problem instead of loading garbage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantcache.errors import ConfigError, QuantStateError
from quantcache.outputs import apply_umask, remove_stale_staging, reporting_write_failures, staging_path
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.documents import load_json
from quantcache.state.fields import PARAMETER_FIELDS, stream_problems
from quantcache.state.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    CalibrationLength,
    StateFile,
    checksum,
    parse_state_key,
)
from quantcache.state.validation import check_state, validate_state

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PARAMETER_FIELDS",
    "QuantStateError",
    "StateFile",
    "check_state",
    "open_state_file",
    "parse_state_key",
    "read_state_file",
    "stream_problems",
    "validate_state",
    "write_state_file",
]

# ---------------------------------------------------------------------------- files
def write_state_file(path: str | os.PathLike[str], state: StateFile) -> Path:
    """Write atomically (temporary file, then rename): a crash never leaves half a state.

    A state :func:`validate_state` finds a problem in is refused before anything is written:
    a file this function wrote always loads. The file gets the permissions any new file gets
    under the process umask; a full disk is a :class:`QuantStateError` naming the path, with
    no temporary file left (nor those of earlier writers that were killed).
    """
    target = Path(path)
    if target.is_dir():
        raise QuantStateError(f"{target} is a directory; give a file name such as {target / 'kv_scales.safetensors'}")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.tensors.items()}
    check_state(StateFile(**{**state.__dict__, "tensors": tensors}), target)
    with reporting_write_failures(target, QuantStateError, "the state"):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        temporary = staging_path(target, "tmp")
        try:
            save_file(tensors, str(temporary), metadata=StateFile(**{**state.__dict__, "tensors": tensors}).metadata())
            apply_umask(temporary)  # safetensors writes through a private (0600) file
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    return target


def _json_field(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        raise QuantStateError(f"{path}: metadata lacks {key!r}; the file was not written by quantcache")
    try:
        return load_json(metadata[key], what="the document")
    except (json.JSONDecodeError, ConfigError) as error:
        raise QuantStateError(f"{path}: metadata field {key!r} is corrupted ({error})") from error


def _open(source: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not source.exists():
        raise QuantStateError(f"state file not found: {source}")
    if source.is_dir():
        raise QuantStateError(f"{source} is a directory, not a state file (give kv_scales.safetensors inside it)")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except PermissionError as error:
        raise QuantStateError(f"{source}: permission denied") from error
    except Exception as error:  # safetensors raises several types for damaged files
        raise QuantStateError(
            f"{source}: not a readable safetensors file (truncated or corrupted?): {str(error)[:200]}"
        ) from error
    return metadata, tensors


def read_state_file(path: str | os.PathLike[str]) -> StateFile:
    """Read a state file, verify its checksum, and validate its metadata and tensors (:func:`check_state`)."""
    stored = open_state_file(path)
    check_state(stored, path)
    return stored


def open_state_file(path: str | os.PathLike[str]) -> StateFile:
    """Read a state file and verify its checksum and metadata, without judging the state (see :func:`check_state`)."""
    source = Path(path)
    metadata, tensors = _open(source)
    version_1 = metadata.get("format") == FORMAT_NAME  # version 1 wrote format and version as plain strings
    declared = metadata.get("format_version", "?") if version_1 else _loads_or_none(metadata.get("format", ""))
    if not version_1 and declared != FORMAT_NAME:
        raise QuantStateError(
            f"{source}: not a quantcache KV state (format {metadata.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = declared if version_1 else _loads_or_none(metadata.get("format_version", ""))
    if str(version) not in {str(known) for known in READABLE_VERSIONS} or (version_1 and str(version) != "1"):
        raise QuantStateError(
            f"{source}: state format version {version} is not supported by this quantcache "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade quantcache"
        )
    return _read_v1(metadata, tensors, source) if version_1 else _read_v2(metadata, tensors, source)


def _loads_or_none(text: str) -> Any:
    try:
        return load_json(text)
    except (json.JSONDecodeError, ConfigError):
        return None


def _config(data: Any, source: Path) -> KVQuantConfig:
    try:
        return KVQuantConfig.from_dict(data, stored=True)
    except ConfigError as error:
        raise QuantStateError(f"{source}: stored config is invalid: {error}") from error


def _mode(mode: Any, source: Path) -> str:
    if mode not in ("calibrate", "frozen"):
        raise QuantStateError(f"{source}: metadata 'mode' is {mode!r}, expected 'calibrate' or 'frozen'")
    return str(mode)


def _model_facts(num_layers: Any, layer_names: Any, source: Path) -> tuple[int, list[str]]:
    if not isinstance(num_layers, int) or not isinstance(layer_names, list) or len(layer_names) != num_layers:
        raise QuantStateError(f"{source}: metadata num_layers/layer_names are inconsistent")
    return num_layers, [str(name) for name in layer_names]


def _read_v2(metadata: dict[str, str], tensors: dict[str, torch.Tensor], source: Path) -> StateFile:
    config = _config(_json_field(metadata, "config", source), source)
    mode = _mode(_json_field(metadata, "mode", source), source)
    model = _json_field(metadata, "model", source)
    if not isinstance(model, dict):
        raise QuantStateError(f"{source}: metadata 'model' is corrupted")
    num_layers, layer_names = _model_facts(model.get("num_layers"), model.get("layer_names"), source)
    quantized_layers = model.get("quantized_layers")
    if quantized_layers is not None and not isinstance(quantized_layers, list):
        raise QuantStateError(f"{source}: metadata 'model.quantized_layers' is corrupted (not a list)")
    origin = _json_field(metadata, "origin", source)
    if not isinstance(origin, str):
        raise QuantStateError(f"{source}: metadata 'origin' is corrupted (not a string)")
    if _json_field(metadata, "checksum", source) != checksum(tensors, metadata):
        raise QuantStateError(
            f"{source}: checksum mismatch: the file was altered or damaged after it was written; recalibrate "
            "or restore it from a copy"
        )
    return StateFile(
        tensors=tensors,
        config=config,
        mode=mode,
        num_layers=num_layers,
        kv_heads=model.get("kv_heads"),
        head_dim=model.get("head_dim"),
        layer_names=layer_names,
        model_type=model.get("model_type"),
        quantcache_version=str(_json_field(metadata, "quantcache_version", source)),
        model_name=model.get("name"),
        model_revision=model.get("revision"),
        model_config_sha256=model.get("config_sha256"),
        model_kv_config=_kv_config(model.get("kv_config"), source),
        origin=origin,
        quantized_layers=quantized_layers,
        calibration=_calibration(metadata, source),
    )


def _read_v1(metadata: dict[str, str], tensors: dict[str, torch.Tensor], source: Path) -> StateFile:
    """Format version 1: plain-string format fields, JSON elsewhere, no checksum."""
    config = _config(_json_field(metadata, "config", source), source)
    mode = _mode(metadata.get("mode"), source)
    num_layers, layer_names = _model_facts(
        _json_field(metadata, "num_layers", source), _json_field(metadata, "layer_names", source), source
    )
    return StateFile(
        tensors=tensors,
        config=config,
        mode=mode,
        num_layers=num_layers,
        kv_heads=_json_field(metadata, "kv_heads", source),
        head_dim=_json_field(metadata, "head_dim", source),
        layer_names=layer_names,
        model_type=_json_field(metadata, "model_type", source),
        quantcache_version=metadata.get("quantcache_version", "unknown"),
        format_version=1,
    )


def _calibration(metadata: Mapping[str, str], source: Path) -> CalibrationLength | None:
    """The recorded calibration length (``None`` in files written before it was recorded)."""
    if "calibration" not in metadata:
        return None
    recorded = _json_field(metadata, "calibration", source)
    try:
        return CalibrationLength.from_dict(recorded)
    except ValueError as error:
        raise QuantStateError(
            f"{source}: metadata 'calibration' is malformed ({error}); it records how long the calibration "
            "windows were: recalibrate, or restore the file from a copy"
        ) from error


def _kv_config(value: Any, source: object) -> dict[str, Any] | None:
    """The recorded ``kv_config`` mapping (``None`` in files written before it was recorded)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise QuantStateError(f"{source}: metadata 'model.kv_config' is corrupted (not a mapping of names)")
    return value
