"""Storage: the cache layer classes a quantized cache is made of.

Transformers keeps one layer object per attention layer (``CacheLayerMixin`` ->
``DynamicLayer`` -> ``DynamicSlidingWindowLayer`` ...) and the container only
dispatches to them. Quantization joins that pattern as a mixin: the layer hands each
update's new states to its :class:`~quantcache.quantizer.LayerQuantizer` first
(observe while calibrating, quantize once frozen), then stores what comes back with
its base class's own logic, so sliding windows, cropping, beam reordering and batch
expansion stay exactly Transformers'. A storage that keeps codes instead of
dequantized states is one more class here.

Appending: ``DynamicLayer`` concatenates the whole history with each new token
(``torch.cat``), which copies every stored byte at every decode step. The non-sliding
layers here append into room reserved ahead (:class:`GrowingStorage`): a decode step
copies only its new tokens, and the reserved room is 1/:data:`ROOM_FRACTION` of the
tokens held (at least :data:`MIN_ROOM_TOKENS`), reported by ``memory_report`` as
``reserved``.
What ``update`` returns is a view of the filled part; a tensor returned earlier is
never written again (after a crop, the next append moves to a fresh buffer).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .errors import CalibrationError
from .formats import FormatKind
from .layer_quantizer import LayerQuantizer

__all__ = [
    "MIN_ROOM_TOKENS",
    "ROOM_FRACTION",
    "GrowingStorage",
    "PackedDynamicLayer",
    "PackedSlidingWindowLayer",
    "PackingLayerMixin",
    "QuantizedDynamicLayer",
    "QuantizedSlidingWindowLayer",
    "QuantizingLayerMixin",
    "layer_memory",
    "quantizing_layer",
]


MIN_ROOM_TOKENS = 16
ROOM_FRACTION = 64  # room ahead, as a fraction of the history: 1.6 % more bytes, one history copy per 64 steps


class GrowingStorage:
    """One stream's history ``(batch, kv_heads, seq, row)`` kept in a buffer with room to append.

    ``self.buffer`` is ``(batch, kv_heads, capacity, row)``; the layer's ``keys`` (or
    ``values``) is the view ``buffer[..., :length, :]``. An append copies into the room
    when the stored tensor is still that view and covers every position written so far;
    anything else (a first update, a crop, a beam reorder or batch change that replaced
    the tensor, offloading, a buffer made under ``torch.inference_mode`` used outside it)
    moves the history into a new buffer, sized ``needed + max(MIN_ROOM_TOKENS, needed // ROOM_FRACTION)``.
    """

    __slots__ = ("buffer", "filled")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def _holds(self, stored: torch.Tensor) -> bool:
        buffer = self.buffer
        return (
            buffer is not None
            and stored.dim() == 4
            and stored.data_ptr() == buffer.data_ptr()
            and stored.shape[-2] == self.filled
            and stored.stride() == buffer.stride()
            and stored.shape[:2] == buffer.shape[:2]
            and stored.shape[3] == buffer.shape[3]
            and stored.dtype == buffer.dtype
            and stored.device == buffer.device
            and (not buffer.is_inference() or torch.is_inference_mode_enabled())
        )

    def append(self, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``stored`` (the layer's current history, possibly empty) followed by ``new``, as a view."""
        added = new.shape[-2]
        if self._holds(stored) and self.buffer is not None and self.filled + added <= self.buffer.shape[-2]:
            buffer = self.buffer
        else:
            history = stored if stored.numel() else None
            length = history.shape[-2] if history is not None else 0
            needed = length + added
            capacity = needed + max(MIN_ROOM_TOKENS, needed // ROOM_FRACTION)
            buffer = torch.empty((*new.shape[:2], capacity, new.shape[3]), dtype=new.dtype, device=new.device)
            if history is not None:
                buffer[:, :, :length].copy_(history)
            self.buffer, self.filled = buffer, length
        start = self.filled
        buffer[:, :, start : start + added].copy_(new)
        self.filled = start + added
        return buffer[:, :, : self.filled]

    def reserved_bytes(self, stored: torch.Tensor | None) -> int:
        """Bytes of the buffer beyond ``stored`` (0 when ``stored`` is not a view of it)."""
        buffer = self.buffer
        if buffer is None or stored is None or stored.data_ptr() != buffer.data_ptr():
            return 0
        return (buffer.numel() - stored.numel()) * buffer.element_size()

    def release(self) -> None:
        self.buffer, self.filled = None, 0


class GrowingLayerMixin:
    """``DynamicLayer`` storage that appends into reserved room instead of re-concatenating (see the module docstring).

    Falls back to the base layer's concatenation for states that require grad (an
    in-place copy would tie the buffer into the autograd graph).
    """

    _key_storage: GrowingStorage | None = None
    _value_storage: GrowingStorage | None = None
    keys: Any  # the base layer's stored tensors (None before the first update)
    values: Any

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new ``(batch, kv_heads, new_tokens, row)`` states; return the whole history (views)."""
        if key_states.requires_grad or value_states.requires_grad:
            self.release_storage()
            result: tuple[torch.Tensor, torch.Tensor] = super().update(  # type: ignore[misc]
                key_states, value_states, *args, **kwargs
            )
            return result
        if self.keys is None or not getattr(self, "is_initialized", True):
            self._initialize(key_states, value_states)
        if self._key_storage is None or self._value_storage is None:
            self._key_storage, self._value_storage = GrowingStorage(), GrowingStorage()
        self.keys = self._key_storage.append(self.keys, key_states)
        self.values = self._value_storage.append(self.values, value_states)
        return self.keys, self.values

    def _initialize(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The base layer's lazy initialization: ``(keys, values)`` from transformers 5, ``(keys)`` in 4.x."""
        initialize = self.lazy_initialization  # type: ignore[attr-defined]
        if len(inspect.signature(initialize).parameters) >= 2:
            initialize(key_states, value_states)
        else:
            initialize(key_states)

    def reserved_bytes(self) -> int:
        """Bytes reserved for tokens not yet written."""
        total = 0
        for storage, stored in ((self._key_storage, self.keys), (self._value_storage, self.values)):
            if storage is not None:
                total += storage.reserved_bytes(stored)
        return total

    def release_storage(self) -> None:
        """Forget the buffers (the next append moves the history into new ones)."""
        for storage in (self._key_storage, self._value_storage):
            if storage is not None:
                storage.release()

    # Operations that replace ``keys``/``values`` drop the buffers they no longer view, so the
    # old ones are not kept alive next to the new tensors until the next append.
    def reset(self) -> None:
        self.release_storage()
        super().reset()  # type: ignore[misc]

    def offload(self) -> None:
        self.release_storage()
        super().offload()  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        self.release_storage()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        self.release_storage()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # type: ignore[misc]
        self.release_storage()


class QuantizingLayerMixin:
    """Passes new states through ``self.quantizer`` before the base layer stores them.

    ``quantizer`` is set by the cache that owns the layer; ``None`` (or a disabled
    quantizer) leaves the layer a plain one. Full-attention layers tell the quantizer
    where the new tokens start, so it keeps the config's sink tokens in full precision;
    sliding-window layers (``keeps_sinks = False``) evict those tokens anyway.
    """

    quantizer: LayerQuantizer | None = None
    keeps_sinks = True

    def _position(self) -> int:
        """Position of the next new token in its sequence: the tokens this layer has seen."""
        return int(self.get_seq_length())  # type: ignore[attr-defined]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_states``/``value_states`` are the new ``(batch, kv_heads, new_tokens, head_dim)`` states."""
        if self.quantizer is not None:
            key_states, value_states = self.quantizer.process(
                key_states, value_states, self._position(), keeps_sinks=self.keeps_sinks
            )
        result: tuple[torch.Tensor, torch.Tensor] = super().update(  # type: ignore[misc]
            key_states, value_states, *args, **kwargs
        )
        return result


class PackingLayerMixin(QuantizingLayerMixin):
    """Once frozen, stores packed ``uint8`` rows (codes + any per-token parameters) instead of states.

    The base layer keeps the rows in ``keys``/``values`` (``(batch, kv_heads, seq,
    row_bytes)``, see :mod:`quantcache.packing`) and does its own appending, window
    trimming, cropping and reordering on them; this mixin encodes the new states
    before and decodes what the base layer returns after. Each token is quantized once,
    when written. While calibrating it behaves like :class:`QuantizingLayerMixin`.
    A layer still holding states stored while calibrating refuses frozen updates (fake
    storage would keep those states unquantized, packed storage cannot): continue with
    an :meth:`~quantcache.cache.QuantizedCalibratingCache.empty_copy`.
    """

    states_dtype: torch.dtype | None = None  # the model dtype the rows decode to
    # The sink tokens' own full-precision (keys, values), each (batch, kv_heads, sinks, head_dim): their rows
    # hold codes too, so the layer's length and the base class's cropping and reordering stay as they are.
    _sinks: tuple[torch.Tensor, torch.Tensor] | None = None

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
        keys: torch.Tensor | None = getattr(self, "keys", None)
        if keys is not None and keys.numel() and keys.dtype != torch.uint8:
            raise CalibrationError(
                f"layer {quantizer.index} ({quantizer.name}) still holds the states it stored while calibrating; "
                "a packed cache starts empty: continue with cache.empty_copy() after freeze()"
            )
        self.states_dtype = key_states.dtype
        start = self._position()
        sinks = quantizer.sinks_among(key_states.shape[2], start, keeps_sinks=self.keeps_sinks)
        if sinks:
            self._keep_sinks(key_states[:, :, :sinks], value_states[:, :, :sinks], start)
        key_rows = self._encode(quantizer.key, quantizer.keys_before_rope(key_states, start), sinks)
        value_rows = self._encode(quantizer.value, value_states, sinks)
        stored_keys, stored_values = super(QuantizingLayerMixin, self).update(  # type: ignore[misc]
            key_rows, value_rows, *args, **kwargs
        )
        keys = quantizer.key.decode(stored_keys, key_states.dtype)
        # The rows returned end with the newest token: they start that many positions before the end.
        keys = quantizer.keys_after_rope(keys, self._position() - keys.shape[2])
        values = quantizer.value.decode(stored_values, value_states.dtype)
        if self._sinks is not None:
            held = min(self._sinks[0].shape[2], keys.shape[2])
            keys[:, :, :held] = self._sinks[0][:, :, :held].to(keys.device)
            values[:, :, :held] = self._sinks[1][:, :, :held].to(values.device)
        return keys, values

    @staticmethod
    def _encode(stream: Any, states: torch.Tensor, sinks: int) -> torch.Tensor:
        """Packed rows of ``states``; the first ``sinks`` are placeholders (their states are kept apart)."""
        if not sinks:
            return stream.encode(states)  # type: ignore[no-any-return]
        placeholder = stream.encode(states[:, :, :sinks], notify=False)
        if sinks == states.shape[2]:
            return placeholder  # type: ignore[no-any-return]
        return torch.cat([placeholder, stream.encode(states[:, :, sinks:])], dim=2)

    def _keep_sinks(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        if start == 0 or self._sinks is None:
            self._sinks = (keys.clone(), values.clone())
        else:
            self._sinks = (
                torch.cat([self._sinks[0][:, :, :start], keys], dim=2),
                torch.cat([self._sinks[1][:, :, :start], values], dim=2),
            )

    def _map_sinks(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``change`` to both sink tensors, when there are any."""
        if self._sinks is not None:
            self._sinks = (change(self._sinks[0]), change(self._sinks[1]))

    def sink_bytes(self) -> int:
        """Bytes of the sink tokens' full-precision states."""
        return 0 if self._sinks is None else sum(t.numel() * t.element_size() for t in self._sinks)

    # The sink states follow every operation that changes the base class's batch or length.
    def reset(self) -> None:
        self._sinks = None
        super().reset()  # type: ignore[misc]

    def crop(self, max_length: int) -> None:
        super().crop(max_length)  # type: ignore[misc]
        keys = getattr(self, "keys", None)
        if keys is not None:
            held = int(keys.shape[-2]) if keys.numel() else 0
            self._map_sinks(lambda sink: sink[:, :, :held])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        self._map_sinks(lambda sink: sink[beam_idx.to(sink.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        self._map_sinks(lambda sink: sink.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # type: ignore[misc]
        self._map_sinks(lambda sink: sink[indices, ...])


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


def quantizing_layer(template: Any, quantizer: LayerQuantizer, *, packed: bool = False) -> Any:
    """A new, empty quantizing (``packed``: packing) layer of the same kind as ``template``, or ``template``.

    Layer kinds with no quantizing counterpart (layers that share another layer's KV,
    linear-attention states ...) are returned unchanged; the caller disables their
    quantizer.
    """
    layer: QuantizingLayerMixin
    if type(template) is DynamicSlidingWindowLayer:
        sliding = PackedSlidingWindowLayer if packed else QuantizedSlidingWindowLayer
        layer = sliding(sliding_window=template.sliding_window)
    elif type(template) is DynamicLayer:
        layer = PackedDynamicLayer() if packed else QuantizedDynamicLayer()  # type: ignore[no-untyped-call]
    else:
        return template
    layer.quantizer = quantizer
    return layer


def layer_memory(layer: Any) -> dict[str, int]:
    """Bytes one cache layer holds: ``codes``, ``parameters`` (per-token parameters and row flags,
    plus the quantizer's fixed scales and zero points or centers), ``full_precision`` (states kept in the
    model dtype), ``reserved`` (room allocated for tokens still to come, see
    :class:`GrowingStorage`), and ``dynamic_cache`` (what a ``DynamicCache`` would hold for
    the same tokens).
    """
    keys: torch.Tensor | None = getattr(layer, "keys", None)
    values: torch.Tensor | None = getattr(layer, "values", None)
    report = {"codes": 0, "parameters": 0, "full_precision": 0, "reserved": 0, "dynamic_cache": 0}
    if isinstance(layer, GrowingLayerMixin):
        report["reserved"] = layer.reserved_bytes()
    if isinstance(layer, PackingLayerMixin):
        report["full_precision"] += layer.sink_bytes()
    quantizer: LayerQuantizer | None = getattr(layer, "quantizer", None)
    if quantizer is not None and quantizer.enabled:
        for _, stream in quantizer.streams:
            if stream.params is not None:  # a symmetric or float8 zero point is all zeros: decoding never reads it
                needed = [stream.params.scale]
                if not stream.args.symmetric and stream.format.kind is FormatKind.INTEGER:
                    needed.append(stream.params.zero_point)
                report["parameters"] += sum(t.numel() * t.element_size() for t in needed)
            if stream.center is not None:  # a centred dynamic stream's calibrated mean
                report["parameters"] += stream.center.numel() * stream.center.element_size()
    for stored, stream_name in ((keys, "key"), (values, "value")):
        if stored is None or not stored.numel():
            continue
        if stored.dtype == torch.uint8 and quantizer is not None:
            stream = quantizer.key if stream_name == "key" else quantizer.value
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
