"""One calibration of one model: the scheme and, per attention layer, its statistics and parameters.

A :class:`KVQuantizer` is what calibration produces and what a server keeps: the
:class:`~quantcache.scheme.config.KVQuantConfig`, the model facts it was made for (layer names,
``(kv_heads, head_dim)``, which layers slide, the config's digest) and one
:class:`~quantcache.cache.layer.LayerQuantizer` per attention layer holding the statistics while
calibrating and the fixed parameters once frozen.

It holds no conversation. :meth:`KVQuantizer.new_cache` gives a
:class:`~quantcache.cache.cache.QuantizedCalibratingCache` (a ``transformers.DynamicCache``) that
stores one conversation's keys and values and reads this quantizer's parameters without copying
them: making one costs no file I/O and no recomputation, any number of caches from one frozen
quantizer may decode at once (in threads too), and caches that calibrate add their statistics to
this quantizer (merges take a per-layer lock).

The state methods (``state_dict``, ``save``, :meth:`KVQuantizer.load` ...) are
:class:`~quantcache.cache.state.QuantizerStateMixin`'s.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from quantcache.cache.layer import LayerQuantizer
from quantcache.cache.model_facts import (
    attention_module_names,
    attention_shape,
    config_digest,
    kv_config,
    text_config,
)
from quantcache.cache.state import CacheMode, QuantizerStateMixin
from quantcache.cache.storage_layers import layer_class_for
from quantcache.cache.stream import StreamName
from quantcache.errors import CalibrationError, ConfigError
from quantcache.ops.bits import effective_bits
from quantcache.ops.engine_numerics import EngineNumerics
from quantcache.ops.granularity import Granularity
from quantcache.ops.rope import RopeTable, rope_frequencies, rope_pairs
from quantcache.scheme.args import QuantArgs, Storage
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.settings import Engine
from quantcache.state.schema import CalibrationLength

if TYPE_CHECKING:
    from quantcache.cache.cache import QuantizedCalibratingCache

__all__ = ["CacheMode", "KVQuantizer"]


def model_and_config(model_or_config: Any, who: str) -> tuple[PretrainedConfig, nn.Module | None]:
    """``(config, model)`` from a Transformers model (or ``(config, None)`` from its config)."""
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config, None
    config = getattr(model_or_config, "config", None)
    if isinstance(model_or_config, nn.Module) and isinstance(config, PretrainedConfig):
        return config, model_or_config
    raise TypeError(f"{who} needs a transformers model or its config, got {type(model_or_config).__name__}")


class KVQuantizer(QuantizerStateMixin):
    """The calibrated KV quantization of one model, shared by every cache made from it.

    Build it from the model (preferred: include/exclude then match the model's own
    attention module names) or from its config, calibrate it (:func:`quantcache.calibrate`,
    or caches from :meth:`new_cache` run through the model), :meth:`freeze` it, then make a
    cache per conversation::

        quantizer = quantcache.calibrate(model, token_windows, quant_config=KVQuantConfig.preset("int4"))
        quantizer.save("kv.safetensors")                # later: KVQuantizer.load("kv.safetensors", model)
        cache = quantizer.new_cache(storage="packed")   # one conversation
        model.generate(**inputs, past_key_values=cache)

    Args:
        model_or_config: a ``PreTrainedModel`` or its ``PretrainedConfig``.
        quant_config: the scheme and layer selection (a ``KVQuantConfig`` or its mapping);
            defaults to msModelSlim's symmetric INT8 per channel on all layers.
        warn_unmatched: warn when an include/exclude pattern matches no attention module.
    """

    cache_class: ClassVar[type[QuantizedCalibratingCache] | None] = None
    """The cache :meth:`new_cache` makes; :mod:`quantcache.cache.cache` sets it when it is imported
    (importing ``quantcache.cache`` imports both)."""

    def __init__(
        self,
        model_or_config: nn.Module | PretrainedConfig,
        quant_config: KVQuantConfig | Mapping[str, Any] | None = None,
        *,
        warn_unmatched: bool = True,
    ) -> None:
        config, model = model_and_config(model_or_config, type(self).__name__)
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
        self.model_config = config
        self.model_type: str | None = getattr(config, "model_type", None)
        self.model_name: str | None = getattr(config, "_name_or_path", None) or None
        self.model_config_sha256 = config_digest(config)
        # what a state made for this model may record: today's digest, or that of files written before it
        self.model_config_digests = tuple(
            digest for digest in (self.model_config_sha256, config_digest(config, every_entry=True)) if digest
        )
        self.model_kv_config = kv_config(config)
        self.kv_heads, self.head_dim = attention_shape(decoder_config)
        self.layer_names = (
            attention_module_names(model, num_layers)
            if model is not None
            else [f"model.layers.{index}.self_attn" for index in range(num_layers)]
        )
        self._check_group_sizes()
        self.layer_templates = self._empty_layers(config, num_layers)
        selected = self.quant_config.select(self.layer_names, warn_unmatched=warn_unmatched)
        expected_shape = (
            (self.kv_heads, self.head_dim) if self.kv_heads is not None and self.head_dim is not None else None
        )
        self.quantizers = [
            LayerQuantizer(
                index,
                name,
                # a layer kind with no quantizing counterpart (shared KV ...) stays plain
                enabled=selected[index] and layer_class_for(template) is not None,
                expected_shape=expected_shape,
                key_args=self.quant_config.stream_args("key", name),
                value_args=self.quant_config.stream_args("value", name),
            )
            for index, (name, template) in enumerate(zip(self.layer_names, self.layer_templates, strict=True))
        ]
        for quantizer in self.quantizers:
            quantizer.sink_tokens = self.quant_config.sink_tokens
            quantizer.residual_window = self.quant_config.residual_window
            quantizer.residual_block = self.quant_config.residual_block
        if self.quant_config.pre_rope_keys or self.quant_config.rope_center:
            self._set_key_rope(decoder_config, turned_center=self.quant_config.rope_center)
        self._set_rope_pairs(decoder_config)
        self.mode = CacheMode.CALIBRATE
        self._calibration_length: CalibrationLength | None = None
        self._calibration_lock = threading.Lock()

    @staticmethod
    def _empty_layers(config: PretrainedConfig, num_layers: int) -> list[Any]:
        """One empty Transformers layer per index, of the kind ``DynamicCache`` builds for this model."""
        layers = list(DynamicCache(config=config).layers)[:num_layers]
        return layers + [DynamicLayer() for _ in range(num_layers - len(layers))]  # type: ignore[no-untyped-call]

    def _check_group_sizes(self) -> None:
        if self.head_dim is None:
            return
        for args in self.quant_config.all_stream_args():
            try:  # the granularity owns the rule: a calibrated group must be whole, a dynamic one need not
                Granularity.of(args).groups(self.head_dim)
            except ValueError:
                raise ConfigError(
                    f"qconfig.group_size {args.group_size} does not divide this model's head_dim "
                    f"{self.head_dim}; choose a divisor of {self.head_dim} (a calibrated group must be whole; "
                    "a dynamic scheme's last group may be shorter)"
                ) from None

    def _set_key_rope(self, decoder_config: PretrainedConfig, *, turned_center: bool) -> None:
        """Give every quantized layer its RoPE angles: one table per layer type, shared by its layers.

        ``turned_center`` (``rope_center``): keys are stored after RoPE around their turned center.
        """
        setting = "rope_center" if turned_center else "pre_rope_keys"
        layer_types = getattr(decoder_config, "layer_types", None) or [None] * len(self.quantizers)
        tables: dict[str | None, RopeTable] = {}
        for quantizer, layer_type in zip(self.quantizers, layer_types, strict=False):
            if not quantizer.enabled:
                continue
            if layer_type not in tables:
                inv_freq = rope_frequencies(decoder_config, layer_type, setting)
                if self.head_dim is not None and inv_freq.numel() * 2 > self.head_dim:
                    raise ConfigError(
                        f"{setting}: the config's RoPE turns {inv_freq.numel() * 2} channels, more than "
                        f"head_dim {self.head_dim}; set {setting}: false for this model"
                    )
                tables[layer_type] = RopeTable(inv_freq)
            quantizer.key_rope = tables[layer_type]
            quantizer.rope_center = quantizer.key.space.center_turns = turned_center
            quantizer.key.space.rope_frequencies = tables[layer_type].inv_freq  # what query-aware rounding averages

    def _set_rope_pairs(self, decoder_config: PretrainedConfig) -> None:
        """Give every ``rope_radius`` key stream its layer's RoPE pairs (``rotary_dim / 2``)."""
        pairs: dict[str | None, int] = {}
        layer_types = getattr(decoder_config, "layer_types", None) or [None] * len(self.quantizers)
        for quantizer, layer_type in zip(self.quantizers, layer_types, strict=False):
            if not (quantizer.enabled and quantizer.key.args.rope_radius):
                continue
            if layer_type not in pairs:
                pairs[layer_type] = rope_pairs(decoder_config, layer_type)
                if self.head_dim is not None and 2 * pairs[layer_type] > self.head_dim:
                    raise ConfigError(
                        f"qconfig.key.rope_radius: the config's RoPE turns {2 * pairs[layer_type]} channels, "
                        f"more than head_dim {self.head_dim}"
                    )
            quantizer.key.set_rope_pairs(pairs[layer_type])

    # ------------------------------------------------------------------ caches
    def new_cache(
        self,
        storage: Storage | str | None = None,
        *,
        engine: Engine | str | EngineNumerics | None = None,
        read_codes: bool = False,
        compiled: bool = False,
        **dynamic_cache_kwargs: Any,
    ) -> QuantizedCalibratingCache:
        """An empty cache for one conversation that quantizes (or, calibrating, observes) through this quantizer.

        ``storage``: ``"fake"`` (the default) keeps dequantized states in the model dtype (for measuring),
        ``"packed"`` keeps codes (a fraction of the memory); both return the same keys and
        values. ``engine`` (``"ascend"``, ``"vllm"``, ``"modelopt"``) keeps instead what that serving
        engine would decode, with its arithmetic (:mod:`quantcache.ops.engine_numerics`; a frozen
        quantizer with an exportable scheme only). ``read_codes`` (packed storage only) makes ``update()`` return
        the stored rows for the attention function ``attn_implementation="quantcache"``
        (:func:`quantcache.use_code_attention`), which reads codes instead of decoded states and is faster
        at long contexts. ``compiled`` (packed storage only) runs the per-token work of decode steps (encoding new
        tokens, attention from codes) through kernels ``torch.compile`` makes, the model left eager
        (:mod:`quantcache.cache.compiled_kernels`). ``dynamic_cache_kwargs`` go to ``DynamicCache``
        (e.g. ``offloading``). The cache shares this quantizer's parameters: no file I/O, nothing recomputed.
        """
        if KVQuantizer.cache_class is None:
            raise RuntimeError("quantcache.cache.cache is not imported; import quantcache.cache first")
        return KVQuantizer.cache_class(
            self, storage=storage, engine=engine, read_codes=read_codes, compiled=compiled, **dynamic_cache_kwargs
        )

    def __getstate__(self) -> dict[str, Any]:  # a lock cannot be copied or pickled: each copy gets its own
        state = self.__dict__.copy()
        del state["_calibration_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._calibration_lock = threading.Lock()

    def copy(self) -> KVQuantizer:
        """An independent quantizer with the same config, statistics and parameters."""
        fresh = copy.copy(self)
        fresh.quantizers = copy.deepcopy(self.quantizers)
        fresh._calibration_lock = threading.Lock()
        return fresh

    def restricted_to(self, layers: Sequence[int]) -> KVQuantizer:
        """A quantizer that quantizes only ``layers`` (indices) with these very parameters (shared, not copied).

        What layer sensitivity measures: one layer quantized, the others kept exact.
        """
        chosen = set(layers)
        fresh = copy.copy(self)
        fresh.quantizers = [
            quantizer.sharing_streams(enabled=quantizer.enabled and quantizer.index in chosen)
            for quantizer in self.quantizers
        ]
        return fresh

    # ------------------------------------------------------------------ calibration
    def detach_statistics(self) -> None:
        """Make statistics gathered under ``torch.inference_mode`` ordinary tensors, which callers may edit."""
        for quantizer in self.quantizers:
            for _, stream in quantizer.streams:
                if stream.observer.observed:
                    stream.observer.load(stream.statistics)  # loading clones

    @property
    def calibration_length(self) -> CalibrationLength | None:
        """How long the calibration windows were: the longest one's tokens and how many windows.

        Counted as caches of this quantizer calibrate (each row of a calibrating cache is one
        window, its tokens those that cache took), saved with the state and loaded back;
        ``None`` before any calibration, and for states that do not record it (saved before
        it was recorded, imported from another tool). Loading a ``state_dict`` leaves it as it
        was; :meth:`reset_statistics` forgets it.
        """
        return self._calibration_length

    @property
    def calibration_tokens(self) -> int | None:
        """Tokens of the longest calibration window (:attr:`calibration_length`), or ``None`` when not recorded."""
        length = self._calibration_length
        return None if length is None else length.tokens_per_window

    def _count_calibration(self, tokens: int, new_windows: int) -> None:
        """A calibrating cache now holds ``tokens`` tokens per row, and began ``new_windows`` rows with this update."""
        with self._calibration_lock:
            known = self._calibration_length
            self._calibration_length = CalibrationLength(
                tokens_per_window=max(tokens, known.tokens_per_window if known else 0),
                windows=new_windows + (known.windows if known else 0),
            )

    @property
    def is_frozen(self) -> bool:
        return self.mode is CacheMode.FROZEN

    @property
    def quantized_layers(self) -> list[int]:
        """Indices of the layers whose KV cache is quantized (include minus exclude)."""
        return [quantizer.index for quantizer in self.quantizers if quantizer.enabled]

    def stream_args(self, layer_idx: int, stream: StreamName) -> QuantArgs:
        """The scheme of one stream (``"key"`` or ``"value"``) of layer ``layer_idx``, layer overrides applied."""
        return self.quantizers[layer_idx].stream(stream).args

    def statistic_fields(self, layer_idx: int, stream: StreamName) -> tuple[str, ...]:
        """The ``state_dict`` fields calibration collects for one stream; empty when it calibrates nothing."""
        layer = self.quantizers[layer_idx]
        quantizer = layer.stream(stream)
        return tuple(quantizer.observer.fields) if layer.enabled and quantizer.calibrates else ()

    @property
    def needs_calibration(self) -> bool:
        """Whether any quantized stream has something to calibrate (a static range, a center, query statistics)."""
        enabled = [quantizer for quantizer in self.quantizers if quantizer.enabled]
        return any(stream.calibrates for quantizer in enabled for _, stream in quantizer.streams)

    @property
    def observes_queries(self) -> bool:
        """Whether a quantized layer's keys are query-aware, so calibration must show it the queries."""
        return any(quantizer.observes_queries for quantizer in self.quantizers)

    @property
    def query_layers(self) -> list[int]:
        """Indices of the layers that calibration must show their queries (see :meth:`observe_queries`)."""
        return [quantizer.index for quantizer in self.quantizers if quantizer.observes_queries]

    def observe_queries(self, layer_idx: int, query_states: Any, token_mask: Any = None) -> None:
        """Fold one layer's ``(batch, heads, seq, head_dim)`` queries into its query-aware key statistics.

        ``token_mask``: the ``(batch, seq)`` attention mask of the forward pass (pads left
        out). Layers whose keys are not query-aware (or not quantized) ignore the call.
        """
        if self.is_frozen:
            raise CalibrationError("observe_queries collects calibration statistics; the quantizer is frozen")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.quantizers):
            raise ValueError(f"layer_idx must be a layer index from 0 to {len(self.quantizers) - 1}, got {layer_idx!r}")
        self.quantizers[layer_idx].observe_queries(query_states, token_mask)

    def freeze(self) -> KVQuantizer:
        """Turn the collected statistics into fixed parameters; from now on its caches quantize.

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
        if len(unobserved) == len(enabled) and any(quantizer.sink_only_updates for quantizer in enabled):
            sinks = self.quant_config.sink_tokens
            raise CalibrationError(
                f"every calibration token fell inside the first sink_tokens ({sinks}) positions, which are kept in "
                f"full precision and never observed: calibrate on windows longer than {sinks} tokens "
                "(quantcache calibrate --seq-len) or lower sink_tokens"
            )
        if len(unobserved) == len(enabled):
            raise CalibrationError(
                "freeze() called before any calibration data was seen: run the model on calibration "
                "text with a cache of this quantizer (model(ids, past_key_values=quantizer.new_cache())) first"
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

    def unfreeze(self) -> KVQuantizer:
        """Go back to calibration: keep the statistics (more data adds to them), drop the parameters."""
        for quantizer in self.quantizers:
            quantizer.unfreeze()
        self.mode = CacheMode.CALIBRATE
        return self

    def reset_statistics(self) -> KVQuantizer:
        """Forget all statistics and parameters and return to calibrate mode."""
        for quantizer in self.quantizers:
            quantizer.reset()
        self.mode = CacheMode.CALIBRATE
        self._calibration_length = None
        return self

    # ------------------------------------------------------------------ what the layers hold
    def keeps_sinks(self) -> list[bool]:
        """Whether each layer keeps sink tokens (full-attention ones; sliding windows evict them anyway)."""
        return [
            layer_class is not None and layer_class.keeps_sinks
            for layer_class in (layer_class_for(template) for template in self.layer_templates)
        ]

    def held_tokens(self, seq_len: int) -> list[int]:
        """Tokens each layer holds after ``seq_len`` tokens (a sliding-window layer keeps at most window - 1)."""
        held = []
        for template in self.layer_templates:
            window = getattr(template, "sliding_window", None)
            held.append(min(seq_len, window - 1) if isinstance(window, int) and window > 1 else seq_len)
        return held

    def sinks_held(self, seq_len: int) -> list[int]:
        """Sink tokens each layer keeps in full precision after ``seq_len`` tokens (none in sliding-window layers)."""
        sinks = min(self.quant_config.sink_tokens, seq_len)
        return [sinks if keeps else 0 for keeps in self.keeps_sinks()]

    def full_precision_held(self, seq_len: int) -> list[int]:
        """Tokens each layer keeps in full precision on top of their codes' bytes after ``seq_len`` tokens, at most.

        Its residual window at its largest, the newest ``residual_window + residual_block - 1`` of the
        tokens it holds (not quantized yet), and the sink tokens (:meth:`sinks_held`) among those that
        have left it (a sink token still in the window has one copy, the window's).
        """
        window = self.quant_config.residual_window + self.quant_config.residual_block - 1
        counts = []
        for sinks, held in zip(self.sinks_held(seq_len), self.held_tokens(seq_len), strict=True):
            pending = min(window, held)
            counts.append(pending + min(sinks, seq_len - pending))
        return counts

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
            layer_tokens=self.held_tokens(seq_len),
            layer_copies=self.full_precision_held(seq_len),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode.value}, layers={len(self.quantizers)}, "
            f"quantized={len(self.quantized_layers)})"
        )
