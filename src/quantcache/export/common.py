"""What every export format shares: the frozen state it reads, the FP8 math, the format contract.

A serving engine does not read quantcache's state file; it reads scale tensors with its own
names and shapes inside a model checkpoint. Each format module (``ascend``, ``vllm``,
``modelopt``) turns a :class:`KVState` into those tensors and config entries, and reads
them back into per-channel INT8 parameters. This module holds the pieces they have in
common, so that a new format is one module and one registry entry.

Shapes: every per-stream tensor of a :class:`KVState` is ``(kv_heads, head_dim)`` float32
(``zero_point`` int32) on the CPU, one row per KV head, as in
:meth:`~quantcache.cache.cache.QuantizedCalibratingCache.state_dict`.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from quantcache.errors import ConfigError, QuantStateError
from quantcache.ops.engine_numerics import FP8_E4M3_MAX, fp8_scales
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.settings import Engine
from quantcache.state.file import StateFile, read_state_file

__all__ = [
    "FP8_E4M3_MAX",
    "STATE_FILE_NAME",
    "STREAMS",
    "ExportResult",
    "ImportedScales",
    "KVFormat",
    "KVState",
    "LayerParams",
    "StreamName",
    "StreamParams",
    "UnsupportedSchemeError",
    "fp8_scales",
    "fp8_zero_point_warnings",
    "int8_params_from_absmax",
]

StreamName = Literal["key", "value"]
STREAMS: tuple[StreamName, StreamName] = ("key", "value")

STATE_FILE_NAME = "kv_scales.safetensors"
"""The state file inside a run directory (what ``quantcache calibrate -o RUN`` writes)."""


class UnsupportedSchemeError(ConfigError):
    """The state holds a scheme the target format or engine cannot represent; the message names what would."""


@dataclass(frozen=True)
class StreamParams:
    """Frozen parameters of the keys or the values of one layer, each ``(kv_heads, head_dim)`` on the CPU."""

    min: torch.Tensor
    max: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


@dataclass(frozen=True)
class LayerParams:
    """One quantized attention layer: its index, its module name and both streams."""

    index: int
    name: str
    key: StreamParams
    value: StreamParams

    def stream(self, name: StreamName) -> StreamParams:
        return self.key if name == "key" else self.value


@dataclass(frozen=True)
class KVState:
    """A frozen calibration state in the form exporters need, independent of where it came from.

    ``layers`` lists only the quantized layers, by ascending index; ``layer_names`` names
    every attention layer of the model (``model.layers.{i}.self_attn`` ...), which is also
    the prefix the checkpoint tensors get.
    """

    layers: tuple[LayerParams, ...]
    layer_names: tuple[str, ...]
    config: KVQuantConfig
    kv_heads: int
    head_dim: int
    model_type: str | None

    def zero_point_streams(self) -> list[str]:
        """Where the config puts a stream that stores zero points (``qconfig.key``, ``layers[0].qconfig.value``).

        Every stream scheme a quantized layer of this state uses is asked, layer overrides
        included (:meth:`~quantcache.scheme.config.KVQuantConfig.stream_schemes`).
        """
        schemes = self.config.stream_schemes([self.layer_names[layer.index] for layer in self.layers])
        return [where for where, _, args in schemes if args.stores_zero_point]

    @property
    def symmetric(self) -> bool:
        """Whether no stream of any quantized layer stores zero points (see :meth:`zero_point_streams`)."""
        return not self.zero_point_streams()

    @property
    def scheme_text(self) -> str:
        """The streams' symmetry in words: ``symmetric``, ``asymmetric``, or which streams store zero points."""
        asymmetric = self.zero_point_streams()
        if not asymmetric:
            return "symmetric"
        schemes = self.config.stream_schemes([self.layer_names[layer.index] for layer in self.layers])
        if len(asymmetric) == len(schemes):
            return "asymmetric"
        return f"asymmetric in {', '.join(asymmetric)}, symmetric elsewhere"

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def excluded(self) -> list[int]:
        """Indices of the layers left unquantized (exclude patterns, layers without own KV)."""
        quantized = {layer.index for layer in self.layers}
        return [index for index in range(self.num_layers) if index not in quantized]

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        config: KVQuantConfig,
        layer_names: list[str] | tuple[str, ...],
        kv_heads: int | None,
        head_dim: int | None,
        model_type: str | None,
        source: str,
    ) -> KVState:
        """Group flat ``layers.{i}.{key,value}.{min,max,scale,zero_point}`` tensors by layer.

        Only the scheme engines read can be exported: every stream of every quantized layer
        (layer overrides included) a static INT8 per-channel min/max range without rotation
        (the seed scheme, from which FP8 scales are derived too), and a cache that quantizes
        every token after RoPE (:meth:`~quantcache.scheme.config.KVQuantConfig.export_problems`).
        """
        problems = config.export_problems(list(layer_names))
        if problems:
            raise QuantStateError(
                f"{source}: the state cannot be exported: {'; '.join(problems)}. Serving engines read static "
                "per-channel INT8 ranges: calibrate with the c8 or seed scheme (quantcache calibrate --preset c8) for "
                "deployment"
            )
        fields = ("min", "max", "scale", "zero_point")
        indices = sorted({int(name.split(".")[1]) for name in tensors if name.startswith("layers.")})
        if not indices:
            raise QuantStateError(f"{source}: the state holds no layer tensors; nothing to export")
        layers: list[LayerParams] = []
        for index in indices:
            streams: dict[str, StreamParams] = {}
            for stream in STREAMS:
                missing = [f for f in fields if f"layers.{index}.{stream}.{f}" not in tensors]
                if missing:
                    what = "not frozen" if "scale" in missing else f"missing {missing}"
                    raise QuantStateError(
                        f"{source}: layer {index} {stream} is {what}; export needs a frozen state "
                        "(call cache.freeze() before saving, or use the file quantcache calibrate writes)"
                    )
                values = [tensors[f"layers.{index}.{stream}.{f}"].detach().to("cpu") for f in fields]
                streams[stream] = StreamParams(
                    values[0].float(), values[1].float(), values[2].float(), values[3].to(torch.int32)
                )
            if index >= len(layer_names):
                raise QuantStateError(f"{source}: layer index {index} outside the model's {len(layer_names)} layers")
            layers.append(LayerParams(index, layer_names[index], streams["key"], streams["value"]))
        shape = tuple(layers[0].key.scale.shape)
        declared = (kv_heads, head_dim)
        shapes = {tuple(getattr(layer.stream(s), f).shape) for layer in layers for s in STREAMS for f in fields}
        if len(shape) != 2 or len(shapes) != 1 or (None not in declared and shape != declared):
            raise QuantStateError(
                f"{source}: parameter shapes {sorted(shapes)} do not all equal (kv_heads, head_dim) = {declared}"
            )
        return cls(tuple(layers), tuple(layer_names), config, int(shape[0]), int(shape[1]), model_type)

    @classmethod
    def load(cls, source: Any) -> KVState:
        """Accept a frozen ``KVQuantizer`` (or a cache of one), a ``StateFile``, a state file path or a run dir."""
        from quantcache.cache.cache import QuantizedCalibratingCache
        from quantcache.cache.kv_quantizer import KVQuantizer

        if isinstance(source, KVState):
            return source
        if isinstance(source, QuantizedCalibratingCache):
            source = source.quantizer
        if isinstance(source, KVQuantizer):
            if not source.is_frozen:
                raise QuantStateError("the quantizer is not frozen; call freeze() before exporting it")
            return cls.from_tensors(
                source.state_dict(),
                config=source.quant_config,
                layer_names=source.layer_names,
                kv_heads=source.kv_heads,
                head_dim=source.head_dim,
                model_type=source.model_type,
                source="cache",
            )
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                path = path / STATE_FILE_NAME
            source = read_state_file(path)
            label = str(path)
        else:
            label = "state"
        if not isinstance(source, StateFile):
            raise TypeError(
                f"expected a frozen KVQuantizer or cache, a StateFile or a state file path, got {type(source).__name__}"
            )
        if source.mode != "frozen":
            raise QuantStateError(f"{label} holds calibration statistics only (mode {source.mode!r}); freeze it first")
        return cls.from_tensors(
            source.tensors,
            config=source.config,
            layer_names=source.layer_names,
            kv_heads=source.kv_heads,
            head_dim=source.head_dim,
            model_type=source.model_type,
            source=label,
        )


