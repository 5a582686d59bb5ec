"""Keys before RoPE: the rotary position embedding's angles, to undo on write and redo on read.

A model hands its cache keys after RoPE has turned each channel pair ``(i, i + rotary/2)``
by ``position * inv_freq[i]``. What sets a key apart per channel (a large constant
offset, a channel that is always big) is a property of the key before that turn:
after it, the offset circles with the position, so a calibrated channel mean misses
it and per-token ranges widen. Quantizing ``R(-position) k`` and storing ``R(position)``
of the result removes that (the turns cancel to float32 rounding) without a hook: the cache knows each
token's position (the tokens it already holds).

The frequencies come from the model config (``rope_parameters`` in transformers 5,
``rope_theta``/``rope_scaling`` before), per layer type where they differ (Gemma 3's
sliding and full attention layers). Correctness never depends on them matching the
model (the same angles are undone and redone); how much the keys gain does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from quantcache.errors import ConfigError

__all__ = ["BlockAngles", "RopeTable", "rope_frequencies", "rope_pairs"]

# Frequency schemes that do not change with the sequence length: transformers' own functions compute them.
_FIXED_SCALED_TYPES = ("linear", "llama3", "yarn")
# Models whose rotary embedding turns adjacent channels (2i, 2i + 1) rather than halves (i, i + rotary/2).
_INTERLEAVED_MODELS = frozenset({"gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "chatglm"})


def _layer_parameters(config: Any, layer_type: str | None) -> dict[str, Any] | None:
    """``{rope_type, rope_theta, ...}`` of the RoPE that layers of ``layer_type`` apply, ``None`` without RoPE."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, Mapping):  # transformers 5: one mapping, or one per layer type
        if parameters and all(isinstance(value, Mapping) or value is None for value in parameters.values()):
            parameters = parameters.get(layer_type or "full_attention")
        return None if parameters is None else dict(parameters)
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        return None
    local_theta = getattr(config, "rope_local_base_freq", None)
    if layer_type == "sliding_attention" and local_theta is not None:  # Gemma 3 before transformers 5
        return {"rope_type": "default", "rope_theta": local_theta}
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": theta, **scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


def _rotary_dim(config: Any, parameters: Mapping[str, Any]) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * factor)


def rope_pairs(config: Any, layer_type: str | None = None) -> int:
    """How many channel pairs ``(i, i + pairs)`` RoPE turns on layers of ``layer_type`` (``rotary_dim / 2``).

    Whatever the frequencies (``dynamic`` and ``longrope`` included), a turn keeps each pair's
    radius, which is all ``rope_radius`` ranges need. Raises :class:`ConfigError` when the
    config declares no RoPE or the model turns interleaved pairs ``(2i, 2i + 1)``.
    """
    model_type = getattr(config, "model_type", None)
    fix = "use a scheme without rope_radius for this model (its key ranges are then calibrated per channel)"
    if model_type in _INTERLEAVED_MODELS:
        raise ConfigError(f"rope_radius: {model_type} turns interleaved channel pairs, not supported here; {fix}")
    parameters = _layer_parameters(config, layer_type)
    if parameters is None:
        raise ConfigError(
            f"rope_radius: the {model_type or 'model'} config declares no rotary position embedding; {fix}"
        )
    return _rotary_dim(config, parameters) // 2


