"""Where quantization plugs into Transformers: a ``DynamicCache`` that calibrates, then quantizes.

Every attention layer of a Transformers model hands its new key/value states to
``cache.update(key_states, value_states, layer_idx)``. Overriding that one method is
all it takes (no hooks, no monkeypatching):

* **calibrate** mode (initial): fold the per-channel min/max of the new states into
  running statistics, then store them exactly as ``DynamicCache`` does;
* **frozen** mode (after :meth:`QuantizedCalibratingCache.freeze`): fake-quantize the
  new states with fixed parameters (quantize, dequantize) and store the result. Only
  the new tokens are quantized, so a decode step costs the same at any context length.

Storage, sliding windows, beam reordering, cropping and batch expansion stay
``DynamicCache``'s own; the quantization state lives in one :class:`LayerQuantizer`
per layer and is independent of the batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from .accounting import effective_bits
from .config import KVQuantConfig
from .errors import CalibrationError, ConfigError, QuantStateError
from .layers import layer_memory, quantizing_layer
from .quantization import QuantParams
from .quantizer import LayerQuantizer
from .scheme import Storage, enum_value
from .serialization import (
    PARAMETER_FIELDS,
    StateFile,
    missing_fields,
    parse_state_key,
    read_state_file,
    stream_problems,
    write_state_file,
)

__all__ = [
    "CACHE_KEYWORD",
    "CacheMode",
    "CalibrationError",
    "QuantStateError",
    "QuantizedCalibratingCache",
    "attention_module_names",
]

CACHE_KEYWORD = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
"""The keyword that hands a cache to ``model(...)`` / ``model.generate(...)``: transformers 5
renamed ``past_key_values`` to ``cache`` (the old name still works there, with a warning)."""



class CacheMode(str, Enum):
    """What ``update`` does with new key/value states."""

    CALIBRATE = "calibrate"
    FROZEN = "frozen"


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)  # type: ignore[no-any-return]
    except TypeError:  # older signature without ``decoder``
        return getter()  # type: ignore[no-any-return]


def attention_module_names(model: nn.Module, num_layers: int) -> list[str]:
    """Name of the attention module that owns each ``layer_idx``, as include/exclude see it.

    Transformers' attention modules carry their ``layer_idx``; the first module whose
    class is an attention class claims the index. Indices no module claims get the
    conventional ``model.layers.{i}.self_attn``.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and "attention" in type(module).__name__.lower():
            names.setdefault(layer_idx, name)
    return [names.get(index, f"model.layers.{index}.self_attn") for index in range(num_layers)]


def _config_digest(config: PretrainedConfig) -> str | None:
    """sha256 of the model config's JSON (sorted keys), to tell which model a state was made for."""
    try:
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _attention_shape(text_config: PretrainedConfig) -> tuple[int | None, int | None]:
    """``(kv_heads, head_dim)`` declared by the config, ``None`` where it does not say."""
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None)
    hidden = getattr(text_config, "hidden_size", None)
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = hidden // heads
    return (kv_heads if isinstance(kv_heads, int) else None, head_dim if isinstance(head_dim, int) else None)


