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
=====================  ======================================================================

Version 1 files (before the checksum) still load; anything newer than this reader
is refused with the version named. :func:`validate_state` is the one judge of a state:
writing (:func:`write_state_file`), reading (:func:`read_state_file`) and ``quantcache
inspect`` all ask it through :func:`check_state`, so a state that one of them accepts is
never refused by another, and a truncated, corrupted, inconsistent or foreign file fails
with a message that names the problem instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantcache.errors import ConfigError, QuantStateError
from quantcache.outputs import apply_umask, remove_stale_staging, reporting_write_failures, staging_path
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.documents import load_json
from quantcache.state.fields import (
    PARAMETER_FIELDS,
    missing_fields,
    parameter_fields,
    statistic_fields,
    stream_problems,
)

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

FORMAT_NAME = "quantcache.kv_state"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
CALIBRATED = "calibrated"
IMPORTED_PREFIX = "imported from "
_STATE_KEY = re.compile(r"^layers\.(\d+)\.(key|value)\.([a-z_]+)$")
_ENCODING = {
    "quantize": "q = clamp(round(x / scale + zero_point), qmin, qmax)",
    "dequantize": "x = (q - zero_point) * scale",
    "rounding": "round half to even (torch.round), in float32",
    "layout": "states (batch, kv_heads, seq, head_dim); per_channel tensors (kv_heads, head_dim), head-major",
    "dtypes": {"zero_point": "I32", "every other tensor": "F32"},
}


def parse_state_key(name: str) -> tuple[int, str, str] | None:
    """``layers.3.key.scale`` -> ``(3, "key", "scale")``; ``None`` for any other name."""
    match = _STATE_KEY.match(name)
    return None if match is None else (int(match.group(1)), match.group(2), match.group(3))


@dataclass(frozen=True)
class StateFile:
    """What a state file holds: its tensors and the description of the model and scheme."""

    tensors: dict[str, torch.Tensor]
    config: KVQuantConfig
    mode: str
    num_layers: int
    kv_heads: int | None
    head_dim: int | None
    layer_names: list[str]
    model_type: str | None
    quantcache_version: str
    model_name: str | None = None
    model_revision: str | None = None
    model_config_sha256: str | None = None
    model_kv_config: dict[str, Any] | None = None
    """The model config's entries that shape its keys and values (heads, dims, RoPE, windows, norms; see
    :func:`quantcache.cache.model_facts.kv_config`), so a load can name what differs; absent in older files."""
    format_version: int = FORMAT_VERSION
    origin: str = CALIBRATED
    """``calibrated`` (parameters derive from the statistics) or ``imported from FORMAT`` (parameters
    read from another tool's checkpoint, with the range they represent as statistics). It decides
    whether parameters must equal what the statistics imply, so the checksum covers it."""
    quantized_layers: list[int] | None = None
    """The layers the writer quantized. The config's include/exclude say the same except where a
    layer cannot be quantized at all (one that shares another layer's KV, a linear-attention
    layer): only the writer knows those, so when it records the list the validator expects
    exactly these layers, and otherwise every layer the config quantizes."""

    def model(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "layer_names": self.layer_names,
            "name": self.model_name,
            "revision": self.model_revision,
            "config_sha256": self.model_config_sha256,
        }
        if self.model_kv_config is not None:
            facts["kv_config"] = self.model_kv_config
        if self.quantized_layers is not None:
            facts["quantized_layers"] = self.quantized_layers
        return facts

    def metadata(self) -> dict[str, str]:
        """The file's metadata, checksum included (every value one JSON document)."""
        fields = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "quantcache_version": self.quantcache_version,
            "config": self.config.to_dict(),
            "mode": self.mode,
            "model": self.model(),
            "encoding": _ENCODING,
            "origin": self.origin,
        }
        metadata = {key: json.dumps(value, sort_keys=True) for key, value in fields.items()}
        metadata["checksum"] = json.dumps(_checksum(self.tensors, metadata))
        return metadata


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != "checksum":
            digest.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------- validation
