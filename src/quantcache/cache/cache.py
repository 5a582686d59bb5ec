"""Where quantization plugs into Transformers: a ``DynamicCache`` that holds one conversation.

Every attention layer of a Transformers model hands its new key/value states to
``cache.update(key_states, value_states, layer_idx)``. Overriding that one method is
all it takes (no hooks, no monkeypatching). A :class:`QuantizedCalibratingCache` stores one
conversation in layers of its own (:mod:`quantcache.cache.storage_layers`) and quantizes through a
:class:`~quantcache.cache.kv_quantizer.KVQuantizer`, which it shares with every other cache made
from it:

* while the quantizer **calibrates**, ``update`` folds the new states into its statistics, then
  stores them exactly as ``DynamicCache`` does;
* once it is **frozen**, ``update`` quantizes the new states with its fixed parameters and stores
  dequantized states (``storage="fake"``) or packed codes (``storage="packed"``). Only the new
  tokens are quantized, so a decode step costs the same at any context length.

Storage, sliding windows, beam reordering, cropping and batch expansion stay
``DynamicCache``'s own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from quantcache.cache.kv_quantizer import CacheMode, KVQuantizer
from quantcache.cache.layer import LayerQuantizer
from quantcache.cache.storage_layers import (
    EngineLayerMixin,
    PackingLayerMixin,
    QuantizingLayerMixin,
    layer_memory,
    quantizing_layer,
)
from quantcache.cache.stream import StreamName, StreamQuantizer
from quantcache.errors import CalibrationError, ConfigError, QuantStateError
from quantcache.ops.engine_numerics import EngineNumerics, EngineStream, FrozenStream, engine_numerics
from quantcache.ops.quantize import QuantParams
from quantcache.scheme.args import Storage, enum_value
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.settings import Engine

__all__ = ["CacheMode", "CalibrationError", "QuantStateError", "QuantizationEvent", "QuantizedCalibratingCache"]


class QuantizationEvent(NamedTuple):
    """One quantization a cache made, as its :attr:`~QuantizedCalibratingCache.on_quantize` hook hears it.

    ``states`` are the incoming ``(batch, kv_heads, new_tokens, head_dim)`` states, ``quantized``
    what the cache returns for them (same shape and dtype), ``clipped`` the boolean mask of the
    elements that fell outside the quantizer's range.
    """

    layer_idx: int
    stream: StreamName
    states: torch.Tensor
    quantized: torch.Tensor
    clipped: torch.Tensor


_HELD_PARTS = ("codes", "parameters", "full_precision", "reserved", "encoder")


class QuantizedCalibratingCache(DynamicCache):
    """A drop-in ``DynamicCache`` for one conversation, quantized through a :class:`KVQuantizer`.

    The usual way to get one is ``quantizer.new_cache(storage=...)``. Built directly from a
    model (or its config) and a config, it makes a quantizer of its own, which is the
    one-object path of earlier releases::

        cache = QuantizedCalibratingCache(model, KVQuantConfig(symmetric=True))
        model(ids, past_key_values=cache)          # calibrate
        cache.freeze().save("kv_scales.safetensors")

    Either way, pass it as ``past_key_values=`` to ``model(...)`` / ``model.generate(...)``.

    Args:
        source: a :class:`KVQuantizer` to share, or a ``PreTrainedModel`` / ``PretrainedConfig``
            for which a new quantizer is made from ``quant_config``.
        quant_config: the scheme and layer selection of a new quantizer (only with a model or config).
        warn_unmatched: warn when an include/exclude pattern matches no attention module.
        storage: ``"fake"`` (the default: dequantized states in the model dtype, for measuring) or
            ``"packed"`` (codes that take a fraction of the memory). Both return the same keys and values.
        engine: ``None`` (the default: quantcache's own numerics), or ``"ascend"``, ``"vllm"``,
            ``"modelopt"`` (a :class:`~quantcache.scheme.settings.Engine`, or an
            :class:`~quantcache.ops.engine_numerics.EngineNumerics`): keep what that serving engine
            would decode from its cache, computed with its arithmetic from the frozen state as its
            export writes it (:mod:`quantcache.ops.engine_numerics`). Needs a frozen quantizer with a
            scheme engines load (``KVQuantConfig.export_problems``) and fake storage; the state is
            read when the cache is made.
        read_codes: with packed storage, ``update()`` returns the stored rows instead of decoded states,
            for the attention function ``attn_implementation="quantcache"`` (:mod:`quantcache.cache.attention`,
            :func:`quantcache.use_code_attention`), which reads the codes without decoding the history.
            Other attention implementations cannot read them.
        compiled: with packed storage, encode the tokens of decode steps and attend from codes through kernels
            compiled by ``torch.compile`` (:mod:`quantcache.cache.compiled_kernels`), the model left eager: fewer,
            fused operations per layer and token. The first steps compile (seconds; inductor needs a C++ compiler
            on a CPU, Triton on a GPU); results equal eager ones up to float rounding.
        **dynamic_cache_kwargs: passed on to ``DynamicCache`` (e.g. ``offloading``).
    """

    def __init__(
        self,
        source: KVQuantizer | nn.Module | PretrainedConfig,
        quant_config: KVQuantConfig | Mapping[str, Any] | None = None,
        *,
        warn_unmatched: bool = True,
        storage: Storage | str | None = None,
        engine: Engine | str | EngineNumerics | None = None,
        read_codes: bool = False,
        compiled: bool = False,
        **dynamic_cache_kwargs: Any,
    ) -> None:
        if isinstance(source, KVQuantizer):
            if quant_config is not None:
                raise TypeError("quant_config is the quantizer's own: pass either a KVQuantizer or a model and config")
            quantizer = source
        else:
            quantizer = KVQuantizer(source, quant_config, warn_unmatched=warn_unmatched)
        super().__init__(config=quantizer.model_config, **dynamic_cache_kwargs)
        self.quantizer = quantizer
        self.storage = enum_value(Storage, "storage", storage if storage is not None else Storage.FAKE, section="")
        self._dynamic_cache_kwargs = dynamic_cache_kwargs
        self._token_mask: torch.Tensor | None = None
        self._on_quantize: Callable[[QuantizationEvent], None] | None = None
        self._calibrated_tokens = 0  # tokens per row this cache took while calibrating (its window's length)
        packed = self.storage is Storage.PACKED
        self.engine: EngineNumerics | None = None
        """The serving engine whose numerics this cache keeps (``None``: quantcache's own)."""
        streams: dict[int, tuple[EngineStream, EngineStream]] = {}
        if engine is not None:
            if packed:
                raise ConfigError(
                    "storage='packed' keeps quantcache's own codes; engine numerics keep what the engine decodes, "
                    "in the model dtype: leave storage at 'fake' with engine="
                )
            self.engine, streams = _engine_streams(quantizer, engine)
        if read_codes and not packed:
            raise ConfigError(
                "read_codes=True reads packed codes: make the cache with storage='packed' (and no engine=)"
            )
        if compiled and not packed:
            raise ConfigError(
                "compiled=True compiles a packed cache's kernels: make the cache with storage='packed' (and no engine=)"
            )
        self.read_codes = read_codes
        """Whether packed layers return their rows for ``attn_implementation="quantcache"`` (see the arguments)."""
        self.compiled = compiled
        """Whether packed layers encode decode steps and attend from codes through compiled kernels."""
        self.layers = [
            quantizing_layer(template, layer_quantizer, packed=packed, engine=self.engine is not None)
            for template, layer_quantizer in zip(quantizer.layer_templates, quantizer.quantizers, strict=True)
        ]
        for index, layer in enumerate(self.layers):
            if isinstance(layer, PackingLayerMixin):
                layer.reads_codes, layer.compiled_kernels = read_codes, compiled
            if isinstance(layer, EngineLayerMixin) and index in streams:
                layer.numerics, layer.engine_streams = self.engine, streams[index]
        self.layer_class_to_replicate = None  # every layer exists up front, one per quantizer

    # ------------------------------------------------------------------ the hot path
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states through the layer, which observes (calibrating) or quantizes them (frozen).

        ``key_states`` and ``value_states`` are ``(batch, kv_heads, new_tokens, head_dim)``.
        """
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(
                f"layer_idx {layer_idx} is outside this cache's {len(self.layers)} layers; "
                "was the cache built for another model?"
            )
        if layer_idx == 0 and self.quantizer.mode is CacheMode.CALIBRATE:
            self._count_window(int(key_states.shape[0]), int(key_states.shape[-2]))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _count_window(self, rows: int, new_tokens: int) -> None:
        """Tell the quantizer how long this cache's calibration windows are now (its first layer's update)."""
        if new_tokens < 1:
            return
        began = self._calibrated_tokens == 0
        self._calibrated_tokens += new_tokens
        self.quantizer._count_calibration(self._calibrated_tokens, rows if began else 0)

    # ------------------------------------------------------------------ this conversation
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
        self._token_mask = mask
        self._set_on_layers("token_mask", mask)
        return self

    @property
    def on_quantize(self) -> Callable[[QuantizationEvent], None] | None:
        """Called with a :class:`QuantizationEvent` after each quantization this cache makes.

        Only this cache's quantizations are heard, not those of other caches of the same
        quantizer. Evaluation measures each layer's error through it; ``None`` (the default)
        costs nothing.
        """
        return self._on_quantize

    @on_quantize.setter
    def on_quantize(self, hook: Callable[[QuantizationEvent], None] | None) -> None:
        self._on_quantize = hook
        for index, layer in enumerate(self.layers):
            if isinstance(layer, QuantizingLayerMixin):
                quantizer = self.quantizer.quantizers[index]
                layer.on_quantize = None if hook is None else _stream_hook(hook, index, quantizer)

    def _set_on_layers(self, name: str, value: Any) -> None:
        for layer in self.layers:
            if isinstance(layer, QuantizingLayerMixin):
                setattr(layer, name, value)

    def observe_queries(self, layer_idx: int, query_states: torch.Tensor) -> None:
        """Fold one layer's ``(batch, heads, seq, head_dim)`` queries into the quantizer's query-aware statistics.

        The queries attention computed in the forward pass that just updated this layer
        (before or after RoPE: what is kept is each RoPE pair's energy, which the position
        does not change); :func:`quantcache.calibration.queries.observe_queries` computes them
        from the model's hidden states. Pad positions set with :meth:`set_attention_mask` are
        left out; layers whose keys are not query-aware (or not quantized) ignore the call.
        """
        if self.quantizer.is_frozen:
            raise CalibrationError("observe_queries collects calibration statistics; the cache is frozen")
        self.quantizer.observe_queries(layer_idx, query_states, self._token_mask)

    def empty_copy(self) -> QuantizedCalibratingCache:
        """A new, empty cache of the same quantizer and storage (a new conversation or calibration sample).

        ``generate`` treats a non-empty cache as a prefix, so a used cache must not be passed
        again for new text. The copy shares the quantizer: its statistics keep accumulating.
        """
        fresh = QuantizedCalibratingCache(
            self.quantizer,
            storage=self.storage,
            engine=self.engine,
            read_codes=self.read_codes,
            compiled=self.compiled,
            **self._dynamic_cache_kwargs,
        )
        if self._on_quantize is not None:
            fresh.on_quantize = self._on_quantize
        return fresh

    def memory_report(self) -> list[dict[str, Any]]:
        """Bytes held per layer, split into codes, parameters and full-precision states.

        Each entry: ``index``, ``name``, ``quantized``, ``tokens`` (stored sequence
        length), ``codes``, ``parameters`` (fixed scales/zero points, per-token
        parameters and row flags), ``full_precision`` (states in the model dtype: every
        state of a fake-quantized or unquantized layer), ``reserved`` (room allocated
        for the tokens still to come: appending does not re-concatenate the history,
        see :mod:`quantcache.cache.growing_storage`), ``encoder`` (tensors derived from the
        parameters on first use: query-aware rounding's feedback matrices, the key center
        arranged by RoPE pairs for attention from codes; not in the effective bits),
        ``total``, and ``dynamic_cache``: what a ``DynamicCache`` in the model dtype would
        hold for the same tokens.
        """
        entries = []
        for quantizer, layer in zip(self.quantizer.quantizers, self.layers, strict=False):
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

    # ------------------------------------------------------------------ the quantizer's, for the one-object path
    @property
    def numerics(self) -> str:
        """Whose arithmetic this cache keeps: ``"quantcache"`` or its engine's label.

        For example ``"vllm (FP8 e4m3 per tensor)"``; evaluation reports it as ``settings["numerics"]``.
        """
        return "quantcache" if self.engine is None else self.engine.label

    @property
    def quant_config(self) -> KVQuantConfig:
        return self.quantizer.quant_config

    @property
    def quantizers(self) -> list[LayerQuantizer]:
        """The quantizer's per-layer quantizers (shared with every cache of the quantizer)."""
        return self.quantizer.quantizers

    @property
    def mode(self) -> CacheMode:
        return self.quantizer.mode

    @property
    def is_frozen(self) -> bool:
        return self.quantizer.is_frozen

    @property
    def quantized_layers(self) -> list[int]:
        return self.quantizer.quantized_layers

    @property
    def observes_queries(self) -> bool:
        return self.quantizer.observes_queries

    @property
    def layer_names(self) -> list[str]:
        return self.quantizer.layer_names

    @property
    def kv_heads(self) -> int | None:
        return self.quantizer.kv_heads

    @property
    def head_dim(self) -> int | None:
        return self.quantizer.head_dim

    @property
    def model_type(self) -> str | None:
        return self.quantizer.model_type

    @property
    def origin(self) -> str:
        return self.quantizer.origin

    def freeze(self) -> QuantizedCalibratingCache:
        """Freeze the quantizer (see :meth:`KVQuantizer.freeze`); returns ``self``."""
        self.quantizer.freeze()
        return self

    def unfreeze(self) -> QuantizedCalibratingCache:
        self.quantizer.unfreeze()
        return self

    def reset_statistics(self) -> QuantizedCalibratingCache:
        self.quantizer.reset_statistics()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The quantizer's :meth:`~KVQuantizer.state_dict`."""
        return self.quantizer.state_dict()

    def load_state_dict(
        self, state: Mapping[str, torch.Tensor], strict: bool = True, *, origin: str = "calibrated"
    ) -> list[str]:
        return self.quantizer.load_state_dict(state, strict, origin=origin)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return self.quantizer.save(path)

    def load(
        self, path: str | os.PathLike[str], strict: bool = True, *, allow_other_model: bool = False
    ) -> QuantizedCalibratingCache:
        """Load a saved state into the quantizer (see :meth:`KVQuantizer.restore`); returns ``self``."""
        self.quantizer.restore(path, strict, allow_other_model=allow_other_model)
        return self

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        model_or_config: nn.Module | PretrainedConfig,
        *,
        storage: Storage | str | None = None,
        allow_other_model: bool = False,
        warn_unmatched: bool = True,
        **dynamic_cache_kwargs: Any,
    ) -> QuantizedCalibratingCache:
        """A cache of :meth:`KVQuantizer.load` ``(path, model_or_config)``: one conversation."""
        quantizer = KVQuantizer.load(
            path, model_or_config, allow_other_model=allow_other_model, warn_unmatched=warn_unmatched
        )
        return cls(quantizer, storage=storage, **dynamic_cache_kwargs)

    def effective_bits(self, seq_len: int, *, unquantized_bits: int = 16) -> float:
        return self.quantizer.effective_bits(seq_len, unquantized_bits=unquantized_bits)

    def held_tokens(self, seq_len: int) -> list[int]:
        return self.quantizer.held_tokens(seq_len)

    def sinks_held(self, seq_len: int) -> list[int]:
        return self.quantizer.sinks_held(seq_len)

    def full_precision_held(self, seq_len: int) -> list[int]:
        return self.quantizer.full_precision_held(seq_len)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode.value}, storage={self.storage.value}, "
            f"layers={len(self.layers)}, quantized={len(self.quantized_layers)}, seq_length={self.get_seq_length()})"
        )


