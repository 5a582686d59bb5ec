"""Attention read from packed codes: ``softmax(q k^T) v`` without decoding the history.

A packed row decodes to ``v = inverse(x)`` with ``x = (codes - subtrahend) * scale`` in the
quantizer's space (:class:`~quantcache.ops.packing.CodeView`) and ``inverse(x) = (x R) / a + m``
(``R`` the stream's rotation, ``a`` its channel scale, ``m`` its center; each optional,
:class:`~quantcache.ops.stream_space.StreamSpace`). Both products attention takes with the
history are linear in ``x``, so the space moves to the query and to the output, once per
step instead of once per stored row:

* scores: ``q . v_t = q . m + q' . x_t`` with ``q' = (q / a) R^T`` (:func:`fold_query`);
* output: ``sum_t p_t v_t = ((sum_t p_t x_t) R) / a + m sum_t p_t`` (:func:`unfold_output`).

Keys stored after RoPE around a center turned to each position (``rope_center``) add
``q . R_t m`` instead of ``q . m`` (:func:`turned_center_scores`): small products with the
angles of the rows' blocks of positions and of the offsets within a block.

And ``x_t`` is never formed where its scale folds too: a static stream's fixed scale
``s`` (per channel, head or tensor) moves into the query (``q' . x_t = (q' * s) . codes_t -
(q' * s) . subtrahend``) and onto the mixed output; a dynamic stream's per-row scale (one per
token and kv head) multiplies the row's score, ``s_t (q' . codes_t - subtrahend_t sum(q'))``,
and the row's probability. So does a dynamic stream's scale per row and group of channels:
each query is repeated once per group, zero outside that group's channels, and one product
with the whole rows gives every group's share of the score, scaled afterwards (the same for
the probabilities mixing the values). The codes are converted to float32 once, which is all
a matrix product needs; only a static stream with groups of channels is scaled in its space
first (:meth:`CodeView.in_space`), which still skips the rotation. Everything runs in the
queries' dtype (float32, or float64 for a float64 model).

Traced into a compiled graph (:mod:`quantcache.cache.compiled_kernels`), the products with the
codes are written as sums of elementwise products instead (``(q[:, None] * codes).sum(-1)``
and ``(p[..., None] * codes).sum(-2)``): inductor makes each one loop that reads the stored
bytes and widens them in registers, where a matrix product needs the codes written out in
float32 first and read back. Measured on SmolLM2 (2 CPU threads), attention over 8192 8-bit
rows took 2.6x less time this way, and ran faster than ``sdpa`` over float32 states.

A static stream's flagged rows (states that held NaN or Inf) add NaN to their scores, so
every query that reads them gives NaN, as decoding them would. Shapes: queries are
``(batch, kv_heads, n, head_dim)`` (a kv head's query heads and positions stacked in ``n``),
rows ``(batch, kv_heads, seq, ...)``, scores and probabilities ``(batch, kv_heads, n, seq)``.
"""

from __future__ import annotations

import functools

import torch

from quantcache.ops.packing import CodeView, from_slot_major, slot_major
from quantcache.ops.products import few_rows_matmul
from quantcache.ops.rope import BlockAngles, CenterPairs
from quantcache.ops.stream_space import StreamSpace

__all__ = ["fold_query", "key_scores", "row_poison", "turned_center_scores", "unfold_output", "value_mix"]


