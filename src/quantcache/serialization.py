"""The saved calibration state: one safetensors file with JSON metadata, no pickle.

The file holds the tensors of :meth:`QuantizedCalibratingCache.state_dict`
(``layers.{i}.{key,value}.{min,max,scale,zero_point}``, each ``(kv_heads, head_dim)``)
and string metadata that says what made them: the format and its version, the
quantization config, the model's layer count, kv_heads, head_dim and attention module
names. Reading validates all of it, so a truncated, corrupted or foreign file fails
with a message that names the problem instead of loading garbage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, KVQuantConfig
from .errors import QuantStateError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "QuantStateError", "StateFile", "read_state_file", "write_state_file"]

FORMAT_NAME = "quantcache.kv_state"
FORMAT_VERSION = 1


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

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "quantcache_version": self.quantcache_version,
            "config": json.dumps(self.config.to_dict()),
            "mode": self.mode,
            "num_layers": str(self.num_layers),
            "kv_heads": json.dumps(self.kv_heads),
            "head_dim": json.dumps(self.head_dim),
            "layer_names": json.dumps(self.layer_names),
            "model_type": json.dumps(self.model_type),
        }


def write_state_file(path: str | os.PathLike[str], state: StateFile) -> Path:
    """Write atomically (temporary file, then rename): a crash never leaves half a state."""
    target = Path(path)
    if target.is_dir():
        raise QuantStateError(f"{target} is a directory; give a file name such as {target / 'kv_scales.safetensors'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.tensors.items()}
    try:
        save_file(tensors, str(temporary), metadata=state.metadata())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _field(metadata: dict[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        raise QuantStateError(f"{path}: metadata lacks {key!r}; the file was not written by quantcache")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise QuantStateError(f"{path}: metadata field {key!r} is corrupted ({error})") from error


def read_state_file(path: str | os.PathLike[str]) -> StateFile:
    """Read and validate a state file written by :func:`write_state_file`."""
    source = Path(path)
    if not source.is_file():
        raise QuantStateError(f"state file not found: {source}")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except QuantStateError:
        raise
    except Exception as error:  # safetensors raises several types for damaged files
        raise QuantStateError(
            f"{source}: not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error
    if metadata.get("format") != FORMAT_NAME:
        raise QuantStateError(
            f"{source}: not a quantcache KV state (format {metadata.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = metadata.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise QuantStateError(
            f"{source}: state format version {version} is not supported by this quantcache "
            f"(reads version {FORMAT_VERSION}); upgrade quantcache"
        )
    try:
        config = KVQuantConfig.from_dict(_field(metadata, "config", source))
    except ConfigError as error:
        raise QuantStateError(f"{source}: stored config is invalid: {error}") from error
    mode = metadata.get("mode")
    if mode not in ("calibrate", "frozen"):
        raise QuantStateError(f"{source}: metadata 'mode' is {mode!r}, expected 'calibrate' or 'frozen'")
    num_layers = _field(metadata, "num_layers", source)
    layer_names = _field(metadata, "layer_names", source)
    if not isinstance(num_layers, int) or not isinstance(layer_names, list) or len(layer_names) != num_layers:
        raise QuantStateError(f"{source}: metadata num_layers/layer_names are inconsistent")
    return StateFile(
        tensors=tensors,
        config=config,
        mode=mode,
        num_layers=num_layers,
        kv_heads=_field(metadata, "kv_heads", source),
        head_dim=_field(metadata, "head_dim", source),
        layer_names=[str(name) for name in layer_names],
        model_type=_field(metadata, "model_type", source),
        quantcache_version=metadata.get("quantcache_version", "unknown"),
    )
