"""Quantization math: small pure tensor functions, written once.

Shapes: key/value states arrive as ``(batch, kv_heads, seq, head_dim)``. Per-channel
parameters have shape ``(kv_heads, head_dim)``: one per column of
``states.transpose(1, 2).reshape(-1, kv_heads * head_dim)``, which is msModelSlim's
``per_channel`` layout. All arithmetic is done in float32 whatever the model dtype,
so fp16/bf16 models get the same parameters as fp32 ones; results come back in the
input dtype.

The formulas (INT8, ``qmin = -128``, ``qmax = 127``):

* symmetric: ``min := min(min, 0)``, ``max := max(max, 0)``,
  ``scale = max(-min, max) / 127`` floored at float32 eps, ``zero_point = 0``;
* asymmetric: ``scale = (max - min) / 255`` (same floor, and at least ``max(|min|, |max|) / 2**20``
  so that a constant channel far from zero keeps an exact, finite zero point),
  ``zero_point = round(-min / scale) - 128``;
* quantize: ``q = clamp(round(x / scale + zero_point), -128, 127)``;
* dequantize: ``(q - zero_point) * scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "INT8_MAX",
    "INT8_MIN",
    "QuantParams",
    "channel_minmax",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
]

INT8_MIN = -128
INT8_MAX = 127
_EPS = torch.finfo(torch.float32).eps
# Largest |x / scale| an asymmetric scale allows: float32 still resolves 1/8 of a step there.
_ASYMMETRIC_MAX_OFFSET = float(2**20)


class QuantParams(NamedTuple):
    """Fixed per-channel quantization parameters, each ``(kv_heads, head_dim)``.

    ``scale`` is float32; ``zero_point`` holds integers as int32 (an asymmetric
    channel whose whole range lies far from zero can need a zero point outside int8).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor


def channel_minmax(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of ``(batch, kv_heads, seq, head_dim)`` states.

    Returns two float32 tensors of shape ``(kv_heads, head_dim)``. The reduction runs
    in the input dtype (a min or max is one of its inputs, so this is exact) and only
    the small result is converted.
    """
    if states.dim() != 4:
        raise ValueError(f"expected states of shape (batch, kv_heads, seq, head_dim), got {tuple(states.shape)}")
    if states.shape[0] == 0 or states.shape[2] == 0:
        raise ValueError("cannot take min/max over an empty batch or sequence")
    detached = states.detach()
    return detached.amin(dim=(0, 2)).float(), detached.amax(dim=(0, 2)).float()


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, *, symmetric: bool) -> QuantParams:
    """Turn a calibrated range into INT8 parameters (see the module docstring)."""
    min_val = min_val.float()
    max_val = max_val.float()
    if symmetric:
        min_neg = torch.clamp(min_val, max=0.0)
        max_pos = torch.clamp(max_val, min=0.0)
        scale = torch.clamp(torch.maximum(-min_neg, max_pos) / float(INT8_MAX), min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        # The relative floor only matters for a (near-)constant channel far from zero: there the
        # eps floor alone would make ``-min / scale`` overflow int32 and float32 precision.
        magnitude = torch.maximum(min_val.abs(), max_val.abs())
        floor = torch.clamp(magnitude / _ASYMMETRIC_MAX_OFFSET, min=_EPS)
        scale = torch.maximum((max_val - min_val) / float(INT8_MAX - INT8_MIN), floor)
        zero_point = (torch.round(-min_val / scale) + INT8_MIN).to(torch.int32)
    return QuantParams(scale, zero_point)


def _broadcastable(param: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``(kv_heads, head_dim)`` -> ``(kv_heads, 1, head_dim)`` on the states' device."""
    return param.to(device=states.device, dtype=torch.float32).unsqueeze(-2)


def quantize(states: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """``(batch, kv_heads, seq, head_dim)`` float states -> int8 codes of the same shape."""
    scale = _broadcastable(params.scale, states)
    zero_point = _broadcastable(params.zero_point, states)
    codes = torch.round(states.float() / scale + zero_point)
    return torch.clamp(codes, INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize(codes: torch.Tensor, params: QuantParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 codes -> float states ``(codes - zero_point) * scale`` in ``dtype``."""
    scale = _broadcastable(params.scale, codes)
    zero_point = _broadcastable(params.zero_point, codes)
    return ((codes.float() - zero_point) * scale).to(dtype)


def fake_quantize(states: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Quantize then dequantize, returning the states' dtype: what an INT8 cache would give back."""
    return dequantize(quantize(states, params), params, states.dtype)
