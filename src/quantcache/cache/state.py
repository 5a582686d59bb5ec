"""The quantizer's side of the calibration state: ``state_dict`` / ``load_state_dict`` and files.

:class:`QuantizerStateMixin` is mixed into :class:`~quantcache.cache.kv_quantizer.KVQuantizer`;
it turns the layer quantizers' statistics and parameters into the flat tensors of
:mod:`quantcache.state.file` and back, validating everything before it changes anything (a
failed load leaves the quantizer as it was), and checks that a file was made for this model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig

from quantcache.cache.layer import LayerQuantizer
from quantcache.errors import CalibrationError, QuantStateError
from quantcache.ops.quantize import QuantParams
from quantcache.scheme.args import short_repr
from quantcache.scheme.config import KVQuantConfig
from quantcache.state.fields import (
    CENTER_FIELDS,
    PARAMETER_FIELDS,
    QUERY_MODEL_FIELDS,
    missing_fields,
    parameter_fields,
    stream_problems,
)
from quantcache.state.file import StateFile, check_state, parse_state_key, read_state_file, write_state_file
from quantcache.state.schema import CalibrationLength

__all__ = ["CacheMode", "QuantizerStateMixin"]

_Quantizer = TypeVar("_Quantizer", bound="QuantizerStateMixin")
_FROZEN_FIELDS = (*PARAMETER_FIELDS, *CENTER_FIELDS)  # any of them in a state means it was frozen


class CacheMode(str, Enum):
    """What a cache's ``update`` does with new key/value states: observe them, or quantize them."""

    CALIBRATE = "calibrate"
    FROZEN = "frozen"


