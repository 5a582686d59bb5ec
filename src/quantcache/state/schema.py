"""What a calibration state holds: its tensors' names, the :class:`StateFile` record and its metadata.

The on-disk layout (:mod:`quantcache.state.file`) and the judge of a state
(:mod:`quantcache.state.validation`) both read this one description.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from quantcache.scheme.config import KVQuantConfig

__all__ = [
    "CALIBRATED",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMPORTED_PREFIX",
    "READABLE_VERSIONS",
    "CalibrationLength",
    "StateFile",
    "checksum",
    "parse_state_key",
]

FORMAT_NAME = "quantcache.kv_state"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
class CalibrationLength:
    """How long the calibration windows were: the tokens of the longest window, and how many windows.

    A window is one sequence of one cache that calibrated (a row of a batch: a batch of
    ``B`` rows counts ``B`` windows); its tokens count from the first token the cache held,
    padding included. Stored under the metadata key ``calibration`` as
    ``{"tokens_per_window": N, "windows": M}``.
    """

    tokens_per_window: int
    windows: int

    def problems(self) -> list[str]:
        """What is wrong with the values (empty when both are positive integers)."""
        return [
            f"calibration.{name} is {value!r}, expected a positive integer"
            for name, value in (("tokens_per_window", self.tokens_per_window), ("windows", self.windows))
            if type(value) is not int or value < 1
        ]

    def to_dict(self) -> dict[str, int]:
        return {"tokens_per_window": self.tokens_per_window, "windows": self.windows}

    @classmethod
    def from_dict(cls, data: Any) -> CalibrationLength:
        """Read :meth:`to_dict`'s mapping back; ``ValueError`` names what does not fit."""
        expected = {"tokens_per_window", "windows"}
        if not isinstance(data, Mapping) or set(data) != expected:
            shown = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"expected {{'tokens_per_window': N, 'windows': M}}, got {str(shown)[:80]}")
        length = cls(tokens_per_window=data["tokens_per_window"], windows=data["windows"])
        problems = length.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return length


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
    calibration: CalibrationLength | None = None
    """How long the calibration windows were (metadata key ``calibration``); ``None`` when not recorded
    (files written before it was, imported states)."""

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
        if self.calibration is not None:
            fields["calibration"] = self.calibration.to_dict()
        metadata = {key: json.dumps(value, sort_keys=True) for key, value in fields.items()}
        metadata["checksum"] = json.dumps(checksum(self.tensors, metadata))
        return metadata


def checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != "checksum":
            digest.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
