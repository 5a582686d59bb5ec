"""Appending into reserved room: the storage under the non-sliding cache layers.

``DynamicLayer`` concatenates the whole history with each new token
(``torch.cat``), which copies every stored byte at every decode step. The non-sliding
quantizing layers append into room reserved ahead (:class:`GrowingStorage`): a decode step
copies only its new tokens, and the reserved room is 1/:data:`ROOM_FRACTION` of the
tokens held (at least :data:`MIN_ROOM_TOKENS`), reported by ``memory_report`` as
``reserved``.
What ``update`` returns is a view of the filled part; a tensor returned earlier is
never written again (after a crop, the next append moves to a fresh buffer). Under
``torch.compile`` a step concatenates instead, as ``DynamicLayer`` does, and reserves nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["MIN_ROOM_TOKENS", "ROOM_FRACTION", "GrowingLayerMixin", "GrowingStorage"]


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

    __slots__ = ("buffer", "filled", "view")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.filled = 0
        self.view: torch.Tensor | None = None
        """The tensor the last append returned: the layer still holds the history there if it holds this object."""

    def _holds(self, stored: torch.Tensor) -> bool:
        # Identity, not data pointers: a layer that replaced its tensor (crop, reorder, offload) holds another object
        # and moves to a new buffer. A buffer made under ``torch.inference_mode`` cannot be written outside it.
        buffer = self.buffer
        return (
            buffer is not None
            and stored is self.view
            and stored.shape[-2] == self.filled
            and (not buffer.is_inference() or torch.is_inference_mode_enabled())
        )

    def append(self, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``stored`` (the layer's current history, possibly empty) followed by ``new``, as a view (compiled: a new
        tensor)."""
        if torch.compiler.is_compiling():
            # A compiled step concatenates, as ``DynamicLayer`` does. Writing into the buffer would make the
            # buffer and the layer's view of it inputs of one graph that mutates one of them; with the cache
            # length dynamic, torch 2.13 then builds guards and code from the size of the view's base, which it
            # never bound (inductor fails at run time), or cannot rebuild the base at all where the view was made
            # under ``torch.inference_mode``. Concatenating copies the history each step (packed rows: 0.15-0.53x
            # the bytes a bf16 ``DynamicCache`` copies).
            self.release()
            return torch.cat([stored, new], dim=-2) if stored.numel() else new
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
        self.view = buffer[:, :, : self.filled]
        return self.view

    def reserved_bytes(self, stored: torch.Tensor | None) -> int:
        """Bytes of the buffer beyond ``stored`` (0 when ``stored`` is not a view of it)."""
        buffer = self.buffer
        if buffer is None or stored is None or stored is not self.view:
            return 0
        return (buffer.numel() - stored.numel()) * buffer.element_size()

    def release(self) -> None:
        self.buffer, self.filled, self.view = None, 0, None


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
