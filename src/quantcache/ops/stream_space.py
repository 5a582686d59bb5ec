"""The map between a stream's states and the space it is quantized in: centred, scaled, rotated.

A dynamic stream may subtract a calibrated mean per channel (``center``), scale each
channel (``channel_scale``, query-aware keys) and rotate every head's vector
(``rotation``) before quantizing; reading back undoes them in reverse order, so what the
cache returns is in the model's own space. Each step is optional; with none the map is
the identity and states keep their dtype.

Query-aware rounding (:mod:`quantcache.ops.rounding`) weighs an error in this space by the
queries of the model's space: the space also holds the calibrated query model
(``query_diag``, ``query_factor``) and, from the cache, the RoPE frequencies, and makes
the feedback matrix from them once per device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantcache.ops.rope import CenterPairs
from quantcache.ops.rotation import rotate, rotation_matrix, unrotate
from quantcache.ops.rounding import (
    QueryModel,
    RowGrid,
    feedback_matrix,
    rope_averaged_moment,
    round_with_feedback,
    rounding_order,
)

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
        self.query_model: QueryModel | None = None  # (diag, factor), see rounding.py
        self.rope_frequencies: torch.Tensor | None = None  # the layer's RoPE inv_freq (keys centred before RoPE)
        self.center_turns = False
        """The center is turned to each key's position by the layer (``rope_center``), not applied here."""
        self._by_device: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._feedback_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._center_pairs_by_device: dict[torch.device, CenterPairs] = {}

    @property
    def identity(self) -> bool:
        return self.rotation is None and self.applied_center is None and self.channel_scale is None

    @property
    def applied_center(self) -> torch.Tensor | None:
        """The center :meth:`forward` subtracts: ``center``, unless the layer turns it (:attr:`center_turns`)."""
        return None if self.center_turns else self.center

    def set(
        self,
        center: torch.Tensor | None,
        channel_scale: torch.Tensor | None = None,
        query_model: QueryModel | None = None,
    ) -> None:
        """Fix (or, with ``None``, drop) the center, channel scale and query model."""
        self.center = None if center is None else center.detach().to(torch.float32)
        self.channel_scale = None if channel_scale is None else channel_scale.detach().to(torch.float32)
        if query_model is not None:
            query_model = (query_model[0].detach().to(torch.float32), query_model[1].detach().to(torch.float32))
        self.query_model = query_model
        self._by_device = {}
        self._feedback_by_device = {}
        self._center_pairs_by_device = {}

    def copy(self) -> StreamSpace:
        fresh = StreamSpace()
        fresh.rotation = self.rotation
        fresh.rope_frequencies = self.rope_frequencies
        fresh.center_turns = self.center_turns
        fresh.set(self.center, self.channel_scale, self.query_model)
        return fresh

    def feedback_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Query-aware rounding's ``(kv_heads, head_dim, head_dim)`` feedback matrix and ``(kv_heads, head_dim)``
        order of the coordinates (:func:`~quantcache.ops.rounding.rounding_order`), on ``device``.

        The logit-error weight of the model's space (:func:`~quantcache.ops.rounding.rope_averaged_moment`)
        seen in this one: an error ``e`` here is ``e L`` there, with ``L`` the rotation undone
        and divided by the channel scales, so ``H = L M L^T``.
        """
        found = self._feedback_by_device.get(device)
        if found is None:
            if self.query_model is None or self.rope_frequencies is None or self.channel_scale is None:
                raise ValueError("query-aware rounding needs the query model, channel scales and RoPE frequencies")
            moment = rope_averaged_moment(*self.query_model, self.rope_frequencies, turned=self.center_turns)
            rotation = self.rotation  # unrotate(e) = e @ rotation
            undone = torch.eye(moment.shape[-1], dtype=torch.float64) if rotation is None else rotation.double().cpu()
            back = undone[None] / self.channel_scale.double().cpu()[:, None, :]
            weight = back @ moment.cpu() @ back.transpose(-1, -2)
            found = (feedback_matrix(weight).to(device), rounding_order(weight).to(device))
            self._feedback_by_device[device] = found
        return found

    def center_pairs(self, pairs: int, device: torch.device) -> CenterPairs:
        """The center arranged by its ``pairs`` RoPE pairs (:class:`~quantcache.ops.rope.CenterPairs`), on ``device``
        (made once per device): what attention from codes reads for keys stored around a turned center."""
        if self.center is None:
            raise ValueError("the stream has no center to turn")
        found = self._center_pairs_by_device.get(device)
        if found is None:
            found = self._center_pairs_by_device[device] = CenterPairs.of(self.center.to(device), pairs)
        return found

    def ready_on(self, device: torch.device) -> None:
        """Make on ``device`` now what :meth:`forward`, :meth:`inverse` and query-aware rounding read, so that no
        later call makes it: a compiled graph whose first call made one is guarded on its absence, and would compile
        again on the next call."""
        self._affine_on(device)
        self._rotation_on(device)
        if self.query_model is not None and self.rope_frequencies is not None and self.channel_scale is not None:
            self.feedback_on(device)

    def derived_tensors(self, *, reads_codes: bool) -> list[torch.Tensor]:
        """The tensors made so far from the stored parameters, one set per device, which a memory count includes:
        query-aware rounding's feedback matrices, and for a cache that ``reads_codes``, the center by RoPE pairs."""
        pairs = [found.halves for found in self._center_pairs_by_device.values()]  # ``rest`` is the center's own
        feedback = [tensor for both in self._feedback_by_device.values() for tensor in both]
        return [*feedback, *(pairs if reads_codes else ())]

    def with_feedback(
        self, space: torch.Tensor, round_trip: Callable[[torch.Tensor], torch.Tensor] | RowGrid
    ) -> torch.Tensor:
        """``space`` moved for query-aware rounding with ``round_trip`` (as is without a query model)."""
        if self.query_model is None:
            return space
        matrix, order = self.feedback_on(space.device)
        return round_with_feedback(space, round_trip, matrix, order=order)

    def _affine_on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """Applied center and scale as ``(1, kv_heads, 1, head_dim)`` float32 on ``device`` (``None``: neither)."""
        center = self.applied_center
        if center is None and self.channel_scale is None:
            return None
        found = self._by_device.get(device)
        if found is None:
            shift = None if center is None else center.to(device)[None, :, None]
            scale = None if self.channel_scale is None else self.channel_scale.to(device)[None, :, None]
            found = self._by_device[device] = (shift, scale)
        return found

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """The states the quantizer works on: centred, scaled and rotated (float32) as configured, else as is."""
        affine = self._affine_on(states.device)
        if affine is not None:
            center, scale = affine
            states = states.float()
            if center is not None:
                states = states - center
            if scale is not None:
                states = states * scale
        rotation = self._rotation_on(states.device)
        return states if rotation is None else rotate(states, rotation)

    def _rotation_on(self, device: torch.device) -> torch.Tensor | None:
        """The rotation (``None``: none), moved to ``device`` once, not every call."""
        if self.rotation is not None and self.rotation.device != device:
            self.rotation = self.rotation.to(device)
        return self.rotation

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
            if center is not None:
                quantized = quantized + center
        return quantized.to(dtype)
