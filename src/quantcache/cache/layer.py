"""The key and value quantizers of one attention layer: what a cache layer calls.

A :class:`LayerQuantizer` pairs the two :class:`~quantcache.cache.stream.StreamQuantizer`
of one layer and knows its name, so every error it raises says which layer is at fault.
Cache layers only call :meth:`LayerQuantizer.process`.

It holds calibration state only, never a conversation's: one :class:`~quantcache.cache.kv_quantizer.KVQuantizer`
serves many caches, so what belongs to one conversation (its padding mask, an evaluation hook) comes in
as arguments. Merging a batch's statistics takes a lock, so caches calibrating in threads add up; frozen
quantization reads only.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch

from quantcache.cache.stream import QuantizeHook, StreamName, StreamQuantizer
from quantcache.errors import CalibrationError
from quantcache.ops.rope import RopeTable
from quantcache.scheme.args import QuantArgs

__all__ = ["LayerQuantizer"]


class LayerQuantizer:
    """The key and value quantizers of one attention layer.

    ``enabled`` is False for layers that the config's include/exclude leaves out (and
    for layers that store no KV of their own): those pass through untouched and
    collect nothing. With :attr:`key_rope` set, keys are observed as they were before RoPE;
    they are quantized there and turned back after (``pre_rope_keys``), or, with
    :attr:`rope_center`, quantized after RoPE less their center turned to each position.
    """

    def __init__(
        self,
        index: int,
        name: str,
        *,
        enabled: bool,
        expected_shape: tuple[int, int] | None = None,
        key_args: QuantArgs | None = None,
        value_args: QuantArgs | None = None,
    ) -> None:
        self.index = index
        self.name = name
        self.enabled = enabled
        self.sink_tokens = 0  # the first tokens of a sequence, kept in full precision (the cache sets it)
        self.residual_window = 0  # the newest tokens, read back in full precision (the cache sets it)
        self.residual_block = 1  # tokens that leave the window together (the cache sets it)
        self.sink_only_updates = 0  # calibrating updates whose every token was a sink (so nothing was observed)
        self.key_rope: RopeTable | None = None  # the layer's RoPE angles, when keys are centred before RoPE
        self.rope_center = False  # keys stored after RoPE around the turned center (rope_center), else before it
        self.key = StreamQuantizer(f"layer {index} ({name}) keys", key_args, expected_shape)
        self.value = StreamQuantizer(f"layer {index} ({name}) values", value_args, expected_shape)
        self._merging = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerQuantizer:
        """An independent copy (statistics and parameters copied; the RoPE table, which never changes, shared)."""
        fresh = copy.copy(self)
        fresh.key = copy.deepcopy(self.key, memo)
        fresh.value = copy.deepcopy(self.value, memo)
        fresh._merging = threading.Lock()
        return fresh

    def sharing_streams(self, *, enabled: bool) -> LayerQuantizer:
        """A copy with its own ``enabled`` flag that shares these streams (their statistics and parameters)."""
        fresh = copy.copy(self)
        fresh.enabled = enabled
        return fresh

    @property
    def streams(self) -> tuple[tuple[StreamName, StreamQuantizer], ...]:
        return (("key", self.key), ("value", self.value))

    def stream(self, name: str) -> StreamQuantizer:
        """The ``"key"`` or ``"value"`` stream."""
        return self.key if name == "key" else self.value

    @property
    def observed(self) -> bool:
        return self.key.observed and self.value.observed

    @property
    def frozen(self) -> bool:
        return self.key.frozen and self.value.frozen

    def observe(self, key_states: torch.Tensor, value_states: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold new states into the statistics, leaving out the ``(batch, new_tokens)`` positions ``mask`` clears.

        Both streams are measured (and validated) before either changes: a failed update leaves no half-update.
        """
        key_stats, value_stats = self.key.measure(key_states, mask), self.value.measure(value_states, mask)
        with self._merging:
            self.key.merge(key_stats)
            self.value.merge(value_stats)

    def _mask_for(self, states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """The columns of the conversation's ``(batch, seq)`` ``token_mask`` for the newest positions of ``states``."""
        new = states.shape[2]
        if token_mask.shape[0] != states.shape[0] or token_mask.shape[1] < new:
            raise CalibrationError(
                f"layer {self.index} ({self.name}): the attention mask set with set_attention_mask has shape "
                f"{tuple(token_mask.shape)}, which does not cover states of shape {tuple(states.shape)}"
            )
        return token_mask[:, -new:]

    @property
    def observes_queries(self) -> bool:
        """Whether calibration must show this layer its queries: it is quantized and its keys are query-aware."""
        return self.enabled and self.key.args.query_aware

    def observe_queries(self, query_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Fold ``(batch, heads, seq, head_dim)`` queries into a query-aware key stream's statistics.

        Pad positions (``token_mask``) are left out. A layer that does not
        :attr:`observes_queries` ignores them.
        """
        if self.observes_queries:
            mask = None if token_mask is None else self._mask_for(query_states, token_mask)
            measured = self.key.measure_queries(query_states, mask)
            with self._merging:
                self.key.merge(measured)

    def freeze(self) -> None:
        self.key.freeze()
        self.value.freeze()

    def ready_on(self, device: torch.device) -> None:
        """Make on ``device`` now every tensor the frozen streams derive on first use (see
        :meth:`StreamQuantizer.ready_on`), and for keys stored around a turned center, the center by RoPE pairs and
        RoPE's fixed tables, which attention from codes reads. A compiled step then never finds one missing."""
        if not self.enabled or not self.frozen:
            return
        self.key.ready_on(device)
        self.value.ready_on(device)
        if self.key_rope is not None:
            self.key_rope.ready_on(device)
            if self.rope_center and self.key.center is not None:
                self.key.space.center_pairs(self.key_rope.rotary_dim // 2, device)

    def fake_quantize(
        self, key_states: torch.Tensor, value_states: torch.Tensor, hook: QuantizeHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key.fake_quantize(key_states, hook), self.value.fake_quantize(value_states, hook)

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, start: int, hook: QuantizeHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(batch, kv_heads, tokens, row_bytes)`` key and value rows of states at positions ``start..``
        (none of them a sink token): keys as :meth:`keys_to_quantize` gives them, then both streams' ``encode``."""
        return self.key.encode(self.keys_to_quantize(keys, start), hook), self.value.encode(values, hook)

    def sinks_among(self, new_tokens: int, start: int, *, keeps_sinks: bool = True) -> int:
        """How many of ``new_tokens`` arriving at position ``start`` are sink tokens (none unless ``keeps_sinks``)."""
        if not keeps_sinks or not self.enabled or start >= self.sink_tokens:
            return 0
        return min(self.sink_tokens - start, new_tokens)

    def keys_to_observe(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """``keys`` at positions ``start..`` as calibration sees them: turned back before RoPE where the keys are
        centred there (``pre_rope_keys``, ``rope_center``), in float32 then; else as they are."""
        return keys if self.key_rope is None else self.key_rope.rotate(keys, start, undo=True, dtype=torch.float32)

    def keys_to_quantize(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """``keys`` at positions ``start..`` as the key stream quantizes them once frozen.

        Before RoPE (``pre_rope_keys``, float32); after RoPE less the center turned to each position
        (``rope_center``, float32); else as they are.
        """
        if self.key_rope is None:
            return keys
        if not self.rope_center:
            return self.key_rope.rotate(keys, start, undo=True, dtype=torch.float32)
        return keys.float() - self.turned_center(start, keys.shape[2], keys.device)

    def keys_to_read(self, keys: torch.Tensor, start: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The inverse of :meth:`keys_to_quantize`, in ``dtype`` (default: ``keys``'): what attention reads."""
        if self.key_rope is None:
            return keys if dtype is None else keys.to(dtype)
        if not self.rope_center:
            return self.key_rope.rotate(keys, start, dtype=dtype)
        turned = keys.float() + self.turned_center(start, keys.shape[2], keys.device)
        return turned.to(keys.dtype if dtype is None else dtype)

    def turned_center(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """``rope_center``: the key center turned to positions ``start..start+length-1``, ``(1, kv_heads, length,
        head_dim)`` float32 (one row per position, the same for every batch row)."""
        center = self.key.center
        if self.key_rope is None or center is None:
            raise CalibrationError(f"layer {self.index} ({self.name}): rope_center needs a frozen key center and RoPE")
        rows = center.to(device)[None, :, None].expand(1, -1, length, -1)
        return self.key_rope.rotate(rows, start, dtype=torch.float32)

    def decode_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype packed keys decode to before :meth:`keys_to_read`: float32 where RoPE is turned."""
        return dtype if self.key_rope is None else torch.float32

    def process(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        start: int = 0,
        *,
        keeps_sinks: bool = True,
        token_mask: torch.Tensor | None = None,
        hook: QuantizeHook | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache layer does with new states: observe them (calibrating) or quantize them (frozen).

        ``start`` is the position of the first new token in its sequence (the tokens the
        layer has seen). Layers that keep :attr:`sink_tokens` (full-attention ones,
        ``keeps_sinks``) pass those through unchanged and unobserved. ``token_mask`` and
        ``hook`` belong to the calling cache (see :meth:`observe` and :mod:`quantcache.cache.stream`).
        """
        if not self.enabled:
            return key_states, value_states
        if token_mask is not None and not self.frozen:
            self._observe_padded(key_states, value_states, token_mask, keeps_sinks=keeps_sinks)
            return key_states, value_states
        sinks = self.sinks_among(key_states.shape[2], start, keeps_sinks=keeps_sinks)
        if sinks == key_states.shape[2]:
            if not self.frozen:
                self.sink_only_updates += 1
            return key_states, value_states
        rest_values = value_states[:, :, sinks:]
        if not self.frozen:
            self.observe(self.keys_to_observe(key_states[:, :, sinks:], start + sinks), rest_values)
            return key_states, value_states
        rest_keys = self.keys_to_quantize(key_states[:, :, sinks:], start + sinks)
        keys, values = self.fake_quantize(rest_keys, rest_values, hook)
        keys = self.keys_to_read(keys, start + sinks, key_states.dtype)
        if sinks:
            keys = torch.cat([key_states[:, :, :sinks], keys], dim=2)
            values = torch.cat([value_states[:, :, :sinks], values], dim=2)
        return keys, values

    def _observe_padded(
        self, key_states: torch.Tensor, value_states: torch.Tensor, token_mask: torch.Tensor, *, keeps_sinks: bool
    ) -> None:
        """Calibrate on a batch whose padding ``token_mask`` marks: every row at the positions the model gave it.

        A left-padded row's tokens sit at ``cumsum(mask) - 1`` (what :func:`quantcache.calibrate` passes the
        model as ``position_ids``), not at their column: keys are turned back before RoPE by those positions,
        and a row's sink tokens are its own first ones, left out of the statistics like its padding.
        """
        mask = self._mask_for(key_states, token_mask)
        positions = (token_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -key_states.shape[2] :]
        if keeps_sinks and self.sink_tokens:
            mask = mask & (positions >= self.sink_tokens)
        if not bool(mask.any()):
            self.sink_only_updates += int(bool(self.sink_tokens))
            return
        keys = key_states
        if self.key_rope is not None:
            keys = self.key_rope.rotate_at(key_states, positions.to(key_states.device), undo=True, dtype=torch.float32)
        self.observe(keys, value_states, mask)

    def reset(self) -> None:
        self.key.reset()
        self.value.reset()

    def unfreeze(self) -> None:
        self.key.unfreeze()
        self.value.unfreeze()