class QuantizedCalibratingCache(DynamicCache):
    """A drop-in ``DynamicCache`` that calibrates, freezes and applies INT8 KV quantization.

    Build it from the model (preferred: include/exclude then match the model's own
    attention module names) or from its config, pass it as ``cache=`` (transformers 5)
    or ``past_key_values=`` to ``model(...)`` / ``model.generate(...)``, then :meth:`freeze`::

        cache = QuantizedCalibratingCache(model, KVQuantConfig(symmetric=True))
        for batch in calibration_batches:
            model(batch, cache=cache)
            cache = cache.empty_copy()   # next sample, same statistics
        cache.freeze()
        cache.save("kv_scales.safetensors")

    Args:
        model_or_config: a ``PreTrainedModel`` or its ``PretrainedConfig``.
        quant_config: the scheme and layer selection; defaults to symmetric INT8 per-channel on all layers.
        warn_unmatched: warn when an include/exclude pattern matches no attention module.
        storage: ``"fake"`` or ``"packed"``, replacing ``quant_config.storage`` (what a frozen
            cache keeps: dequantized states, or codes that take a fraction of the memory).
        **dynamic_cache_kwargs: passed on to ``DynamicCache`` (e.g. ``offloading``).
    """

    def __init__(
        self,
        model_or_config: nn.Module | PretrainedConfig,
        quant_config: KVQuantConfig | Mapping[str, Any] | None = None,
        *,
        warn_unmatched: bool = True,
        storage: Storage | str | None = None,
        **dynamic_cache_kwargs: Any,
    ) -> None:
        if isinstance(model_or_config, PretrainedConfig):
            config, model = model_or_config, None
        elif isinstance(model_or_config, nn.Module) and isinstance(
            getattr(model_or_config, "config", None), PretrainedConfig
        ):
            config, model = model_or_config.config, model_or_config  # type: ignore[assignment]
        else:
            raise TypeError(
                "QuantizedCalibratingCache needs a transformers model or its config, "
                f"got {type(model_or_config).__name__}"
            )
        super().__init__(config=config, **dynamic_cache_kwargs)
        self._model_config = config
        self._dynamic_cache_kwargs = dynamic_cache_kwargs
        text_config = _text_config(config)
        num_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise TypeError(f"cannot tell the number of layers from {type(config).__name__}: no num_hidden_layers")
        if isinstance(quant_config, Mapping):  # plain data, as in a YAML processor item
            quant_config = KVQuantConfig.from_dict(quant_config)
        if quant_config is not None and not isinstance(quant_config, KVQuantConfig):
            raise TypeError(
                f"quant_config must be a KVQuantConfig, got {type(quant_config).__name__}; "
                "build one with KVQuantConfig(...), KVQuantConfig.from_dict(data) or KVQuantConfig.from_yaml(path)"
            )
        self.quant_config = quant_config if quant_config is not None else KVQuantConfig()
        if storage is not None:
            self.quant_config = replace(self.quant_config, storage=enum_value(Storage, "storage", storage, section=""))
        self.model_type: str | None = getattr(config, "model_type", None)
        self.kv_heads, self.head_dim = _attention_shape(text_config)
        self.layer_names = (
            attention_module_names(model, num_layers) if model is not None
            else [f"model.layers.{index}.self_attn" for index in range(num_layers)]
        )
        selected = self.quant_config.select(self.layer_names, warn_unmatched=warn_unmatched)
        expected_shape = (
            (self.kv_heads, self.head_dim) if self.kv_heads is not None and self.head_dim is not None else None
        )
        if self.head_dim is not None:
            for stream in ("key", "value"):
                size = self.quant_config.stream_args(stream).group_size
                if size is not None and self.head_dim % size:
                    raise ConfigError(
                        f"qconfig.group_size {size} does not divide this model's head_dim {self.head_dim}; "
                        f"choose a divisor of {self.head_dim}"
                    )
        self.quantizers = [
            LayerQuantizer(
                index,
                name,
                enabled=selected[index],
                expected_shape=expected_shape,
                key_args=self.quant_config.key_args,
                value_args=self.quant_config.value_args,
            )
            for index, name in enumerate(self.layer_names)
        ]
        self._install_layers()
        self.mode = CacheMode.CALIBRATE
        self.model_name: str | None = getattr(config, "_name_or_path", None) or None
        self.model_config_sha256 = _config_digest(config)

    def _install_layers(self) -> None:
        """Replace the plain layers by quantizing ones (storage lives in the layer classes, see layers.py).

        Layers of a kind with no quantizing counterpart (layers that share another
        layer's KV and never call ``update``, ...) stay as they are, unquantized.
        """
        if len(self.layers) < len(self.quantizers):  # a lazily built container: one plain layer per index
            self.layers = [*self.layers, *(DynamicLayer() for _ in range(len(self.quantizers) - len(self.layers)))]  # type: ignore[no-untyped-call]
            self.layer_class_to_replicate = None
        layers = []
        packed = self.quant_config.storage is Storage.PACKED
        for layer, quantizer in zip(self.layers, self.quantizers, strict=False):
            installed = quantizing_layer(layer, quantizer, packed=packed)
            if installed is layer:
                quantizer.enabled = False
            layers.append(installed)
        self.layers = layers + list(self.layers[len(layers) :])

    # ------------------------------------------------------------------ the hot path
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states through the layer, which observes (calibrate mode) or quantizes them (frozen).

        ``key_states`` and ``value_states`` are ``(batch, kv_heads, new_tokens, head_dim)``.
        """
        if not 0 <= layer_idx < len(self.quantizers):
            raise IndexError(
                f"layer_idx {layer_idx} is outside this cache's {len(self.quantizers)} layers; "
                "was the cache built for another model?"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> QuantizedCalibratingCache:
        """Tell calibration which positions are padding, for the forward calls that follow.

        ``attention_mask`` is the ``(batch, seq)`` mask given to the model (1 for real
        tokens, 0 for padding), covering the cached tokens and the new ones as
        Transformers' masks do; each update uses its last ``new_tokens`` columns. Padded
        positions then never enter the statistics, so padding a batch does not change
        the calibrated parameters. ``None`` clears it. Returns ``self``.
        """
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
            mask = attention_mask.detach().bool()
        for quantizer in self.quantizers:
            quantizer.token_mask = mask
        return self

    # ------------------------------------------------------------------ mode changes
    @property
    def is_frozen(self) -> bool:
        return self.mode is CacheMode.FROZEN

    @property
    def quantized_layers(self) -> list[int]:
        """Indices of the layers whose KV cache is quantized (include minus exclude)."""
        return [quantizer.index for quantizer in self.quantizers if quantizer.enabled]

    def freeze(self) -> QuantizedCalibratingCache:
        """Turn the collected statistics into fixed parameters; from now on ``update`` quantizes.

        Raises :class:`CalibrationError` when nothing was observed, or when an included
        layer was never observed (a zero or default scale there would silently ruin
        outputs, so it is refused and the layer named). Returns ``self``.
        """
        enabled = [quantizer for quantizer in self.quantizers if quantizer.enabled]
        if not enabled:
            raise CalibrationError(
                "no layer is selected for quantization: the include/exclude patterns leave out every "
                f"attention module (first names: {self.layer_names[:2]})"
            )
        unobserved = [quantizer for quantizer in enabled if not quantizer.observed]
        if len(unobserved) == len(enabled):
            raise CalibrationError(
                "freeze() called before any calibration data was seen: run the model on calibration "
                "text with this cache (model(ids, cache=cache)) first"
            )
        if unobserved:
            listed = ", ".join(f"{q.index} ({q.name})" for q in unobserved[:8])
            more = f" and {len(unobserved) - 8} more" if len(unobserved) > 8 else ""
            raise CalibrationError(
                f"included layers never observed during calibration: {listed}{more}; run calibration "
                "through every layer or add them to exclude"
            )
        for quantizer in enabled:
            quantizer.freeze()
        self.mode = CacheMode.FROZEN
        return self

    def unfreeze(self) -> QuantizedCalibratingCache:
        """Go back to calibration: keep the statistics (more data adds to them), drop the parameters."""
        for quantizer in self.quantizers:
            quantizer.unfreeze()
        self.mode = CacheMode.CALIBRATE
        return self

    def reset_statistics(self) -> QuantizedCalibratingCache:
        """Forget all statistics and parameters and return to calibrate mode."""
        for quantizer in self.quantizers:
            quantizer.reset()
        self.mode = CacheMode.CALIBRATE
        return self

    def empty_copy(self) -> QuantizedCalibratingCache:
        """A new, empty cache that shares nothing mutable with this one but keeps its quantization state.

        Use it for each new conversation or calibration sample: ``generate`` treats a
        non-empty cache as a prefix, so a used cache must not be passed again for new text.
        """
        fresh: QuantizedCalibratingCache = copy.copy(self)
        fresh.layers = DynamicCache(config=self._model_config, **self._dynamic_cache_kwargs).layers
        fresh.quantizers = copy.deepcopy(self.quantizers)
        fresh._install_layers()
        return fresh

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
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Restore statistics (and parameters, making the cache frozen) from :meth:`state_dict`.

        With ``strict`` (default) the state must cover exactly the quantized layers, with
        every field present, of the documented dtype and shape and consistent (see
        :func:`quantcache.serialization.stream_problems`); otherwise the error names what
        does not fit. Non-strict loading skips unknown keys and returns them.
        """
        grouped: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        unexpected: list[str] = []
        for name, tensor in state.items():
            parsed = parse_state_key(name)
            if parsed is None or parsed[0] >= len(self.quantizers) or not self.quantizers[parsed[0]].enabled:
                unexpected.append(name)
                continue
            index, stream_name, field = parsed
            stream = self.quantizers[index].key if stream_name == "key" else self.quantizers[index].value
            if stream.dynamic or field not in (*stream.observer.fields, *PARAMETER_FIELDS):
                unexpected.append(name)  # a dynamic stream saves nothing
                continue
            grouped.setdefault(index, {}).setdefault(stream_name, {})[field] = tensor
        if strict and unexpected:
            raise QuantStateError(
                f"state has keys this cache does not use: {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (quantized layers here: {self.quantized_layers})"
            )
        has_params = any("scale" in fields for streams in grouped.values() for fields in streams.values())
        if strict:
            missing_layers = [
                index
                for index in self.quantized_layers
                if index not in grouped and not all(stream.dynamic for _, stream in self.quantizers[index].streams)
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
                if stream.dynamic:
                    continue
                fields = streams.get(stream_name, {})
                prefix = f"layers.{index}.{stream_name}"
                missing = missing_fields(prefix, fields, stream.observer.fields, frozen=has_params)
                if missing:
                    raise QuantStateError(f"state is missing {missing} for layer {index} ({quantizer.name})")
                problems = stream_problems(prefix, fields, self.quant_config, stream_name, self.kv_heads, self.head_dim)
                if problems:
                    raise QuantStateError(f"layer {index} ({quantizer.name}): {'; '.join(problems[:3])}")
            updates.append((quantizer, streams))
        if has_params:
            loaded = {quantizer.index for quantizer, _ in updates}
            unfrozen = [q.index for q in self.quantizers if q.enabled and q.index not in loaded and not q.frozen]
            if unfrozen:
                raise QuantStateError(
                    f"state holds frozen parameters but none for quantized layers {unfrozen[:8]}; "
                    "a partly frozen cache cannot run (load a complete state or exclude those layers)"
                )
        # Everything validated: only now touch the quantizers, so a failed load changes nothing.
        for quantizer, streams in updates:
            quantizer.reset()
            for stream_name, stream in quantizer.streams:
                if stream.dynamic:
                    if has_params:
                        stream.freeze()
                    continue
                fields = streams[stream_name]
                if all(field in fields for field in stream.observer.fields):
                    stream.observer.load({field: fields[field] for field in stream.observer.fields})
                if has_params:
                    stream.set_params(
                        QuantParams(
                            fields["scale"].detach().to(torch.float32).clone(),
                            fields["zero_point"].detach().to(torch.int32).clone(),
                        )
                    )
        self.mode = CacheMode.FROZEN if has_params else CacheMode.CALIBRATE
        return unexpected

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state to a safetensors file with JSON metadata (config, model shape, layer names)."""
        from . import __version__

        all_dynamic = all(stream.dynamic for q in self.quantizers if q.enabled for _, stream in q.streams)
        if not self.state_dict() and not (all_dynamic and self.is_frozen):
            raise CalibrationError("nothing to save: the cache has observed no calibration data yet")
        return write_state_file(
            path,
            StateFile(
                tensors=self.state_dict(),
                config=self.quant_config,
                mode=self.mode.value,
                num_layers=len(self.quantizers),
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
                layer_names=self.layer_names,
                model_type=self.model_type,
                quantcache_version=__version__,
                model_name=self.model_name,
                model_config_sha256=self.model_config_sha256,
            ),
        )

    def load(self, path: str | os.PathLike[str], strict: bool = True) -> QuantizedCalibratingCache:
        """Load a saved state into this cache after checking that it was made for this model shape."""
        stored = read_state_file(path)
        self._check_model_shape(stored, Path(path))
        if replace(stored.config, storage=self.quant_config.storage) != self.quant_config:
            raise QuantStateError(
                f"{path} was calibrated with config {stored.config.to_dict()}, this cache uses "
                f"{self.quant_config.to_dict()}; use QuantizedCalibratingCache.from_file(path, model)"
            )
        self._load_stored(stored, strict=strict)
        return self

    def _load_stored(self, stored: StateFile, *, strict: bool = True) -> None:
        self.load_state_dict(stored.tensors, strict=strict)
        if stored.mode == "frozen" and not self.is_frozen:  # a scheme with nothing to calibrate (all dynamic)
            self.freeze()

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], model_or_config: nn.Module | PretrainedConfig, **kwargs: Any
    ) -> QuantizedCalibratingCache:
        """Build a cache for ``model_or_config`` with the config and state stored in ``path``."""
        stored = read_state_file(path)
        cache = cls(model_or_config, stored.config, **kwargs)
        cache._check_model_shape(stored, Path(path))
        cache._load_stored(stored)
        return cache

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
            raise QuantStateError(
                f"{path} was made for another model: {detail} (file vs this model)"
            )

    def effective_bits(self, seq_len: int, *, unquantized_bits: int = 16) -> float:
        """Bits per cached element this scheme holds at ``seq_len`` tokens (see :mod:`quantcache.accounting`).

        Codes, per-row parameters and flags, calibrated scales and zero points, and
        ``unquantized_bits`` (the model dtype) for the layers left unquantized.
        """
        if self.kv_heads is None or self.head_dim is None:
            raise CalibrationError("the model config does not say kv_heads and head_dim; cannot count bits")
        layers = [
            (quantizer.key.args, quantizer.value.args) if quantizer.enabled else None for quantizer in self.quantizers
        ]
        return effective_bits(layers, self.kv_heads, self.head_dim, seq_len, unquantized_bits=unquantized_bits)

    def memory_report(self) -> list[dict[str, Any]]:
        """Bytes held per layer, split into codes, parameters and full-precision states.

        Each entry: ``index``, ``name``, ``quantized``, ``tokens`` (stored sequence
        length), ``codes``, ``parameters`` (fixed scales/zero points, per-token
        parameters and row flags), ``full_precision`` (states in the model dtype: every
        state of a fake-quantized or unquantized layer), ``total``, and
        ``dynamic_cache``: what a ``DynamicCache`` in the model dtype would hold for the
        same tokens.
        """
        entries = []
        for quantizer, layer in zip(self.quantizers, self.layers, strict=False):
            sizes = layer_memory(layer)
            entries.append(
                {
                    "index": quantizer.index,
                    "name": quantizer.name,
                    "quantized": quantizer.enabled,
                    "tokens": int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else 0,
                    **sizes,
                    "total": sizes["codes"] + sizes["parameters"] + sizes["full_precision"],
                }
            )
        return entries

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode.value}, layers={len(self.quantizers)}, "
            f"quantized={len(self.quantized_layers)}, seq_length={self.get_seq_length()})"
        )