def rope_frequencies(config: Any, layer_type: str | None = None, setting: str = "pre_rope_keys") -> torch.Tensor:
    """The inverse frequencies ``(rotary_dim // 2,)`` (float32) of the RoPE on layers of ``layer_type``.

    Raises :class:`ConfigError` where keys cannot be taken back before RoPE: the config
    declares no RoPE, its frequencies change with the sequence length (``dynamic``,
    ``longrope``), or the model turns interleaved channel pairs.
    """
    model_type = getattr(config, "model_type", None)
    fix = f"set {setting}: false for this model"
    if model_type in _INTERLEAVED_MODELS:
        raise ConfigError(f"{setting}: {model_type} turns interleaved channel pairs, not supported here; {fix}")
    parameters = _layer_parameters(config, layer_type)
    if parameters is None:
        what = model_type or "model"
        raise ConfigError(f"{setting}: the {what} config declares no rotary position embedding; {fix}")
    rope_type = parameters.get("rope_type", "default")
    rotary_dim = _rotary_dim(config, parameters)
    if rope_type == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
        return 1.0 / (float(parameters["rope_theta"]) ** exponents)
    if rope_type not in _FIXED_SCALED_TYPES:
        raise ConfigError(
            f"{setting}: RoPE type {rope_type!r} is not supported (its frequencies depend on the sequence "
            f"length, or are unknown here); supported: default, {', '.join(_FIXED_SCALED_TYPES)}; {fix}"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    compute = ROPE_INIT_FUNCTIONS[rope_type]
    try:
        inv_freq, _ = compute(config, None, layer_type=layer_type)
    except TypeError:  # transformers 4: no per-layer-type parameters
        inv_freq, _ = compute(config, None)
    return inv_freq.to(torch.float32)


def _added_angles(
    cos_a: torch.Tensor, sin_a: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of ``a + b`` from those of ``a`` and ``b`` (broadcast): the one formula every position's
    angle comes from, so that the same position gets the same bits whichever way it is asked for."""
    return cos_a * cos_b - sin_a * sin_b, sin_a * cos_b + cos_a * sin_b


class BlockAngles(NamedTuple):
    """The angles of ``positions`` positions from ``skip`` past the start of the first of ``blocks`` blocks, kept apart.

    Position ``block * size + offset`` turns by the block start's angle ``b`` plus the offset's
    ``o``, in the forms a product with every position's ``(cos, sin)`` takes block by block,
    without ever forming the ``(count, rotary/2)`` table (see
    :func:`~quantcache.ops.code_attention.turned_center_scores`): ``block_turns`` ``(blocks, 2, 2,
    rotary/2)`` holds each block start's turn ``[[cos b, sin b], [-sin b, cos b]]``, ``offsets``
    ``(rotary, size)`` is ``[cos o; sin o]``.
    """

    block_turns: torch.Tensor
    offsets: torch.Tensor
    skip: int
    positions: int

    @classmethod
    def of(
        cls,
        block_cos: torch.Tensor,
        block_sin: torch.Tensor,
        offset_cos: torch.Tensor,
        offset_sin: torch.Tensor,
        skip: int,
        positions: int,
    ) -> BlockAngles:
        """From ``(blocks, rotary/2)`` block-start and ``(size, rotary/2)`` offset cosines and sines."""
        turns = torch.stack((block_cos, block_sin, -block_sin, block_cos), -2)
        turns = turns.view(*turns.shape[:-2], 2, 2, turns.shape[-1])
        return cls(turns, torch.cat((offset_cos, offset_sin), -1).T.contiguous(), skip, positions)


class CenterPairs(NamedTuple):
    """A ``(kv_heads, head_dim)`` center as what a query's RoPE pairs take from it.

    For pair ``(i, i + r)`` (``r`` = rotary/2) a query ``q`` and the center ``m`` give
    ``along = q_i m_i + q_j m_j`` and ``across = q_j m_i - q_i m_j``, and a turn by ``a`` gives
    ``q . R_a m = cos a along + sin a across``. ``halves`` ``(kv_heads, 2, 2, r)`` is
    ``[[m_i, m_j], [-m_j, m_i]]``: ``(q's halves * halves).sum`` over the halves is ``[along,
    across]``. ``rest`` ``(kv_heads, head_dim - 2 r)`` is the center's channels that do not turn
    (``None``: none). The center's own numbers, rearranged: twice its rotary channels.
    """

    halves: torch.Tensor
    rest: torch.Tensor | None

    @classmethod
    def of(cls, center: torch.Tensor, pairs: int) -> CenterPairs:
        first, second = center[:, :pairs], center[:, pairs : 2 * pairs]
        halves = torch.stack((first, second, -second, first), -2).view(center.shape[0], 2, 2, pairs)
        return cls(halves, center[:, 2 * pairs :] if center.shape[-1] > 2 * pairs else None)


_FourTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(block_cos, block_sin, offset_cos, offset_sin)``: block starts' and offsets' cosines and sines."""


class RopeTable:
    """Cosines and sines of ``position * inv_freq`` for any range of positions, without a per-position table.

    The cache holds no table that grows with the context: a table as long as the
    context would add 4 % to a packed int4 cache of SmolLM2. Angles are split into a
    block start (a multiple of :data:`BLOCK`, its table grown on demand, ``1 / BLOCK`` of
    the context) and an offset within the block (a fixed table), and combined with the
    angle-addition identities. Each range is computed the same way whenever it is
    asked for, so undoing and redoing the turn agree to float32 rounding.
    """

    BLOCK = 64

    def __init__(self, inv_freq: torch.Tensor) -> None:
        if inv_freq.ndim != 1 or not inv_freq.numel():
            raise ValueError(f"inv_freq must be a non-empty vector, got shape {tuple(inv_freq.shape)}")
        self.inv_freq = inv_freq.to(torch.float32)
        offsets = torch.arange(self.BLOCK, dtype=torch.float64)[:, None] * self.inv_freq.double()[None]
        self._offset = (offsets.cos().float(), offsets.sin().float())  # (BLOCK, rotary/2) each
        self._frequencies = self.inv_freq.double()  # what block starts are computed from, beside the offsets
        self._block = (torch.empty(0, inv_freq.numel()), torch.empty(0, inv_freq.numel()))
        self._stacked: BlockAngles | None = None  # every block start's and offset's angles, as block_angles gives

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def _tables(self, blocks: int, device: torch.device) -> _FourTables:
        """``(block_cos, block_sin, offset_cos, offset_sin)`` on ``device``, covering ``blocks`` block starts."""
        if blocks > self._block[0].shape[0]:
            size = max(blocks, 2 * self._block[0].shape[0], 16)
            self._block = self._block_starts(0, size, torch.device("cpu"))
            self._stacked = None
        if self._block[0].device != device:  # moved once, not every call
            self._block = (self._block[0].to(device), self._block[1].to(device))
            self._stacked = None
        return (*self._block, *self._on(device))

    def ready_on(self, device: torch.device) -> None:
        """Move the fixed tables to ``device`` now, so that no later call moves them (a compiled graph whose first
        call moved them would be guarded on where they were, and compile again on the next call)."""
        self._on(device)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets' ``(cos, sin)`` on ``device``, moved there (with the frequencies) once, not every call."""
        if self._offset[0].device != device:
            self._offset = (self._offset[0].to(device), self._offset[1].to(device))
            self._frequencies = self._frequencies.to(device)
            self._stacked = None
        return self._offset

    def _block_starts(self, first: int, last: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of block starts ``first..last-1``, each ``(last - first, rotary/2)`` float32, computed."""
        frequencies = self._frequencies.to(device)
        starts = torch.arange(first, last, dtype=torch.float64, device=device)[:, None] * self.BLOCK * frequencies[None]
        return starts.cos().float(), starts.sin().float()

    def _span(self, first: int, last: int, device: torch.device) -> _FourTables:
        """``(block_cos, block_sin, offset_cos, offset_sin)`` of block starts ``first..last-1`` on ``device``.

        Eager, views of the tables (the block table grown on demand). Compiled, the block starts
        are computed in the graph by the table's own formula: a table that grows as the context
        does is a tensor whose size changes between steps, and each change would compile every
        graph that reads it again.
        """
        if torch.compiler.is_compiling():
            offsets = self._on(device)
            return (*self._block_starts(first, last, device), *offsets)
        block_cos, block_sin, offset_cos, offset_sin = self._tables(last, device)
        return block_cos[first:last], block_sin[first:last], offset_cos, offset_sin

    def _angles(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of positions ``start..end-1``, each ``(end - start, rotary/2)``, float32."""
        first, last = start // self.BLOCK, -(-end // self.BLOCK)
        block_cos, block_sin, offset_cos, offset_sin = self._span(first, last, device)
        cos, sin = _added_angles(block_cos[:, None], block_sin[:, None], offset_cos, offset_sin)
        cos, sin = cos.reshape(-1, self.inv_freq.numel()), sin.reshape(-1, self.inv_freq.numel())
        skip = start - first * self.BLOCK
        return cos[skip : skip + end - start], sin[skip : skip + end - start]

    def block_angles(self, start: int, end: int, device: torch.device) -> BlockAngles:
        """The angles of positions ``start..end-1`` as block starts and offsets (:class:`BlockAngles`), float32:
        eager, views of tables made when the block table grows, nothing computed per call."""
        first, last = start // self.BLOCK, -(-end // self.BLOCK)
        skip = start - first * self.BLOCK
        if torch.compiler.is_compiling():
            return BlockAngles.of(*self._span(first, last, device), skip, end - start)
        block_cos, block_sin, offset_cos, offset_sin = self._tables(last, device)
        if self._stacked is None:
            self._stacked = BlockAngles.of(block_cos, block_sin, offset_cos, offset_sin, 0, 0)
        return self._stacked._replace(
            block_turns=self._stacked.block_turns[first:last], skip=skip, positions=end - start
        )

    def _angles_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of ``(batch, seq)`` integer positions, each ``(batch, 1, seq, rotary/2)``, float32.

        The same block and offset decomposition as :meth:`_angles`, so a position gets the same
        bits whichever of the two asks for it.
        """
        positions = positions.to(torch.int64)
        last = int(positions.max()) // self.BLOCK + 1 if positions.numel() else 1
        block_cos, block_sin, offset_cos, offset_sin = self._tables(last, positions.device)
        block, offset = positions // self.BLOCK, positions % self.BLOCK
        cos, sin = _added_angles(block_cos[block], block_sin[block], offset_cos[offset], offset_sin[offset])
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_at(
        self, keys: torch.Tensor, positions: torch.Tensor, *, undo: bool = False, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """:meth:`rotate` with each row's own ``(batch, seq)`` positions (a left-padded batch, say)."""
        if keys.shape[-1] < self.rotary_dim:
            raise ValueError(f"keys have head_dim {keys.shape[-1]}, fewer than the {self.rotary_dim} rotary channels")
        cos, sin = self._angles_at(positions)
        return self._turn(keys, cos, sin, undo=undo, dtype=keys.dtype if dtype is None else dtype)

    def rotate(
        self, keys: torch.Tensor, start: int, *, undo: bool = False, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``keys`` ``(batch, kv_heads, seq, head_dim)`` at positions ``start..start+seq-1``, turned by RoPE.

        ``undo`` turns them back (before RoPE). The rotation runs in float32; the result
        has ``dtype`` (default: ``keys``' dtype): a bf16 model's keys turned back are kept in
        float32 until quantized, since rounding them to bf16 in between would move elements
        across code boundaries. Channels past :attr:`rotary_dim` (partial RoPE) pass unchanged.
        """
        if keys.shape[-1] < self.rotary_dim:
            raise ValueError(f"keys have head_dim {keys.shape[-1]}, fewer than the {self.rotary_dim} rotary channels")
        cos, sin = self._angles(start, start + keys.shape[-2], keys.device)
        return self._turn(keys, cos, sin, undo=undo, dtype=keys.dtype if dtype is None else dtype)

    def _turn(
        self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, undo: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """``keys`` turned by the angles whose ``cos``/``sin`` broadcast against their rotary halves.

        The halves are written in place into one new tensor. Autograd cannot follow that
        form; ``torch.compile`` would break its graph at each ``out=`` into a view, so a
        compiled graph concatenates the same products instead.
        """
        half = self.inv_freq.numel()
        sign = -1.0 if undo else 1.0
        states = keys.to(torch.float32)
        first, second = states[..., :half], states[..., half : 2 * half]
        if states.requires_grad and torch.is_grad_enabled():  # autograd cannot follow the in-place form
            sin = sin * sign
            turned = torch.cat([first * cos - second * sin, second * cos + first * sin, states[..., 2 * half :]], -1)
            return turned.to(dtype)
        if torch.compiler.is_compiling():
            turned_first = torch.addcmul(first * cos, second, sin, value=-sign)
            turned_second = torch.addcmul(second * cos, first, sin, value=sign)
            return torch.cat([turned_first, turned_second, states[..., 2 * half :]], -1).to(dtype)
        turned = torch.empty_like(states)
        turned_first, turned_second = turned[..., :half], turned[..., half : 2 * half]
        torch.mul(first, cos, out=turned_first).addcmul_(second, sin, value=-sign)
        torch.mul(second, cos, out=turned_second).addcmul_(first, sin, value=sign)
        turned[..., 2 * half :] = states[..., 2 * half :]
        return turned.to(dtype)