class QuantizerStateMixin:
    """State and file methods of a quantizer (see the module docstring)."""

    quantizers: list[LayerQuantizer]
    quant_config: KVQuantConfig
    kv_heads: int | None
    head_dim: int | None
    layer_names: list[str]
    model_type: str | None
    model_name: str | None
    model_config_sha256: str | None
    model_config_digests: tuple[str, ...]
    model_kv_config: dict[str, Any]
    mode: CacheMode
    _calibration_length: CalibrationLength | None
    origin: str = "calibrated"
    """``calibrated``, or ``imported from FORMAT`` for parameters read from another tool (see serialization)."""

    @property
    def is_frozen(self) -> bool:
        raise NotImplementedError

    @property
    def quantized_layers(self) -> list[int]:
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        raise NotImplementedError

    def freeze(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors ``layers.{i}.{key,value}.{field}``: the observer's statistics and, once frozen, parameters.

        For the seed scheme the fields are ``min``, ``max`` and ``scale``, ``zero_point``,
        each ``(kv_heads, head_dim)``: min/max/scale float32, zero_point int32. Only
        quantized layers that were observed (or loaded) appear.
        """
        state: dict[str, torch.Tensor] = {}
        for quantizer in self.quantizers:
            if not quantizer.enabled:
                continue
            for stream_name, stream in quantizer.streams:
                prefix = f"layers.{quantizer.index}.{stream_name}"
                for field, tensor in stream.statistics.items():
                    state[f"{prefix}.{field}"] = tensor.detach().clone()
                if stream.params is not None:
                    state[f"{prefix}.scale"] = stream.params.scale.detach().clone()
                    state[f"{prefix}.zero_point"] = stream.params.zero_point.detach().clone()
                if stream.center is not None:
                    state[f"{prefix}.center"] = stream.center.detach().clone()
                if stream.channel_scale is not None:
                    state[f"{prefix}.channel_scale"] = stream.channel_scale.detach().clone()
                for field, tensor in zip(QUERY_MODEL_FIELDS, stream.space.query_model or (), strict=False):
                    state[f"{prefix}.{field}"] = tensor.detach().clone()
        return state

    def load_state_dict(
        self, state: Mapping[str, torch.Tensor], strict: bool = True, *, origin: str = "calibrated"
    ) -> list[str]:
        """Restore statistics (and parameters, making the cache frozen) from :meth:`state_dict`.

        With ``strict`` (default) the state must cover exactly the quantized layers, with
        every field present, of the documented dtype and shape and consistent (see
        :func:`quantcache.state.fields.stream_problems`); otherwise the error names what
        does not fit. Non-strict loading skips unknown keys and returns them. ``origin`` other
        than ``calibrated`` (parameters imported from another tool) skips the check that the
        parameters are exactly what the statistics imply.
        """
        grouped: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        unexpected: list[str] = []
        for name, tensor in state.items():
            parsed = parse_state_key(name)
            if parsed is None or parsed[0] >= len(self.quantizers) or not self.quantizers[parsed[0]].enabled:
                unexpected.append(name)
                continue
            index, stream_name, field = parsed
            stream = self.quantizers[index].stream(stream_name)
            if not stream.calibrates or field not in (*stream.observer.fields, *parameter_fields(stream.args)):
                unexpected.append(name)  # an uncentred dynamic stream saves nothing
                continue
            grouped.setdefault(index, {}).setdefault(stream_name, {})[field] = tensor
        if strict and unexpected:
            raise QuantStateError(
                f"state has keys this cache does not use: {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (quantized layers here: {self.quantized_layers})"
            )
        has_params = any(
            field in fields for streams in grouped.values() for fields in streams.values() for field in _FROZEN_FIELDS
        )
        if strict:
            missing_layers = [
                index
                for index in self.quantized_layers
                if index not in grouped and any(stream.calibrates for _, stream in self.quantizers[index].streams)
            ]
            if missing_layers:
                raise QuantStateError(
                    f"state has no entries for quantized layers {missing_layers[:8]} "
                    f"({self.layer_names[missing_layers[0]]} ...); it was made for another model or layer selection"
                )
        updates: list[tuple[LayerQuantizer, dict[str, dict[str, torch.Tensor]]]] = []
        for index, streams in sorted(grouped.items()):
            quantizer = self.quantizers[index]
            for stream_name, stream in quantizer.streams:
                if not stream.calibrates:
                    continue
                fields = streams.get(stream_name, {})
                prefix = f"layers.{index}.{stream_name}"
                frozen_fields = parameter_fields(stream.args)
                missing = missing_fields(
                    prefix, fields, stream.observer.fields, frozen=has_params, parameter_fields=frozen_fields
                )
                if missing:
                    raise QuantStateError(f"state is missing {missing} for layer {index} ({quantizer.name})")
                problems = stream_problems(
                    prefix,
                    fields,
                    self.quant_config,
                    stream_name,
                    self.kv_heads,
                    self.head_dim,
                    derived=origin == "calibrated",
                    module_name=quantizer.name,
                )
                if problems:
                    raise QuantStateError(f"layer {index} ({quantizer.name}): {'; '.join(problems[:3])}")
            updates.append((quantizer, streams))
        for quantizer in self.quantizers:  # a layer whose streams calibrate nothing has nothing to load
            calibrates = any(stream.calibrates for _, stream in quantizer.streams)
            if quantizer.enabled and quantizer.index not in grouped and not calibrates:
                updates.append((quantizer, {}))
        if has_params:
            loaded = {quantizer.index for quantizer, _ in updates}
            unfrozen = [q.index for q in self.quantizers if q.enabled and q.index not in loaded and not q.frozen]
            if unfrozen:
                raise QuantStateError(
                    f"state holds frozen parameters but none for quantized layers {unfrozen[:8]}; "
                    "a partly frozen cache cannot run (load a complete state or exclude those layers)"
                )
        if strict:
            self._check_as_a_file(state, has_params=has_params, origin=origin)
        # Everything validated: only now touch the quantizers, so a failed load changes nothing.
        for quantizer, streams in updates:
            quantizer.reset()
            for stream_name, stream in quantizer.streams:
                if not stream.calibrates:
                    if has_params:
                        stream.freeze()
                    continue
                fields = streams[stream_name]
                if all(field in fields for field in stream.observer.fields):
                    stream.observer.load({field: fields[field] for field in stream.observer.fields})
                if stream.dynamic:  # centred: its frozen parameters are the mean (and, query-aware, channel scale)
                    if has_params:
                        scale, diag = fields.get("channel_scale"), fields.get("query_diag")
                        stream.freeze_centered(
                            fields["center"].detach().to(torch.float32).clone(),
                            None if scale is None else scale.detach().to(torch.float32).clone(),
                            None if diag is None else (diag.clone(), fields["query_factor"].clone()),
                        )
                    continue
                if has_params:
                    stream.set_params(
                        QuantParams(
                            fields["scale"].detach().to(torch.float32).clone(),
                            fields["zero_point"].detach().to(torch.int32).clone(),
                        )
                    )
        self.mode = CacheMode.FROZEN if has_params else CacheMode.CALIBRATE
        self.origin = origin
        return unexpected

    def _check_as_a_file(self, state: Mapping[str, torch.Tensor], *, has_params: bool, origin: str) -> None:
        """Apply the rules a state file is held to (:func:`~quantcache.state.file.check_state`), so that a
        state loaded from memory is one this quantizer could also save and load back."""
        check_state(self._state_file(dict(state), "frozen" if has_params else "calibrate", origin), "state")

    def _state_file(self, tensors: dict[str, torch.Tensor], mode: str, origin: str) -> StateFile:
        """``tensors`` described as this quantizer's state: its config, model facts and layer selection."""
        from quantcache import __version__

        return StateFile(
            tensors=tensors,
            config=self.quant_config,
            mode=mode,
            num_layers=len(self.quantizers),
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            layer_names=self.layer_names,
            model_type=self.model_type,
            quantcache_version=__version__,
            model_name=self.model_name,
            model_config_sha256=self.model_config_sha256,
            model_kv_config=self.model_kv_config,
            origin=origin,
            quantized_layers=self.quantized_layers,
            calibration=self._calibration_length,
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state to a safetensors file with JSON metadata (config, model shape, layer names)."""
        tensors = self.state_dict()
        if not tensors and (self.needs_calibration or not self.is_frozen):
            raise CalibrationError("nothing to save: the cache has observed no calibration data yet")
        return write_state_file(path, self._state_file(tensors, self.mode.value, self.origin))

    def restore(
        self, path: str | os.PathLike[str], strict: bool = True, *, allow_other_model: bool = False
    ) -> Any:
        """Load a saved state into this quantizer after checking that it was made for this model (see :meth:`load`)."""
        stored = read_state_file(path)
        self._check_model(stored, Path(path), allow_other_model=allow_other_model)
        if stored.config != self.quant_config:
            raise QuantStateError(
                f"{path} was calibrated with config {stored.config.to_dict()}, this cache uses "
                f"{self.quant_config.to_dict()}; use KVQuantizer.load(path, model)"
            )
        self._load_stored(stored, strict=strict)
        return self

    def _load_stored(self, stored: StateFile, *, strict: bool = True) -> None:
        self.load_state_dict(stored.tensors, strict=strict, origin=stored.origin)
        if stored.mode == "frozen" and not self.is_frozen:  # a scheme with nothing to calibrate (all dynamic)
            self.freeze()
        self._calibration_length = stored.calibration

    @classmethod
    def load(
        cls: type[_Quantizer],
        path: str | os.PathLike[str],
        model_or_config: nn.Module | PretrainedConfig,
        *,
        allow_other_model: bool = False,
        **kwargs: Any,
    ) -> _Quantizer:
        """A quantizer for ``model_or_config`` with the config and state stored in ``path``.

        The state must have been made for this model: a different shape is always refused; a
        different config entry that changes the keys and values (RoPE and its scaling, head counts and
        dims, layer types, sliding windows, norms: :data:`~quantcache.cache.model_facts.KV_CONFIG_KEYS`)
        is refused unless ``allow_other_model``; any other difference in the config only warns.
        """
        stored = read_state_file(path)
        quantizer = cls(model_or_config, stored.config, **kwargs)  # type: ignore[call-arg]
        quantizer._check_model(stored, Path(path), allow_other_model=allow_other_model)
        quantizer._load_stored(stored)
        return quantizer

    def _check_model(self, stored: StateFile, path: Path, *, allow_other_model: bool) -> None:
        """Refuse a state made for another model (see :meth:`load`); warn where only the config digest differs."""
        self._check_model_shape(stored, path)
        if stored.model_config_sha256 in (None, *self.model_config_digests):
            return
        recorded = stored.model_kv_config
        if recorded is not None:
            keys = sorted(set(recorded) | set(self.model_kv_config))
            differing = [key for key in keys if recorded.get(key) != self.model_kv_config.get(key)]
            if differing and not allow_other_model:
                detail = "; ".join(
                    f"{key}: {short_repr(recorded.get(key))} vs {short_repr(self.model_kv_config.get(key))}"
                    for key in differing[:4]
                )
                raise QuantStateError(
                    f"{path} was calibrated for a model whose keys and values differ from this one's ({detail}; "
                    "file vs this model); recalibrate for this model, or pass allow_other_model=True "
                    "(--allow-other-model) if you know the difference does not matter"
                )
            if differing:
                what = f"entries that shape keys and values ({', '.join(differing[:4])})"
            else:
                what = "entries that do not change keys and values"
        else:
            what = "entries this older file cannot name"
        warnings.warn(
            f"{path} was calibrated for a model whose config differs from this one's in {what}; "
            "check that it is the model you calibrated",
            UserWarning,
            stacklevel=3,
        )

    def _check_model_shape(self, stored: StateFile, path: Path) -> None:
        mine = {
            "model_type": self.model_type,
            "num_layers": len(self.quantizers),
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
        }
        theirs = {
            "model_type": stored.model_type,
            "num_layers": stored.num_layers,
            "kv_heads": stored.kv_heads,
            "head_dim": stored.head_dim,
        }
        differing = [key for key in mine if mine[key] != theirs[key]]
        if differing:
            detail = ", ".join(f"{key} {theirs[key]} vs {mine[key]}" for key in differing)
            raise QuantStateError(f"{path} was made for another model: {detail} (file vs this model)")
