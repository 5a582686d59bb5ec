"""Storage: the cache layer classes a quantized cache is made of.

Transformers keeps one layer object per attention layer (``CacheLayerMixin`` ->
``DynamicLayer`` -> ``DynamicSlidingWindowLayer`` ...) and the container only
dispatches to them. Quantization joins that pattern as a mixin: the layer hands each
update's new states to its :class:`~quantcache.quantizer.LayerQuantizer` first
(observe while calibrating, quantize once frozen), then stores what comes back with
its base class's own logic, so sliding windows, cropping, beam reordering and batch
expansion stay exactly Transformers'. A storage that keeps codes instead of
dequantized states is one more class here.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .errors import CalibrationError
from .formats import FormatKind
from .quantizer import LayerQuantizer

__all__ = [
    "PackedDynamicLayer",
    "PackedSlidingWindowLayer",
    "PackingLayerMixin",
    "QuantizedDynamicLayer", "QuantizedSlidingWindowLayer", "QuantizingLayerMixin", "layer_memory", "quantizing_layer"]


class QuantizingLayerMixin:
    """Passes new states through ``self.quantizer`` before the base layer stores them.

    ``quantizer`` is set by the cache that owns the layer; ``None`` (or a disabled
    quantizer) leaves the layer a plain one.
    """

    quantizer: LayerQuantizer | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_states``/``value_states`` are the new ``(batch, kv_heads, new_tokens, head_dim)`` states."""
        if self.quantizer is not None:
            key_states, value_states = self.quantizer.process(key_states, value_states)
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
        key_rows = quantizer.key.encode(key_states)
        value_rows = quantizer.value.encode(value_states)
        stored_keys, stored_values = super(QuantizingLayerMixin, self).update(  # type: ignore[misc]
            key_rows, value_rows, *args, **kwargs
        )
        return (
            quantizer.key.decode(stored_keys, key_states.dtype),
            quantizer.value.decode(stored_values, value_states.dtype),
        )


class QuantizedDynamicLayer(QuantizingLayerMixin, DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` whose new states are quantized (or observed) before they are stored."""


class QuantizedSlidingWindowLayer(QuantizingLayerMixin, DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` whose new states are quantized (or observed) before they are stored."""


class PackedDynamicLayer(PackingLayerMixin, DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` that stores packed codes once frozen."""


class PackedSlidingWindowLayer(PackingLayerMixin, DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` that stores packed codes once frozen."""


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
    plus the quantizer's fixed scales and zero points), ``full_precision`` (states kept in the
    model dtype), and ``dynamic_cache`` (what a ``DynamicCache`` would hold for the same tokens).
    """
    keys: torch.Tensor | None = getattr(layer, "keys", None)
    values: torch.Tensor | None = getattr(layer, "values", None)
    report = {"codes": 0, "parameters": 0, "full_precision": 0, "dynamic_cache": 0}
    quantizer: LayerQuantizer | None = getattr(layer, "quantizer", None)
    if quantizer is not None and quantizer.enabled:
        for _, stream in quantizer.streams:
            if stream.params is not None:  # a symmetric or float8 zero point is all zeros: decoding never reads it
                needed = [stream.params.scale]
                if not stream.args.symmetric and stream.format.kind is FormatKind.INTEGER:
                    needed.append(stream.params.zero_point)
                report["parameters"] += sum(t.numel() * t.element_size() for t in needed)
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
