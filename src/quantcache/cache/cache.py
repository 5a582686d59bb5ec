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
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from quantcache.cache.layer import LayerQuantizer
from quantcache.cache.model_facts import (
    CACHE_KEYWORD,
    attention_module_names,
    attention_shape,
    config_digest,
    text_config,
)
from quantcache.cache.state import CacheMode, CacheStateMixin
from quantcache.cache.storage_layers import layer_memory, quantizing_layer
from quantcache.errors import CalibrationError, ConfigError, QuantStateError
from quantcache.ops.bits import effective_bits
from quantcache.ops.granularity import Granularity
from quantcache.ops.rope import RopeTable, rope_frequencies
from quantcache.scheme.args import Storage, enum_value
from quantcache.scheme.config import KVQuantConfig

__all__ = [
    "CACHE_KEYWORD",
    "CacheMode",
    "CalibrationError",
    "QuantStateError",
    "QuantizedCalibratingCache",
    "attention_module_names",
]


_HELD_PARTS = ("codes", "parameters", "full_precision", "reserved", "encoder")


class QuantizedCalibratingCache(CacheStateMixin, DynamicCache):
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
        decoder_config = text_config(config)
        num_layers = getattr(decoder_config, "num_hidden_layers", None)
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
        self.kv_heads, self.head_dim = attention_shape(decoder_config)
        self.layer_names = (
            attention_module_names(model, num_layers)
            if model is not None
            else [f"model.layers.{index}.self_attn" for index in range(num_layers)]
        )
        selected = self.quant_config.select(self.layer_names, warn_unmatched=warn_unmatched)
        expected_shape = (
            (self.kv_heads, self.head_dim) if self.kv_heads is not None and self.head_dim is not None else None
        )
        if self.head_dim is not None:
            for args in self.quant_config.all_stream_args():
                try:  # the granularity owns the rule: a calibrated group must be whole, a dynamic one need not
                    Granularity.of(args).groups(self.head_dim)
                except ValueError:
                    raise ConfigError(
                        f"qconfig.group_size {args.group_size} does not divide this model's head_dim "
                        f"{self.head_dim}; choose a divisor of {self.head_dim} (a calibrated group must be whole; "
                        "a dynamic scheme's last group may be shorter)"
                    ) from None
        self.quantizers = [
            LayerQuantizer(
                index,
                name,
                enabled=selected[index],
                expected_shape=expected_shape,
                key_args=self.quant_config.stream_args("key", name),
                value_args=self.quant_config.stream_args("value", name),
            )
            for index, name in enumerate(self.layer_names)
        ]
        for quantizer in self.quantizers:
            quantizer.sink_tokens = self.quant_config.sink_tokens
            quantizer.residual_window = self.quant_config.residual_window
        if self.quant_config.pre_rope_keys:
            self._set_key_rope(decoder_config)
        self._install_layers()
        self.mode = CacheMode.CALIBRATE
        self.model_name: str | None = getattr(config, "_name_or_path", None) or None
        self.model_config_sha256 = config_digest(config)

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

    @property
    def observes_queries(self) -> bool:
        """Whether a quantized layer's keys are query-aware, so calibration must show it the queries."""
        return any(quantizer.observes_queries for quantizer in self.quantizers)

    def observe_queries(self, layer_idx: int, query_states: torch.Tensor) -> None:
        """Fold one layer's ``(batch, heads, seq, head_dim)`` queries into its query-aware key statistics.

        The queries attention computed in the forward pass that just updated this layer
        (before or after RoPE: what is kept is each RoPE pair's energy, which the position
        does not change); :func:`quantcache.calibration.queries.observe_queries` computes them from the
        model's hidden states. Pad positions set with :meth:`set_attention_mask` are left out;
        layers whose keys are not query-aware (or not quantized) ignore the call.
        """
        if self.is_frozen:
            raise CalibrationError("observe_queries collects calibration statistics; the cache is frozen")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.quantizers):
            raise ValueError(f"layer_idx must be a layer index from 0 to {len(self.quantizers) - 1}, got {layer_idx!r}")
        self.quantizers[layer_idx].observe_queries(query_states)

    # ------------------------------------------------------------------ mode changes
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

    def effective_bits(self, seq_len: int, *, unquantized_bits: int = 16) -> float:
        """Bits per cached element this scheme holds at ``seq_len`` tokens (see :mod:`quantcache.ops.bits`).

        Codes, per-row parameters and flags, calibrated scales, zero points and centers,
        and ``unquantized_bits`` (the model dtype) for the layers left unquantized and for
        the full-precision copies of sink tokens and of the residual window.
        """
        if self.kv_heads is None or self.head_dim is None:
            raise CalibrationError("the model config does not say kv_heads and head_dim; cannot count bits")
        layers = [
            (quantizer.key.args, quantizer.value.args) if quantizer.enabled else None for quantizer in self.quantizers
        ]
        return effective_bits(
            layers,
            self.kv_heads,
            self.head_dim,
            seq_len,
            unquantized_bits=unquantized_bits,
            layer_tokens=self.held_tokens(seq_len)[: len(layers)],
            layer_copies=self.full_precision_held(seq_len)[: len(layers)],
        )

    def _set_key_rope(self, decoder_config: PretrainedConfig) -> None:
        """Give every quantized layer its RoPE angles: one table per layer type, shared by its layers."""
        layer_types = getattr(decoder_config, "layer_types", None) or [None] * len(self.quantizers)
        tables: dict[str | None, RopeTable] = {}
        for quantizer, layer_type in zip(self.quantizers, layer_types, strict=False):
            if not quantizer.enabled:
                continue
            if layer_type not in tables:
                inv_freq = rope_frequencies(decoder_config, layer_type)
                if self.head_dim is not None and inv_freq.numel() * 2 > self.head_dim:
                    raise ConfigError(
                        f"pre_rope_keys: the config's RoPE turns {inv_freq.numel() * 2} channels, more than "
                        f"head_dim {self.head_dim}; set pre_rope_keys: false for this model"
                    )
                tables[layer_type] = RopeTable(inv_freq)
            quantizer.key_rope = tables[layer_type]
            quantizer.key.space.rope_frequencies = tables[layer_type].inv_freq  # what query-aware rounding averages

    def sinks_held(self, seq_len: int) -> list[int]:
        """Sink tokens each layer keeps in full precision after ``seq_len`` tokens (none in sliding-window layers)."""
        sinks = min(self.quant_config.sink_tokens, seq_len)
        return [sinks if getattr(layer, "keeps_sinks", True) else 0 for layer in self.layers[: len(self.quantizers)]]

    def full_precision_held(self, seq_len: int) -> list[int]:
        """Tokens each layer keeps in full precision on top of their codes after ``seq_len`` tokens.

        Its sink tokens (:meth:`sinks_held`) and its residual window, the newest
        ``residual_window`` of the tokens it holds (the two are counted apart even where they
        overlap in a short sequence: both copies are kept).
        """
        window = self.quant_config.residual_window
        return [
            sinks + min(window, held)
            for sinks, held in zip(self.sinks_held(seq_len), self.held_tokens(seq_len), strict=True)
        ]

    def held_tokens(self, seq_len: int) -> list[int]:
        """Tokens each layer holds after ``seq_len`` tokens (a sliding-window layer keeps at most window - 1)."""
        held = []
        for layer in self.layers[: len(self.quantizers)]:
            window = getattr(layer, "sliding_window", None)
            held.append(min(seq_len, window - 1) if isinstance(window, int) and window > 1 else seq_len)
        return held

    def memory_report(self) -> list[dict[str, Any]]:
        """Bytes held per layer, split into codes, parameters and full-precision states.

        Each entry: ``index``, ``name``, ``quantized``, ``tokens`` (stored sequence
        length), ``codes``, ``parameters`` (fixed scales/zero points, per-token
        parameters and row flags), ``full_precision`` (states in the model dtype: every
        state of a fake-quantized or unquantized layer), ``reserved`` (room allocated
        for the tokens still to come: appending does not re-concatenate the history,
        see :mod:`quantcache.cache.storage_layers`), ``encoder`` (query-aware rounding's feedback
        matrices: read only to write tokens, derived from the parameters; not in the
        effective bits), ``total``, and ``dynamic_cache``: what a ``DynamicCache`` in the
        model dtype would hold for the same tokens.
        """
        entries = []
        for quantizer, layer in zip(self.quantizers, self.layers, strict=False):
            sizes = layer_memory(layer)
            entries.append(
                {
                    "index": quantizer.index,
                    "name": quantizer.name,
                    "quantized": quantizer.enabled,
                    "tokens": _stored_tokens(layer),
                    **sizes,
                    "total": sum(sizes[part] for part in _HELD_PARTS),
                }
            )
        return entries

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode.value}, layers={len(self.quantizers)}, "
            f"quantized={len(self.quantized_layers)}, seq_length={self.get_seq_length()})"
        )


def _stored_tokens(layer: Any) -> int:
    """Tokens a layer holds (a sliding-window layer keeps fewer than it has seen)."""
    keys = getattr(layer, "keys", None)
    return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
