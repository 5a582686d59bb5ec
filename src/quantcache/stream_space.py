"""The map between a stream's states and the space it is quantized in: centred, scaled, rotated.

A dynamic stream may subtract a calibrated mean per channel (``center``), scale each
channel (``channel_scale``, query-aware keys) and rotate every head's vector
(``rotation``) before quantizing; reading back undoes them in reverse order, so what the
cache returns is in the model's own space. Each step is optional; with none the map is
the identity and states keep their dtype.
"""

from __future__ import annotations

import torch

from .rotation import rotate, rotation_matrix, unrotate

__all__ = ["StreamSpace"]


class StreamSpace:
    """``forward``: ``(batch, kv_heads, seq, head_dim)`` states to the quantizer's float32 space; ``inverse`` back.

    ``center`` and ``channel_scale`` are ``(kv_heads, head_dim)`` float32 (or None), set
    together by :meth:`set` when the stream freezes; the rotation is fixed at creation.
    """

    def __init__(self, head_dim: int | None = None, rotation_seed: int | None = None) -> None:
        self.rotation = None if rotation_seed is None or head_dim is None else rotation_matrix(head_dim, rotation_seed)
        self.center: torch.Tensor | None = None
        self.channel_scale: torch.Tensor | None = None
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def identity(self) -> bool:
        return self.rotation is None and self.center is None

    def set(self, center: torch.Tensor | None, channel_scale: torch.Tensor | None = None) -> None:
        """Fix (or, with ``None``, drop) the center and channel scale."""
        self.center = None if center is None else center.detach().to(torch.float32)
        self.channel_scale = None if channel_scale is None else channel_scale.detach().to(torch.float32)
        self._by_device = {}

    def copy(self) -> StreamSpace:
        fresh = StreamSpace()
        fresh.rotation = self.rotation
        fresh.set(self.center, self.channel_scale)
        return fresh

    def _affine_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Center and scale as ``(1, kv_heads, 1, head_dim)`` float32 on ``device``, made once per device."""
        if self.center is None:
            return None
        found = self._by_device.get(device)
        if found is None:
            center = self.center.to(device)[None, :, None]
            scale = None if self.channel_scale is None else self.channel_scale.to(device)[None, :, None]
            found = self._by_device[device] = (center, scale)
        return found

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """The states the quantizer works on: centred, scaled and rotated (float32) as configured, else as is."""
        affine = self._affine_on(states.device)
        if affine is not None:
            center, scale = affine
            states = states.float() - center
            if scale is not None:
                states = states * scale
        if self.rotation is None:
            return states
        if self.rotation.device != states.device:
            self.rotation = self.rotation.to(states.device)
        return rotate(states, self.rotation)

    def inverse(self, quantized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`forward` undone, in ``dtype``."""
        if self.rotation is not None:
            quantized = unrotate(quantized, self.rotation)
        affine = self._affine_on(quantized.device)
        if affine is not None:
            center, scale = affine
            quantized = quantized.float()
            if scale is not None:
                quantized = quantized / scale
            quantized = quantized + center
        return quantized.to(dtype)