def _per_head(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(kv_heads, head_dim)`` space tensor as ``(1, kv_heads, 1, head_dim)`` on ``like``'s device and dtype."""
    return tensor.to(device=like.device, dtype=like.dtype)[None, :, None]


def fold_query(query: torch.Tensor, space: StreamSpace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(q', q . m)``: ``(batch, kv_heads, n, head_dim)`` float queries in the key stream's space, and the
    ``(batch, kv_heads, n, 1)`` score every key gets from the center (``None`` without one)."""
    from_center = None
    if space.applied_center is not None:
        from_center = (query * _per_head(space.applied_center, query)).sum(-1, keepdim=True)
    if space.channel_scale is not None:
        query = query / _per_head(space.channel_scale, query)
    if space.rotation is not None:
        query = few_rows_matmul(query, space.rotation.to(query.device, query.dtype).T)
    return query, from_center


def _row_parameter(parameter: torch.Tensor | float) -> torch.Tensor | float:
    """A per-row ``(batch, kv_heads, seq, 1)`` parameter as ``(batch, kv_heads, 1, seq)``, against scores."""
    return parameter if isinstance(parameter, float) else parameter.squeeze(-1).unsqueeze(-2)


def _slot_order(head_dim: int, per_byte: int, like: torch.Tensor) -> torch.Tensor:
    """``(head_dim, head_dim)`` permutation matrix in ``like``'s dtype: ``x @ it`` is :func:`slot_major` of ``x``."""
    eye = torch.eye(head_dim, device=like.device, dtype=like.dtype)
    return slot_major(eye, per_byte)


def _times_codes(query: torch.Tensor, view: CodeView) -> torch.Tensor:
    """``query @ codes^T``: ``(batch, kv_heads, n, head_dim)`` against the rows' codes, ``(batch, kv_heads, n, seq)``
    (codes left in their bytes are read in slot-major order, the query put in it).

    Compiled, it is a sum of products over each row's channels, which the generated kernel reads
    from the stored bytes and widens in registers: no float32 copy of the codes is written and read
    back for a matrix product (at 8192 tokens, 2.6x less time for 8-bit codes on a CPU).
    """
    if torch.compiler.is_compiling():
        slots = view.slots(query.dtype)
        if len(slots) == 1:
            return (query.unsqueeze(-2) * slots[0].unsqueeze(-3)).sum(-1)
        # the query in slot-major order as a tensor of its own (a product, exact: ones and zeros), so the kernel
        # reads each slot's channels contiguously; indexing them out of the query instead makes inductor vectorize
        # over the rows, transposing every block of codes (2.4x slower at 8192 tokens). It stays a library product,
        # not few_rows_matmul: fused, the kernel reads the query by index again (int4 at 2048 tokens: 489 -> 582 us)
        ordered = query @ _slot_order(query.shape[-1], view.per_byte, query)
        parts = torch.split(ordered, slots[0].shape[-1], dim=-1)
        products = [part.unsqueeze(-2) * slot.unsqueeze(-3) for part, slot in zip(parts, slots, strict=True)]
        return functools.reduce(torch.add, products).sum(-1)
    return slot_major(query, view.per_byte) @ view.slot_major(query.dtype).transpose(-1, -2)


def _mix_codes(weights: torch.Tensor, view: CodeView) -> torch.Tensor:
    """``weights @ codes``: ``(batch, kv_heads, n, seq)`` weights over the rows' codes, ``(batch, kv_heads, n,
    head_dim)`` (codes left in their bytes are mixed in slot-major order, then put back in order; compiled, a sum
    over the rows per slot, as :func:`_times_codes`)."""
    if torch.compiler.is_compiling():
        mixed = [(weights.unsqueeze(-1) * slot.unsqueeze(-3)).sum(-2) for slot in view.slots(weights.dtype)]
        return mixed[0] if len(mixed) == 1 else torch.stack(mixed, dim=-1).flatten(-2)
    return from_slot_major(weights @ view.slot_major(weights.dtype), view.per_byte)


def key_scores(folded: torch.Tensor, view: CodeView) -> torch.Tensor:
    """``q' . x_t`` for every query and row: ``(batch, kv_heads, n, seq)`` in ``folded``'s dtype, flagged rows NaN."""
    if view.grouped:
        if view.per_row:
            return _grouped_scores(folded, view)
        return folded @ view.in_space().to(folded.dtype).transpose(-1, -2)
    if not view.per_row:  # the fixed scale into the query
        weighted = folded * view.scale
        scores = _times_codes(weighted, view)
        if view.subtrahend is not None:
            scores = scores - (weighted * view.subtrahend).sum(-1, keepdim=True)
        poison = row_poison(view)
        return scores if poison is None else scores + poison
    scores = _times_codes(folded, view)
    if view.subtrahend is not None:
        scores = scores - folded.sum(-1, keepdim=True) * _row_parameter(view.subtrahend)
    return scores * _row_parameter(view.scale)


def _grouped(view: CodeView, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | float | None, torch.Tensor]:
    """A dynamic grouped view's codes ``(batch, kv_heads, seq, groups * group_size)`` in ``dtype`` (one pass over
    them), and its per-row subtrahends and scales as ``(batch, kv_heads, groups, 1, seq)``, against scores."""

    def against_scores(parameter: torch.Tensor) -> torch.Tensor:  # (b, h, seq, groups, 1) -> (b, h, groups, 1, seq)
        return parameter.squeeze(-1).transpose(-1, -2).unsqueeze(-2).to(dtype)

    subtrahend = view.subtrahend
    if isinstance(subtrahend, torch.Tensor):
        subtrahend = against_scores(subtrahend)
    return view.codes.flatten(-2).to(dtype), subtrahend, against_scores(view.scale)


def _own_channels(view: CodeView, like: torch.Tensor) -> torch.Tensor:
    """``(groups, 1, groups * group_size)``: 1 on each group's own channels, 0 elsewhere, in ``like``'s dtype."""
    groups, size = view.codes.shape[-2:]
    eye = torch.eye(groups, device=like.device, dtype=like.dtype)
    return eye.repeat_interleave(size, dim=-1).unsqueeze(1)


def _grouped_scores(query: torch.Tensor, view: CodeView) -> torch.Tensor:
    """``sum_g s_tg (q'_g . codes_tg - subtrahend_tg sum(q'_g))`` over a dynamic stream's groups of channels.

    Each group's product with the codes is scaled by the rows' own scales afterwards, so the
    codes are converted once and never offset or scaled element by element: one product of the
    whole rows with ``groups`` copies of each query, each zero outside its group's channels, instead
    of two more passes over the ``(seq, head_dim)`` rows. ``query`` ``(batch, kv_heads, n,
    head_dim)`` -> ``(batch, kv_heads, n, seq)``.
    """
    if torch.compiler.is_compiling():
        return _grouped_scores_summed(query, view)
    codes, subtrahend, scale = _grouped(view, query.dtype)
    padding = codes.shape[-1] - query.shape[-1]  # the last group's zero padding in the codes
    padded = torch.nn.functional.pad(query, (0, padding)) if padding else query
    own = _own_channels(view, padded)
    blocks = padded.unsqueeze(2) * own  # (batch, kv_heads, groups, n, groups * size)
    scores = (blocks.flatten(2, 3) @ codes.transpose(-1, -2)).view(*blocks.shape[:4], -1)
    if subtrahend is not None:
        scores = scores - blocks.sum(-1, keepdim=True) * subtrahend
    return (scores * scale).sum(2)


def _grouped_scores_summed(query: torch.Tensor, view: CodeView) -> torch.Tensor:
    """:func:`_grouped_scores` as sums of products, for a compiled graph (see :func:`_times_codes`): each row's
    groups scored against the query's own channels ``(batch, kv_heads, n, seq, groups)``, offset and scaled, then
    summed over the groups."""
    groups, size = view.codes.shape[-2:]
    padding = groups * size - query.shape[-1]
    padded = torch.nn.functional.pad(query, (0, padding)) if padding else query
    by_group = padded.reshape(*padded.shape[:-1], groups, size)  # (batch, kv_heads, n, groups, size)
    scores = (by_group.unsqueeze(-3) * view.codes.to(query.dtype).unsqueeze(-4)).sum(-1)
    if isinstance(view.subtrahend, torch.Tensor):
        scores = scores - by_group.sum(-1).unsqueeze(-2) * view.subtrahend.squeeze(-1).unsqueeze(-3)
    elif view.subtrahend is not None:
        scores = scores - by_group.sum(-1).unsqueeze(-2) * view.subtrahend
    return (scores * view.scale.squeeze(-1).unsqueeze(-3)).sum(-1)


def _grouped_mix_summed(probabilities: torch.Tensor, view: CodeView) -> torch.Tensor:
    """:func:`_grouped_mix` as sums over the rows, for a compiled graph: each group's channels mixed with the
    probabilities weighed by that group's row scales, ``(batch, kv_heads, n, groups, size)``."""
    weights = probabilities.unsqueeze(-1) * view.scale.squeeze(-1).unsqueeze(-3)  # (batch, kv_heads, n, seq, groups)
    mixed = (weights.unsqueeze(-1) * view.codes.to(weights.dtype).unsqueeze(-4)).sum(-3)
    if isinstance(view.subtrahend, torch.Tensor):
        mixed = mixed - (weights * view.subtrahend.squeeze(-1).unsqueeze(-3)).sum(-2).unsqueeze(-1)
    elif view.subtrahend is not None:
        mixed = mixed - weights.sum(-2).unsqueeze(-1) * view.subtrahend
    return mixed.flatten(-2)[..., : view.head_dim]


def _grouped_mix(probabilities: torch.Tensor, view: CodeView) -> torch.Tensor:
    """``sum_t p_t x_t`` of a dynamic stream in groups of channels: the probabilities weighed by each group's
    row scales, one product with the whole rows, and each group's channels kept from its own weights
    (as :func:`_grouped_scores`, no pass scales the codes). ``(batch, kv_heads, n, seq)`` ->
    ``(batch, kv_heads, n, head_dim)``."""
    if torch.compiler.is_compiling():
        return _grouped_mix_summed(probabilities, view)
    codes, subtrahend, scale = _grouped(view, probabilities.dtype)
    weights = probabilities.unsqueeze(2) * scale  # (batch, kv_heads, groups, n, seq)
    mixed = (weights.flatten(2, 3) @ codes).view(*weights.shape[:4], -1)  # (..., groups, n, groups * size)
    if isinstance(subtrahend, torch.Tensor):
        mixed = mixed - (weights * subtrahend).sum(-1, keepdim=True)
    elif subtrahend is not None:
        mixed = mixed - weights.sum(-1, keepdim=True) * subtrahend
    return (mixed * _own_channels(view, mixed)).sum(2)[..., : view.head_dim]


def row_poison(view: CodeView) -> torch.Tensor | None:
    """A static stream's row flags as ``(batch, kv_heads, 1, seq)`` scores to add (NaN where a row held NaN/Inf)."""
    return None if view.poison is None else view.poison.unsqueeze(-2)


def value_mix(probabilities: torch.Tensor, view: CodeView) -> torch.Tensor:
    """``sum_t p_t x_t``: ``(batch, kv_heads, n, head_dim)`` in the value stream's space and ``probabilities``' dtype.

    A static stream's flagged rows are not NaN here: their poison goes into the scores
    (:func:`row_poison`), which makes every probability of a query that reads them NaN.
    """
    if view.grouped:
        if view.per_row:
            return _grouped_mix(probabilities, view)
        return probabilities @ view.in_space().to(probabilities.dtype)
    if not view.per_row:
        mixed = _mix_codes(probabilities, view)
        if view.subtrahend is not None:
            mixed = mixed - probabilities.sum(-1, keepdim=True) * view.subtrahend
        return mixed * view.scale
    weights = probabilities * _row_parameter(view.scale)
    mixed = _mix_codes(weights, view)
    if view.subtrahend is None:
        return mixed
    if isinstance(view.subtrahend, float):
        return mixed - weights.sum(-1, keepdim=True) * view.subtrahend
    return mixed - weights @ view.subtrahend.to(weights.dtype)


def unfold_output(mixed: torch.Tensor, probability_sum: torch.Tensor, space: StreamSpace) -> torch.Tensor:
    """``sum_t p_t v_t`` in the model's space from :func:`value_mix`'s ``(batch, kv_heads, n, head_dim)``.

    ``probability_sum`` ``(batch, kv_heads, n, 1)`` is ``sum_t p_t`` over the rows mixed (what the
    center is weighed by).
    """
    if space.rotation is not None:
        mixed = few_rows_matmul(mixed, space.rotation.to(mixed.device, mixed.dtype))
    if space.channel_scale is not None:
        mixed = mixed / _per_head(space.channel_scale, mixed)
    if space.applied_center is not None:
        mixed = mixed + _per_head(space.applied_center, mixed) * probability_sum
    return mixed


def turned_center_scores(query: torch.Tensor, center: CenterPairs, angles: BlockAngles) -> torch.Tensor:
    """``q . R_t m`` for every query and position ``t``: ``(batch, kv_heads, n, seq)`` (``rope_center`` keys).

    ``center`` is the ``(kv_heads, head_dim)`` mean before RoPE, arranged by RoPE pairs
    (:class:`CenterPairs`); ``angles`` the rows' positions, as block starts and offsets
    (:meth:`~quantcache.ops.rope.RopeTable.block_angles`). With ``a`` a block start's angle ``b``
    plus an offset's ``o``, ``q . R_a m = cos o (cos b along + sin b across) + sin o (cos b across -
    sin b along)``: every pair's two sums, turned by ``b`` once per block, and a ``(blocks, 2 r) x
    (2 r, size)`` product per query adds the offsets. No ``(seq, r)`` table of angles is formed or
    read; a handful of tensor operations whatever the length.
    """
    pairs = center.halves.shape[-1]
    halves = query[..., : 2 * pairs].reshape(*query.shape[:-1], 1, 2, pairs)  # (batch, kv_heads, n, 1, 2, r)
    sums = (halves * center.halves.to(query)[None, :, None]).sum(-2)  # (batch, kv_heads, n, 2, r): along, across
    turned = (sums[..., None, None, :, :] * angles.block_turns.to(query)).sum(-2)  # (..., n, blocks, 2, r)
    scores = (turned.flatten(-2) @ angles.offsets.to(query)).flatten(-2)
    scores = scores[..., angles.skip : angles.skip + angles.positions]
    if center.rest is not None:
        rest = center.rest.to(query)[None, :, None]
        scores = scores + (query[..., 2 * pairs :] * rest).sum(-1, keepdim=True)
    return scores