KVQuantizer.cache_class = QuantizedCalibratingCache


def _stream_hook(
    hook: Callable[[QuantizationEvent], None], layer_idx: int, layer: LayerQuantizer
) -> Callable[[StreamQuantizer, torch.Tensor, torch.Tensor, QuantParams | EngineStream], None]:
    """The stream-level hook of one layer that tells ``hook`` what was quantized where.

    Clipping is the quantizer's own, or the engine's for a cache that keeps engine numerics.
    """

    def heard(
        stream: StreamQuantizer, states: torch.Tensor, quantized: torch.Tensor, params: QuantParams | EngineStream
    ) -> None:
        name: StreamName = "key" if stream is layer.key else "value"
        clipped = params.saturated(states) if isinstance(params, EngineStream) else stream.saturated(states, params)
        hook(QuantizationEvent(layer_idx, name, states, quantized, clipped))

    return heard


def _engine_streams(
    quantizer: KVQuantizer, engine: Engine | str | EngineNumerics
) -> tuple[EngineNumerics, dict[int, tuple[EngineStream, EngineStream]]]:
    """``engine``'s numerics decided for ``quantizer``'s frozen state, and each quantized layer's (key, value) streams.

    The streams are made from the same tensors the exporters write from (each stream's min/max and
    scale/zero point), so an engine cache quantizes with exactly the scales its checkpoint holds.
    """
    numerics = engine_numerics(engine)
    label = numerics.engine.value
    if not quantizer.is_frozen:
        raise CalibrationError(
            f"engine={label!r} reproduces how a serving engine uses a frozen state: calibrate and freeze() the "
            "quantizer (or load a frozen state) before making the cache"
        )
    problems = quantizer.quant_config.export_problems(quantizer.layer_names)
    if problems:
        raise ConfigError(
            f"engine={label!r}: serving engines cannot load this state: {'; '.join(problems)}. Engines read static "
            "per-channel INT8 ranges: calibrate with the c8 or seed scheme (quantcache calibrate --preset c8) or "
            "import an engine checkpoint (quantcache import) to measure what an engine computes"
        )
    frozen: dict[int, tuple[FrozenStream, FrozenStream]] = {}
    for layer in quantizer.quantizers:
        if layer.enabled:
            frozen[layer.index] = (_frozen_stream(layer.key), _frozen_stream(layer.value))
    numerics = numerics.for_state([(part.min, part.max) for pair in frozen.values() for part in pair])
    return numerics, {index: (numerics.stream(key), numerics.stream(value)) for index, (key, value) in frozen.items()}


def _frozen_stream(stream: StreamQuantizer) -> FrozenStream:
    """One frozen stream's range and INT8 parameters, as the exporters read them from a state."""
    low, high = stream.statistics.get("min"), stream.statistics.get("max")
    if stream.params is None or low is None or high is None:
        raise QuantStateError(
            f"{stream.label}: engine numerics need the frozen range (min, max) and parameters the exporters read; "
            "this stream has none (was its state loaded without statistics?)"
        )
    return FrozenStream(low, high, stream.params.scale, stream.params.zero_point)


def _stored_tokens(layer: Any) -> int:
    """Tokens a layer holds (a sliding-window layer keeps fewer than it has seen)."""
    keys = getattr(layer, "keys", None)
    return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