# ---------------------------------------------------------------------------- FP8 math
def fp8_zero_point_warnings(state: KVState) -> list[str]:
    """What an FP8 export of ``state`` leaves out: the zero points of its asymmetric streams, if any.

    FP8 KV caches are symmetric (``x / scale``, no offset). Their scale is ``absmax / 448`` of
    the calibrated ``[min, max]`` range, which an asymmetric stream has as well (its
    statistics are the same min/max; only the INT8 parameters differ), so such a stream
    still exports correctly, to the same scale its symmetric calibration would give.
    """
    asymmetric = state.zero_point_streams()
    if not asymmetric:
        return []
    return [
        f"{', '.join(asymmetric)} calibrated asymmetric INT8; FP8 KV caches are symmetric, so those streams' "
        "scales cover the absolute maximum of their calibrated ranges and their zero points are not written"
    ]


def int8_params_from_absmax(fp8_scale: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What an FP8 scale says about the calibrated range, as quantcache per-channel min/max.

    ``fp8_scale`` is one scale (any shape with one element) or one per KV head. The range
    it encodes is ``[-448 * scale, 448 * scale]`` for every channel of the tensor or head;
    the result is that range broadcast to ``(kv_heads, head_dim)`` (float32 min, max).
    """
    flat = fp8_scale.detach().double().flatten()
    if flat.numel() not in (1, kv_heads):
        raise QuantStateError(
            f"FP8 scale has {flat.numel()} values; expected 1 (per tensor) or {kv_heads} (one per KV head)"
        )
    if not bool(torch.isfinite(flat).all()) or not bool((flat > 0).all()):
        raise QuantStateError(f"FP8 scale holds non-positive or non-finite values: {flat.tolist()[:4]}")
    # float32(448 * scale) divides back to exactly ``scale`` for every scale fp8_scales makes from a
    # float32 absmax (checked over a whole binade), so export -> import -> export is bit-exact for
    # quantcache's own scales; a foreign scale comes back within one float32 step.
    absmax = (flat.float().double() * FP8_E4M3_MAX).float()
    high = absmax.expand(kv_heads).unsqueeze(1).expand(kv_heads, head_dim).contiguous()
    return -high, high


# ---------------------------------------------------------------------------- the contract
@dataclass
class ImportedScales:
    """Per-layer INT8 parameters read from a foreign checkpoint, ready to load into a cache.

    ``streams[layer_index][stream]`` is ``(min, max, scale, zero_point)``, each
    ``(kv_heads, head_dim)``; ``scale``/``zero_point`` are ``None`` where the format only
    gives a range (FP8), so quantcache's own math derives them from ``min``/``max``.
    """

    streams: dict[int, dict[StreamName, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]]
    symmetric: bool
    note: str


@dataclass
class ExportResult:
    """What an export wrote and how to serve it."""

    directory: Path
    format: str
    scales_only: bool
    files: list[str] = dataclasses.field(default_factory=list)
    tensors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    serve_command: str = ""


class KVFormat(ABC):
    """One target format: names, shapes and config entries of the KV scales, both directions.

    Subclasses define ``name``, ``numerics``, an ``Options`` dataclass (the format's own
    export switches, validated by :meth:`options`), and the five methods below. The
    checkpoint plumbing (weights, shards, index, atomic write) is shared and lives in
    :mod:`quantcache.export.checkpoint`.
    """

    name: ClassVar[str]
    numerics: ClassVar[Engine]
    """The engine whose arithmetic this format writes for: ``quantcache evaluate --as NAME`` measures a
    state under :func:`quantcache.ops.engine_numerics.engine_numerics` of it (see :func:`~.api.served_numerics`)."""
    widest_options: ClassVar[Mapping[str, Any]] = {}
    """The options under which the export accepts every state it can write at all: what ``evaluate --as``
    checks a state against (evaluating a checkpoint written with e.g. ``--allow-asymmetric`` shows its cost)."""

    @dataclass(frozen=True)
    class Options:
        """No options."""

    def options(self, given: Mapping[str, Any]) -> Any:
        """Build the format's options, naming unknown ones and the allowed set."""
        allowed = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(
                f"format {self.name!r} has no option {unknown[0]!r}; its options: {', '.join(allowed) or 'none'}"
            )
        return self.Options(**given)

    @abstractmethod
    def check(self, state: KVState, options: Any, source: Path | None, weight_names: set[str] | None) -> list[str]:
        """Refuse what the target cannot represent (raise); return warnings for what it represents lossily.

        ``source`` is the directory holding the model's files (its config.json ...) and
        ``weight_names`` its tensor names; both are ``None`` for a scales-only export.
        """

    @abstractmethod
    def scale_tensors(self, state: KVState, options: Any) -> dict[str, torch.Tensor]:
        """The tensors to write into the scale shard, by checkpoint name."""

    @abstractmethod
    def write_config(
        self, directory: Path, state: KVState, options: Any, tensors: Mapping[str, torch.Tensor], *, scales_only: bool
    ) -> list[str]:
        """Write or merge the format's config files in ``directory``; return the file names written.

        With ``scales_only`` the files are fragments named ``*.fragment.json`` that must be
        merged into an existing checkpoint (never a file an engine would mistake for a full one).
        """

    @abstractmethod
    def merge_note(self, state: KVState, options: Any) -> str:
        """Markdown: how to merge a scales-only export into an existing checkpoint of this format."""

    @abstractmethod
    def serve_command(self, directory: Path, state: KVState, options: Any) -> str:
        """The command that serves the exported directory."""

    @abstractmethod
    def read(
        self, checkpoint: Path, names: list[str], tensor_files: Mapping[str, Path], kv_shape: tuple[int, int]
    ) -> ImportedScales:
        """Read this format's KV scales from ``checkpoint`` (only those tensors) as INT8 parameters.

        ``names`` are the model's attention module names (index = layer index);
        ``tensor_files`` maps every tensor name in the checkpoint to its file, from headers only.
        """
