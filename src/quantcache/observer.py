"""One object per layer: the calibration statistics and frozen parameters of its K and V.

A :class:`TensorQuantizer` owns one stream (the keys or the values of one attention
layer): a running per-channel min/max while calibrating, fixed parameters once frozen.
A :class:`LayerQuantizer` pairs the two streams of one layer and knows its name, so
every error it raises says which layer is at fault. The cache only dispatches to them.
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import CalibrationError
from .quantization import QuantParams, channel_minmax, compute_qparams, fake_quantize

__all__ = ["CalibrationError", "LayerQuantizer", "TensorQuantizer"]

StreamName = Literal["key", "value"]


class TensorQuantizer:
    """Running min/max and fixed INT8 parameters for one ``(batch, kv_heads, seq, head_dim)`` stream.

    Statistics are float32 tensors of shape ``(kv_heads, head_dim)`` on the device of
    the first states observed. They accumulate over every token of every update
    (prefill and decode, every batch and call); ``reset`` clears them.
    """

    def __init__(self, label: str, expected_shape: tuple[int, int] | None = None) -> None:
        self.label = label
        self.expected_shape = expected_shape
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.params: QuantParams | None = None
        self._params_by_device: dict[torch.device, QuantParams] = {}

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(kv_heads, head_dim)``: of what was observed or loaded, else what the model config declares."""
        reference = self.min if self.min is not None else (self.params.scale if self.params else None)
        if reference is None:
            return self.expected_shape
        return int(reference.shape[0]), int(reference.shape[1])

    def _check_shape(self, states: torch.Tensor) -> None:
        expected = self.shape
        got = (int(states.shape[1]), int(states.shape[3])) if states.dim() == 4 else tuple(states.shape)
        if states.dim() != 4 or (expected is not None and got != expected):
            raise CalibrationError(
                f"{self.label}: states of shape {tuple(states.shape)} do not fit this layer's "
                f"(kv_heads, head_dim) = {expected}; the cache was built or calibrated for another model shape"
            )

    @torch.no_grad()
    def measure(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel min/max of ``states`` after validation, without touching the statistics."""
        if states.numel() == 0:
            return None
        self._check_shape(states)
        low, high = channel_minmax(states)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise CalibrationError(
                f"{self.label}: calibration states contain NaN or Inf; check the model's dtype "
                "(fp16 overflow is common: try bfloat16 or float32) or exclude this layer"
            )
        return low, high

    def merge(self, measured: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Fold a :meth:`measure` result into the running statistics."""
        if measured is None:
            return
        low, high = measured
        if self.min is None or self.max is None:
            self.min, self.max = low, high
        else:
            self.min = torch.minimum(self.min, low.to(self.min.device))
            self.max = torch.maximum(self.max, high.to(self.max.device))

    def observe(self, states: torch.Tensor) -> None:
        """Fold the per-channel min/max of ``states`` into the running statistics."""
        self.merge(self.measure(states))

    def freeze(self, *, symmetric: bool) -> None:
        """Turn the statistics into fixed parameters."""
        if self.min is None or self.max is None:
            raise CalibrationError(f"{self.label}: no calibration statistics")
        self.set_params(compute_qparams(self.min, self.max, symmetric=symmetric))

    def set_params(self, params: QuantParams | None) -> None:
        self.params = params
        self._params_by_device = {}

    def reset(self) -> None:
        """Forget statistics and parameters."""
        self.min = self.max = None
        self.set_params(None)

    @torch.no_grad()
    def fake_quantize(self, states: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``states`` with the frozen parameters (new tokens only)."""
        if self.params is None:
            raise CalibrationError(f"{self.label}: not frozen")
        self._check_shape(states)
        params = self._params_by_device.get(states.device)
        if params is None:
            params = QuantParams(*(tensor.to(states.device) for tensor in self.params))
            self._params_by_device[states.device] = params
        return fake_quantize(states, params)


class LayerQuantizer:
    """The key and value quantizers of one attention layer.

    ``enabled`` is False for layers that the config's include/exclude leaves out:
    those pass through untouched and collect nothing.
    """

    def __init__(
        self, index: int, name: str, *, enabled: bool, expected_shape: tuple[int, int] | None = None
    ) -> None:
        self.index = index
        self.name = name
        self.enabled = enabled
        self.key = TensorQuantizer(f"layer {index} ({name}) keys", expected_shape)
        self.value = TensorQuantizer(f"layer {index} ({name}) values", expected_shape)

    @property
    def streams(self) -> tuple[tuple[StreamName, TensorQuantizer], ...]:
        return (("key", self.key), ("value", self.value))

    @property
    def observed(self) -> bool:
        return self.key.min is not None and self.value.min is not None

    @property
    def frozen(self) -> bool:
        return self.key.params is not None and self.value.params is not None

    def observe(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Validate both streams before changing either: a failed update leaves no half-update.
        key_range, value_range = self.key.measure(key_states), self.value.measure(value_states)
        self.key.merge(key_range)
        self.value.merge(value_range)

    def freeze(self, *, symmetric: bool) -> None:
        self.key.freeze(symmetric=symmetric)
        self.value.freeze(symmetric=symmetric)

    def fake_quantize(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key.fake_quantize(key_states), self.value.fake_quantize(value_states)

    def reset(self) -> None:
        self.key.reset()
        self.value.reset()

    def unfreeze(self) -> None:
        self.key.set_params(None)
        self.value.set_params(None)
