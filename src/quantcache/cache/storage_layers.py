"""Storage: the cache layer classes a quantized cache is made of.

Transformers keeps one layer object per attention layer (``CacheLayerMixin`` ->
``DynamicLayer`` -> ``DynamicSlidingWindowLayer`` ...) and the container only
dispatches to them. Quantization joins that pattern as a mixin: the layer hands each
update's new states to its :class:`~quantcache.cache.stream.LayerQuantizer` first
(observe while calibrating, quantize once frozen), then stores what comes back with
its base class's own logic, so sliding windows, cropping, beam reordering and batch
expansion stay exactly Transformers'. A storage that keeps codes instead of
dequantized states is one more class here, and so is one that keeps what a serving engine would
decode (:class:`EngineLayerMixin`, the arithmetic in :mod:`quantcache.ops.engine_numerics`).

Appending into room reserved ahead (instead of re-concatenating the history at every
decode step) is :mod:`quantcache.cache.growing_storage`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from quantcache.cache import compiled_kernels
from quantcache.cache.attention import CodeReader, ExactRows
from quantcache.cache.growing_storage import MIN_ROOM_TOKENS, ROOM_FRACTION, GrowingLayerMixin, GrowingStorage
from quantcache.cache.layer import LayerQuantizer
from quantcache.cache.stream import QuantizeHook, StreamQuantizer
from quantcache.errors import CalibrationError
from quantcache.ops.engine_numerics import EngineNumerics, EngineStream

__all__ = [
    "MIN_ROOM_TOKENS",
    "ROOM_FRACTION",
    "EngineDynamicLayer",
    "EngineLayerMixin",
    "EngineSlidingWindowLayer",
    "GrowingStorage",
    "PackedDynamicLayer",
    "PackedSlidingWindowLayer",
    "PackingLayerMixin",
    "QuantizedDynamicLayer",
    "QuantizedSlidingWindowLayer",
    "QuantizingLayerMixin",
    "layer_class_for",
    "layer_memory",
    "quantizing_layer",
]


_StatePair = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (batch, kv_heads, tokens, head_dim)


def _mapped(pair: _StatePair | None, change: Callable[[torch.Tensor], torch.Tensor]) -> _StatePair | None:
    """``change`` applied to both tensors of a full-precision copy (``None``: no copy)."""
    return None if pair is None else (change(pair[0]), change(pair[1]))


def _pair_bytes(pair: _StatePair | None) -> int:
    return 0 if pair is None else sum(tensor.numel() * tensor.element_size() for tensor in pair)


class QuantizingLayerMixin:
    """Passes new states through ``self.quantizer`` before the base layer stores them.

    ``quantizer`` is set by the cache that owns the layer; ``None`` (or a disabled
    quantizer) leaves the layer a plain one. Full-attention layers tell the quantizer
    where the new tokens start, so it keeps the config's sink tokens in full precision;
    sliding-window layers (``keeps_sinks = False``) evict those tokens anyway.

    Residual window (``residual_window: R``, ``residual_block: B``): the newest tokens
    are held in full precision, and a token is quantized when it leaves them, ``B`` at a
    time: once ``R + B`` tokens are pending, all but the newest ``R`` are quantized in one
    call (a prefill's, in one). Which tokens are read back from their codes depends only on
    how many tokens followed them, however they came (one at a time or in chunks); fake and
    packed storage quantize the same blocks, so they stay bit for bit alike. Here (fake
    storage) pending tokens are stored as they came and overwritten in place by their
    quantized states; cropping drops pending tokens first (those quantized before stay so).
    """

    quantizer: LayerQuantizer | None = None
    keeps_sinks = True
    # What belongs to this layer's conversation, set by its cache: the (batch, seq) padding mask that
    # calibration leaves out, and a hook that hears every quantization (see quantcache.cache.stream).
    token_mask: torch.Tensor | None = None
    on_quantize: QuantizeHook | None = None
    # How many of the newest tokens the layer holds are not quantized yet (the residual window's).
    _pending = 0
    # Packed storage's full-precision (keys, values) of those tokens, each (batch, kv_heads, pending, head_dim).
    _recent: _StatePair | None = None

    def _position(self) -> int:
        """Position of the next new token in its sequence: the tokens this layer has seen."""
        return int(self.get_seq_length())  # type: ignore[attr-defined]

    def _window(self) -> tuple[int, int]:
        """``(residual_window, residual_block)`` of this layer now: a frozen, enabled quantizer's, else ``(0, 1)``."""
        quantizer = self.quantizer
        if quantizer is None or not quantizer.enabled or not quantizer.frozen:
            return 0, 1
        return quantizer.residual_window, quantizer.residual_block

    def _defers(self) -> bool:
        """Whether new tokens wait in a residual window before they are quantized (else they are on arrival)."""
        return self._window() != (0, 1)

    def _leaving(self, new_tokens: int, held: int) -> tuple[int, int]:
        """``(pending, leaving)``: the tokens pending once ``new_tokens`` arrive (at most the ``held`` the layer
        returns), and how many of the oldest of them leave the window now (quantized together)."""
        window, block = self._window()
        pending = min(self._pending + new_tokens, held)
        return pending, (pending - window if pending >= window + block else 0)

    def held_dtype(self) -> torch.dtype | None:
        """The dtype of the states this layer holds (``None`` while empty): the dtype of its first update."""
        stored = getattr(self, "keys", None)
        if not isinstance(stored, torch.Tensor) or not stored.numel():
            return None
        return getattr(self, "states_dtype", None) if stored.dtype == torch.uint8 else stored.dtype

    def _check_dtype(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """One conversation, one dtype: a cache answers in the dtype it holds, so another dtype is refused."""
        held = self.held_dtype()
        if value_states.dtype != key_states.dtype or (held is not None and key_states.dtype != held):
            raise ValueError(
                f"states of dtype {key_states.dtype} (values {value_states.dtype}) for a cache layer holding {held}: "
                "a cache holds one conversation in one dtype; run the model in one dtype, or start a new cache "
                "(quantizer.new_cache()) for the other"
            )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_states``/``value_states`` are the new ``(batch, kv_heads, new_tokens, head_dim)`` states."""
        self._check_dtype(key_states, value_states)
        if self._defers():
            return self._update_through_window(key_states, value_states, *args, **kwargs)
        new_keys, new_values = key_states, value_states
        if self.quantizer is not None:
            new_keys, new_values = self.quantizer.process(
                key_states,
                value_states,
                self._position(),
                keeps_sinks=self.keeps_sinks,
                token_mask=self.token_mask,
                hook=self.on_quantize,
            )
        return super().update(new_keys, new_values, *args, **kwargs)  # type: ignore[misc,no-any-return]

    def _update_through_window(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states as they are; quantize in place the pending ones that leave the window now."""
        quantizer = self.quantizer
        assert quantizer is not None
        end = self._position() + key_states.shape[2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # type: ignore[misc]
        pending, leaving = self._leaving(key_states.shape[2], int(keys.shape[2]))
        if leaving:
            rows = slice(keys.shape[2] - pending, keys.shape[2] - pending + leaving)
            leaving_keys, leaving_values = keys[:, :, rows].contiguous(), values[:, :, rows].contiguous()  # as packed
            keys[:, :, rows], values[:, :, rows] = quantizer.process(
                leaving_keys, leaving_values, end - pending, keeps_sinks=self.keeps_sinks, hook=self.on_quantize
            )
        self._pending = pending - leaving
        self._trim_recent()
        return keys, values

    def _trim_recent(self) -> None:
        """Count as pending, and copy, only tokens the base layer still holds (a sliding window evicts its oldest)."""
        stored = getattr(self, "keys", None)
        if stored is None:
            return
        self._pending = min(self._pending, int(stored.shape[-2]))
        if self._recent is not None and self._recent[0].shape[2] > self._pending:
            kept = self._pending
            self._recent = _mapped(self._recent, lambda copy: copy[:, :, copy.shape[2] - kept :])

    def _map_copies(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``change`` to every full-precision copy the layer keeps (a batch operation)."""
        self._recent = _mapped(self._recent, change)

    def recent_bytes(self) -> int:
        """Bytes of the residual window's full-precision states."""
        return _pair_bytes(self._recent)

    # The full-precision copies follow every operation that changes the base class's batch or length.
    def reset(self) -> None:
        self._recent, self._pending = None, 0
        super().reset()  # type: ignore[misc]

    def crop(self, max_length: int) -> None:
        before = self._position()
        super().crop(max_length)  # type: ignore[misc]
        self._cropped(before - self._position())

    def _cropped(self, removed: int) -> None:
        """Drop the ``removed`` newest tokens from the pending ones (and their copies)."""
        if removed > 0:
            self._pending = max(self._pending - removed, 0)
            if self._recent is not None:
                kept = self._pending
                self._recent = _mapped(self._recent, lambda copy: copy[:, :, :kept])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        self._map_copies(lambda copy: copy[beam_idx.to(copy.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        self._map_copies(lambda copy: copy.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # type: ignore[misc]
        self._map_copies(lambda copy: copy[indices, ...])


class PackingLayerMixin(QuantizingLayerMixin):
    """Once frozen, stores packed ``uint8`` rows (codes + any per-token parameters) instead of states.

    The base layer keeps the rows in ``keys``/``values`` (``(batch, kv_heads, seq,
    row_bytes)``, see :mod:`quantcache.ops.packing`) and does its own appending, window
    trimming, cropping and reordering on them; this mixin encodes the new states
    before and decodes what the base layer returns after. Each token is quantized once:
    when written, or, with a residual window, when it leaves the window (its row is blank
    until then, and its states are kept apart in ``_recent``). While calibrating it behaves
    like :class:`QuantizingLayerMixin`.
    A layer still holding states stored while calibrating refuses frozen updates (fake
    storage would keep those states unquantized, packed storage cannot): continue with
    an :meth:`~quantcache.cache.cache.QuantizedCalibratingCache.empty_copy`.
    """

    states_dtype: torch.dtype | None = None  # the model dtype the rows decode to
    reads_codes = False
    """Return the stored rows for ``attn_implementation="quantcache"`` (:mod:`quantcache.cache.attention`)
    instead of decoded states; the cache sets it (``new_cache(storage="packed", read_codes=True)``)."""
    compiled_kernels = False
    """Encode decode steps' tokens and attend from codes through compiled kernels
    (:mod:`quantcache.cache.compiled_kernels`); the cache sets it (``new_cache(storage="packed", compiled=True)``)."""
    # The sink tokens' own full-precision (keys, values), each (batch, kv_heads, sinks, head_dim): their rows
    # hold codes too, so the layer's length and the base class's cropping and reordering stay as they are.
    _sinks: _StatePair | None = None

    @property
    def sink_keys(self) -> torch.Tensor | None:
        return None if self._sinks is None else self._sinks[0]

    @property
    def sink_values(self) -> torch.Tensor | None:
        return None if self._sinks is None else self._sinks[1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        quantizer = self.quantizer
        if quantizer is None or not quantizer.enabled or not quantizer.frozen:
            return super().update(key_states, value_states, *args, **kwargs)
        self._check_dtype(key_states, value_states)
        keys: torch.Tensor | None = getattr(self, "keys", None)
        if keys is not None and keys.numel() and keys.dtype != torch.uint8:
            raise CalibrationError(
                f"layer {quantizer.index} ({quantizer.name}) still holds the states it stored while calibrating; "
                "a packed cache starts empty: continue with cache.empty_copy() after freeze()"
            )
        self.states_dtype = key_states.dtype
        start = self._position()
        if self._defers():
            stored_keys, stored_values = self._store_through_window(key_states, value_states, start, *args, **kwargs)
        else:  # every token quantized as it arrives
            key_rows, value_rows = self._rows(key_states, value_states, start)
            stored_keys, stored_values = super(QuantizingLayerMixin, self).update(  # type: ignore[misc]
                key_rows, value_rows, *args, **kwargs
            )
        reader = self._reader(stored_keys, stored_values, key_states.dtype)
        # returned after reading: a sliding window returns one more token than it keeps
        returned = reader.handles() if self.reads_codes else reader.states(key_states.dtype)
        self._trim_recent()
        return returned

    def _store_through_window(
        self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store blank rows for the new tokens and keep their states; encode, in place of their blank rows, the
        pending tokens that leave the window now (as :meth:`QuantizingLayerMixin._update_through_window`)."""
        quantizer = self.quantizer
        assert quantizer is not None
        new = key_states.shape[2]
        pending_keys, pending_values = key_states, value_states
        if self._recent is not None and self._pending:
            pending_keys = torch.cat([self._recent[0].to(key_states.device), key_states], dim=2)
            pending_values = torch.cat([self._recent[1].to(value_states.device), value_states], dim=2)
        blank = (*key_states.shape[:3], quantizer.key.row_bytes())
        stored_keys, stored_values = super(QuantizingLayerMixin, self).update(  # type: ignore[misc]
            key_states.new_zeros(blank, dtype=torch.uint8),
            value_states.new_zeros((*blank[:3], quantizer.value.row_bytes()), dtype=torch.uint8),
            *args,
            **kwargs,
        )
        pending, leaving = self._leaving(new, int(stored_keys.shape[2]))
        pending_keys, pending_values = pending_keys[:, :, -pending:], pending_values[:, :, -pending:]
        if leaving:
            first = start + new - pending  # the position of the oldest pending token
            # contiguous: a slice of the pending tokens is strided, and every step of quantizing would inherit it
            keys, values = pending_keys[:, :, :leaving].contiguous(), pending_values[:, :, :leaving].contiguous()
            rows = slice(stored_keys.shape[2] - pending, stored_keys.shape[2] - pending + leaving)
            stored_keys[:, :, rows], stored_values[:, :, rows] = self._rows(keys, values, first)
        self._pending = pending - leaving
        kept = self._pending
        self._recent = (pending_keys[:, :, leaving:].clone(), pending_values[:, :, leaving:].clone()) if kept else None
        return stored_keys, stored_values

    def _decoded_keys(self, stored_keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The stored key rows decoded as attention reads them (:meth:`LayerQuantizer.keys_to_read`), in ``dtype``."""
        quantizer = self.quantizer
        assert quantizer is not None
        keys = quantizer.key.decode(stored_keys, quantizer.decode_dtype(dtype))
        # The rows returned end with the newest token: they start that many positions before the end.
        return quantizer.keys_to_read(keys, self._position() - keys.shape[2], dtype)

    def _reader(self, stored_keys: torch.Tensor, stored_values: torch.Tensor, dtype: torch.dtype) -> CodeReader:
        """The rows returned for attention from codes, with the full-precision rows that replace some of them."""
        quantizer = self.quantizer
        assert quantizer is not None
        length = int(stored_keys.shape[2])
        head = tail = None
        if self._sinks is not None and (held := min(int(self._sinks[0].shape[2]), length)):
            head = ExactRows(self._sinks[0][:, :, :held], self._sinks[1][:, :, :held])
        if self._recent is not None:  # the pending tokens: the newest rows, never under the sinks
            held = min(self._recent[0].shape[2], length - (0 if head is None else head.length))
            if held > 0:
                tail = ExactRows(self._recent[0][:, :, -held:], self._recent[1][:, :, -held:])
        keys = None
        if quantizer.key_rope is not None and not quantizer.rope_center:  # a turn per row: decode the keys
            keys = self._decoded_keys(stored_keys, dtype)
            if head is not None:
                keys[:, :, : head.length] = head.keys.to(keys)
            if tail is not None:
                keys[:, :, length - tail.length :] = tail.keys.to(keys)
        first = self._position() - length  # the position of the first row returned
        return CodeReader(
            quantizer,
            stored_keys,
            stored_values,
            first,
            keys=keys,
            head=head,
            tail=tail,
            compiled=self.compiled_kernels,
        )

    def _rows(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed key and value rows of states at positions ``start..``, the sink tokens among them kept apart."""
        quantizer = self.quantizer
        assert quantizer is not None
        sinks = quantizer.sinks_among(keys.shape[2], start, keeps_sinks=self.keeps_sinks)
        if not sinks:
            if self._compiles(keys.shape[2]):
                return compiled_kernels.encode_rows(quantizer, keys, values, start)
            return quantizer.encode(keys, values, start, self.on_quantize)
        self._keep_sinks(keys[:, :, :sinks], values[:, :, :sinks], start)
        key_rows = self._encode(quantizer.key, quantizer.keys_to_quantize(keys, start), sinks)
        return key_rows, self._encode(quantizer.value, values, sinks)

    def _compiles(self, tokens: int) -> bool:
        """Whether ``tokens`` new tokens (no sinks among them) are encoded by the compiled kernel: with
        :attr:`compiled_kernels` set, no hook listening (it hears eager encoding), a decode-sized call, and not
        inside a graph being compiled already."""
        return (
            self.compiled_kernels
            and self.on_quantize is None
            and tokens <= compiled_kernels.COMPILED_TOKENS
            and not torch.compiler.is_compiling()
        )

    def _encode(self, stream: StreamQuantizer, states: torch.Tensor, sinks: int) -> torch.Tensor:
        """Packed rows of ``states`` whose first ``sinks`` (at least one) are placeholders (their states are kept
        apart)."""
        placeholder = stream.encode(states[:, :, :sinks])  # unheard: the sinks' own states are what is read
        if sinks == states.shape[2]:
            return placeholder
        return torch.cat([placeholder, stream.encode(states[:, :, sinks:], self.on_quantize)], dim=2)

    def _keep_sinks(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        if start == 0 or self._sinks is None:
            self._sinks = (keys.clone(), values.clone())
        else:
            self._sinks = (
                torch.cat([self._sinks[0][:, :, :start], keys], dim=2),
                torch.cat([self._sinks[1][:, :, :start], values], dim=2),
            )

    def _map_copies(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_copies(change)
        self._sinks = _mapped(self._sinks, change)

    def sink_bytes(self) -> int:
        """Bytes of the sink tokens' full-precision states."""
        return _pair_bytes(self._sinks)

    def reset(self) -> None:
        self._sinks = None
        super().reset()

    def _cropped(self, removed: int) -> None:
        super()._cropped(removed)
        keys = getattr(self, "keys", None)
        if self._sinks is not None and keys is not None:
            held = int(keys.shape[-2]) if keys.numel() else 0
            self._sinks = _mapped(self._sinks, lambda sink: sink[:, :, :held])


class EngineLayerMixin(QuantizingLayerMixin):
    """Once frozen, stores what a serving engine would decode from its cache, in the model dtype.

    The cache sets :attr:`numerics` (the engine, :class:`~quantcache.ops.engine_numerics.EngineNumerics`)
    and :attr:`engine_streams` (its key and value streams for this layer, made from the frozen
    state). Each update's new ``(batch, kv_heads, new_tokens, head_dim)`` states go through the
    engine's quantize and decode rules instead of quantcache's, and the base layer stores the
    result with its own logic (appending, sliding windows, cropping, reordering). An engine whose
    first forward pass attends to unquantized states (vLLM-Ascend) gets them back from that first
    update; the layer stores them quantized all the same, and later updates read the stored ones.
    While calibrating, or for a layer without engine streams, it behaves like
    :class:`QuantizingLayerMixin`. Engines quantize every token after RoPE, so the schemes
    that keep sinks or a residual window, or quantize keys before RoPE, never reach this layer
    (the cache refuses them).
    """

    numerics: EngineNumerics | None = None
    engine_streams: tuple[EngineStream, EngineStream] | None = None  # (keys, values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        quantizer, streams, numerics = self.quantizer, self.engine_streams, self.numerics
        if quantizer is None or streams is None or numerics is None or not quantizer.enabled or not quantizer.frozen:
            return super().update(key_states, value_states, *args, **kwargs)
        self._check_dtype(key_states, value_states)
        first_pass = self._position() == 0
        stored = []
        incoming = (key_states, value_states)
        for (_, stream), engine_stream, states in zip(quantizer.streams, streams, incoming, strict=True):
            decoded = engine_stream.round_trip(states)
            if self.on_quantize is not None:
                self.on_quantize(stream, states, decoded, engine_stream)
            stored.append(decoded)
        keys, values = super(QuantizingLayerMixin, self).update(stored[0], stored[1], *args, **kwargs)  # type: ignore[misc]
        if first_pass and numerics.prefill_reads_unquantized:
            return key_states, value_states  # with nothing cached before, the base layer returned just these tokens
        return keys, values


class QuantizedDynamicLayer(QuantizingLayerMixin, GrowingLayerMixin, DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` whose new states are quantized (or observed) before they are stored."""


class QuantizedSlidingWindowLayer(QuantizingLayerMixin, DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` whose new states are quantized (or observed) before they are stored."""

    keeps_sinks = False


class PackedDynamicLayer(PackingLayerMixin, GrowingLayerMixin, DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` that stores packed codes once frozen."""


class PackedSlidingWindowLayer(PackingLayerMixin, DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` that stores packed codes once frozen."""

    keeps_sinks = False


class EngineDynamicLayer(EngineLayerMixin, GrowingLayerMixin, DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` that stores what a serving engine would decode once frozen."""


class EngineSlidingWindowLayer(EngineLayerMixin, DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` that stores what a serving engine would decode once frozen."""

    keeps_sinks = False


def layer_class_for(template: Any, *, packed: bool = False, engine: bool = False) -> type[QuantizingLayerMixin] | None:
    """The quantizing (``packed``: packing; ``engine``: engine-numerics) layer class for a layer like ``template``.

    ``None`` for layer kinds with no quantizing counterpart (layers that share another
    layer's KV, linear-attention states ...): those stay plain and unquantized.
    """
    if packed and engine:
        raise ValueError("a layer stores packed codes or what an engine decodes, not both")
    if type(template) is DynamicSlidingWindowLayer:
        if engine:
            return EngineSlidingWindowLayer
        return PackedSlidingWindowLayer if packed else QuantizedSlidingWindowLayer
    if type(template) is DynamicLayer:
        if engine:
            return EngineDynamicLayer
        return PackedDynamicLayer if packed else QuantizedDynamicLayer
    return None


def quantizing_layer(template: Any, quantizer: LayerQuantizer, *, packed: bool = False, engine: bool = False) -> Any:
    """A new, empty layer of the same kind as ``template`` that quantizes through ``quantizer``.

    A kind with no quantizing counterpart (see :func:`layer_class_for`) gives an empty copy of
    ``template`` itself. ``engine`` makes an :class:`EngineLayerMixin` layer, whose engine streams
    the cache sets.
    """
    layer_class = layer_class_for(template, packed=packed, engine=engine)
    if layer_class is None:
        return copy.deepcopy(template)
    layer: QuantizingLayerMixin
    if issubclass(layer_class, DynamicSlidingWindowLayer):
        layer = layer_class(sliding_window=template.sliding_window)
    else:
        layer = layer_class()
    layer.quantizer = quantizer
    return layer


def layer_memory(layer: Any) -> dict[str, int]:
    """Bytes one cache layer holds: ``codes``, ``parameters`` (per-token parameters and row flags,
    plus the quantizer's fixed scales and zero points or centers), ``full_precision`` (states kept in the
    model dtype), ``reserved`` (room allocated for tokens still to come, see
    :class:`GrowingStorage`), ``encoder`` (tensors derived from the stored parameters on first use, a
    fixed cost per layer: query-aware rounding's feedback matrices, which writing new tokens reads, and
    the key center arranged by RoPE pairs, which attention from codes reads),
    and ``dynamic_cache`` (what a ``DynamicCache`` would hold for the same tokens).
    """
    keys: torch.Tensor | None = getattr(layer, "keys", None)
    values: torch.Tensor | None = getattr(layer, "values", None)
    report = {"codes": 0, "parameters": 0, "full_precision": 0, "reserved": 0, "encoder": 0, "dynamic_cache": 0}
    if isinstance(layer, GrowingLayerMixin):
        report["reserved"] = layer.reserved_bytes()
    if isinstance(layer, QuantizingLayerMixin):
        report["full_precision"] += layer.recent_bytes()
    if isinstance(layer, PackingLayerMixin):
        report["full_precision"] += layer.sink_bytes()
    quantizer: LayerQuantizer | None = getattr(layer, "quantizer", None)
    if quantizer is not None and quantizer.enabled:
        reads_codes = bool(getattr(layer, "reads_codes", False))
        for _, stream in quantizer.streams:
            if stream.params is not None:  # a symmetric or float8 zero point is all zeros: decoding never reads it
                needed = [stream.params.scale]
                if stream.args.stores_zero_point:
                    needed.append(stream.params.zero_point)
                report["parameters"] += sum(t.numel() * t.element_size() for t in needed)
            # a centred stream's mean, a query-aware scale, query-aware rounding's query model
            for tensor in (stream.center, stream.channel_scale, *(stream.space.query_model or ())):
                if tensor is not None:
                    report["parameters"] += tensor.numel() * tensor.element_size()
            derived = stream.space.derived_tensors(reads_codes=reads_codes)
            report["encoder"] += sum(t.numel() * t.element_size() for t in derived)
    for stored, stream_name in ((keys, "key"), (values, "value")):
        if stored is None or not stored.numel():
            continue
        if stored.dtype == torch.uint8 and quantizer is not None:
            stream = quantizer.stream(stream_name)
            head_dim = stream.expected_shape[1] if stream.expected_shape else 0
            code_bytes = stream.code_bytes(head_dim)
            rows = stored.numel() // stored.shape[-1]
            report["codes"] += rows * code_bytes
            report["parameters"] += rows * (stored.shape[-1] - code_bytes)
            dtype = getattr(layer, "states_dtype", None) or torch.float32
            report["dynamic_cache"] += rows * head_dim * torch.empty((), dtype=dtype).element_size()
        else:
            size = stored.numel() * stored.element_size()
            report["full_precision"] += size
            report["dynamic_cache"] += size
    return report
