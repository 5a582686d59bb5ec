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

from .quantizer import LayerQuantizer

__all__ = ["QuantizedDynamicLayer", "QuantizedSlidingWindowLayer", "QuantizingLayerMixin", "quantizing_layer"]


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


class QuantizedDynamicLayer(QuantizingLayerMixin, DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` whose new states are quantized (or observed) before they are stored."""


class QuantizedSlidingWindowLayer(QuantizingLayerMixin, DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` whose new states are quantized (or observed) before they are stored."""


def quantizing_layer(template: Any, quantizer: LayerQuantizer) -> Any:
    """A new, empty quantizing layer of the same kind as ``template``, or ``template`` itself.

    Layer kinds with no quantizing counterpart (layers that share another layer's KV,
    linear-attention states ...) are returned unchanged; the caller disables their
    quantizer.
    """
    layer: QuantizingLayerMixin
    if type(template) is DynamicSlidingWindowLayer:
        layer = QuantizedSlidingWindowLayer(sliding_window=template.sliding_window)
    elif type(template) is DynamicLayer:
        layer = QuantizedDynamicLayer()  # type: ignore[no-untyped-call]
    else:
        return template
    layer.quantizer = quantizer
    return layer