def validate_state(stored: StateFile) -> list[str]:
    """Every problem of a state (empty when it is valid): the one decision behind writing, reading and ``inspect``.

    Besides each stream's own tensors (:func:`~quantcache.state.fields.stream_problems`) it
    judges the state as a whole: every layer it should quantize is there (a cache refuses to
    load a state that leaves a quantized layer without statistics or parameters, so such a
    state must not be written either), a calibrated frozen state carries the statistics its
    parameters are checked against, and the origin is one this reader knows.
    """
    problems = _origin_problems(stored.origin)
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in stored.tensors.items():
        parsed = parse_state_key(name)
        if parsed is None:
            problems.append(f"unexpected tensor {name[:80]!r}")
            continue
        index, stream, field = parsed
        if index >= stored.num_layers:
            problems.append(f"{name}: layer {index} is beyond the model's {stored.num_layers} layers")
            continue
        module = stored.layer_names[index]
        args = stored.config.stream_args(stream, module)
        if not args.calibrates:
            problems.append(f"unexpected tensor {name[:80]!r}: the {stream} stream is dynamic and saves nothing")
            continue
        if field not in (*statistic_fields(stored.config, stream, module), *parameter_fields(args)):
            problems.append(f"unexpected tensor {name[:80]!r}")
            continue
        grouped.setdefault((index, stream), {})[field] = tensor
    frozen = stored.mode == "frozen"
    calibrated = stored.origin == CALIBRATED
    for index in sorted({index for index, _ in grouped}):
        name = stored.layer_names[index]
        if not stored.config.is_quantized(name):
            problems.append(f"layer {index} ({name}) has tensors but the stored config does not quantize it")
        for stream in ("key", "value"):
            args = stored.config.stream_args(stream, name)
            if not args.calibrates:
                continue
            prefix = f"layers.{index}.{stream}"
            fields = grouped.get((index, stream), {})
            if not frozen and any(field in fields for field in parameter_fields(args)):
                problems.append(f"{prefix}: parameters present although mode is 'calibrate'")
            statistics = statistic_fields(stored.config, stream, name)
            missing = missing_fields(
                prefix, fields, statistics, frozen=frozen, parameter_fields=parameter_fields(args)
            )
            if missing:
                short = ", ".join(name.rsplit(".", 1)[1] for name in missing)
                problems.append(f"layer {index} {stream} lacks {short} (missing {missing}, mode {stored.mode})")
                continue
            if frozen and calibrated and statistics and not any(field in fields for field in statistics):
                problems.append(
                    f"{prefix}: frozen parameters without the statistics they were calibrated from "
                    f"({', '.join(statistics)}), so nothing can show that they are what calibration made; save the "
                    "state from the cache that calibrated it, or recalibrate (parameters taken from another tool "
                    f"belong in an imported state: quantcache import, or load_state_dict(..., origin='{IMPORTED_PREFIX}"
                    "TOOL'))"
                )
                continue
            problems += stream_problems(
                prefix,
                fields,
                stored.config,
                stream,
                stored.kv_heads,
                stored.head_dim,
                derived=calibrated,
                module_name=name,
            )
    if not grouped and any(args.calibrates for args in stored.config.all_stream_args()):
        problems.append("the state holds no layer")
    else:
        problems += _coverage_problems(stored, {index for index, _ in grouped})
    return problems


def _origin_problems(origin: str) -> list[str]:
    if origin == CALIBRATED or (origin.startswith(IMPORTED_PREFIX) and origin.strip() != IMPORTED_PREFIX.strip()):
        return []
    return [f"origin {origin[:80]!r} is neither {CALIBRATED!r} nor '{IMPORTED_PREFIX}FORMAT'"]


def _coverage_problems(stored: StateFile, present: set[int]) -> list[str]:
    """What is wrong with the set of layers a state covers: recorded layers it cannot hold, quantized layers it lacks.

    A layer counts as covered when it has tensors; a quantized layer whose streams calibrate
    nothing (uncentred dynamic ones) has none to have.
    """
    by_config = [index for index, name in enumerate(stored.layer_names) if stored.config.is_quantized(name)]
    expected = by_config
    if stored.quantized_layers is not None:
        recorded = stored.quantized_layers
        valid = all(type(index) is int and 0 <= index < stored.num_layers for index in recorded)
        if not valid or recorded != sorted(set(recorded)):
            return [
                f"model.quantized_layers {str(recorded)[:80]} is not an ascending list of layer indices below "
                f"{stored.num_layers}"
            ]
        foreign = [index for index in recorded if index not in by_config]
        if foreign:
            return [
                f"model.quantized_layers names layers {foreign[:8]} ({stored.layer_names[foreign[0]]} ...) that the "
                "stored config does not quantize"
            ]
        expected = recorded
    absent = [
        index
        for index in expected
        if index not in present
        and any(stored.config.stream_args(stream, stored.layer_names[index]).calibrates for stream in ("key", "value"))
    ]
    if not absent:
        return []
    return [
        f"quantized layers {absent[:8]}{' ...' if len(absent) > 8 else ''} ({stored.layer_names[absent[0]]} ...) "
        "have no tensors, and a cache cannot load a state that leaves a quantized layer without statistics; "
        "run the calibration text through the whole model (every layer observes it), or exclude those layers"
    ]


def check_state(stored: StateFile, where: str | os.PathLike[str]) -> None:
    """Raise :class:`QuantStateError` naming ``where`` and the first problems :func:`validate_state` finds.

    What writing, reading and ``quantcache inspect`` call, so that they accept and refuse
    the same states with the same words.
    """
    problems = validate_state(stored)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise QuantStateError(f"{where}: invalid state: {'; '.join(problems[:3])}{more}")


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
    if str(version) not in {str(known) for known in _READABLE_VERSIONS} or (version_1 and str(version) != "1"):
        raise QuantStateError(
            f"{source}: state format version {version} is not supported by this quantcache "
            f"(reads versions {', '.join(map(str, _READABLE_VERSIONS))}); upgrade quantcache"
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
    if _json_field(metadata, "checksum", source) != _checksum(tensors, metadata):
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


def _kv_config(value: Any, source: object) -> dict[str, Any] | None:
    """The recorded ``kv_config`` mapping (``None`` in files written before it was recorded)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise QuantStateError(f"{source}: metadata 'model.kv_config' is corrupted (not a mapping of names)")
    return value
