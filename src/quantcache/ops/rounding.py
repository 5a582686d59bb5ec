"""Query-aware rounding of keys: each key's codes chosen for the attention logits it feeds.

Rounding every coordinate of a key to its nearest code minimises the error of the key,
not of what attention computes with it, the logits ``q . k``. For an error ``e`` of one
key (a ``(head_dim,)`` row in the quantizer's space) the expected squared logit error
is ``e H e^T`` with ``H`` the second moment of the queries that read it, seen through
RoPE and the quantizer's space. Choosing the codes one coordinate at a time and handing
each rounding error on to the coordinates still to come through ``H`` (the method of
GPTQ and OBQ, here on one key instead of a weight row) lowers that error; the codes,
scales and zero points keep their format, and decoding is unchanged. What it stores is
the query model below, once per layer.

What calibration keeps (:func:`query_model`): the second moment ``Q`` of the pre-RoPE
queries per kv head as ``diag(d) + V V^T`` with ``V`` of rank :data:`QUERY_MODEL_RANK`
(``(kv_heads, head_dim)`` and ``(kv_heads, head_dim, rank)`` float32, counted in the
effective bits like the center). A query ``Δ`` tokens after a key reads it through
RoPE's turn ``R_Δ``; :func:`rope_averaged_moment` averages ``R_Δ Q R_Δ^T`` over the
distances of the causal pairs of a :data:`ROUNDING_HORIZON`-token context.

The rounding itself (:func:`round_with_feedback`) is the fixed point of
``x' = x + (x - q) N``, ``q = round(x')``, where ``N`` (:func:`feedback_matrix`) is
strictly triangular in the chosen coordinate order; iterated from nearest rounding, the first
``t + 1`` coordinates are final after ``t`` rounds, so ``head_dim - 1`` rounds reach it for
any key, and real keys get there in far fewer. The fixed point equals rounding the
coordinates one by one with the error fed forward (coordinates taken in falling order of
``diag(H)``), in one batched matrix product per round instead of ``head_dim`` small steps.
The cache runs a fixed :data:`ROUNDING_ROUNDS` rounds with no test for convergence: a test
would be a host synchronisation per round, the GPU waiting on the CPU at every decode step.
On a CPU a call of :data:`SEQUENTIAL_ROWS` keys or more (a prefill) takes the coordinates one
by one instead, each with the errors of those before it in one small product: the fixed point itself,
for every key, in ``head_dim`` steps that multiply a quarter of what one round does (at 2048
keys of SmolLM2 half the time of the rounds; at a few keys far slower).

Where a row's elements share one step (a per-token or per-head scale, an integer format:
:class:`RowGrid`), the rounds run in units of that step, ``y = x / scale + offset``: an
error ``e = scale (y - q)`` fed through ``N`` is ``scale (y - q) N``, so the same fixed point
is ``y' = y + (y - q) N`` with ``q = clamp(round(y'))``, a round of four tensor operations
(``y + y N`` is the same every round) instead of the whole quantize-dequantize of the
stream's format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "QUERY_MODEL_RANK",
    "ROUNDING_DAMPING",
    "ROUNDING_HORIZON",
    "ROUNDING_ROUNDS",
    "SEQUENTIAL_ROWS",
    "QueryModel",
    "RowGrid",
    "feedback_matrix",
    "query_model",
    "rope_averaged_moment",
    "round_with_feedback",
    "rounding_order",
]

QueryModel = tuple[torch.Tensor, torch.Tensor]
"""``(diag, factor)``: the stored model ``diag(diag) + factor factor^T`` of the queries' second moment."""
SEQUENTIAL_ROWS = 256
"""Rows (``batch * seq`` keys) from which :func:`round_with_feedback`, given the rounding order, takes the coordinates
one by one rather than run its rounds on a CPU: about where the one-by-one rounding becomes the faster there (eager;
SmolLM2's 3 x 64 and 8 x 128 heads alike). Not on an accelerator, where ``head_dim`` steps of small kernels cost
launches that the rounds' few large products do not."""
QUERY_MODEL_RANK = 1
"""Rank of the low-rank part of the stored query second moment (``diag + V V^T``)."""
ROUNDING_HORIZON = 1024
"""Context length whose causal query-key distances weigh the RoPE average."""
ROUNDING_DAMPING = 0.01
"""Added to ``H``'s diagonal, as a share of its mean: the feedback stays bounded where queries hardly look."""
ROUNDING_ROUNDS = 20
"""Rounds of :func:`round_with_feedback` in the cache: the fewest that give the fixed point's codes on at least
99.99 % of real keys under each preset that rounds query-aware. Measured on SmolLM2-135M's keys (int4, int3
and int2 presets calibrated on the built-in corpus's calibration split, 8 x 512 tokens; 6 x 1024 tokens of its
evaluation split, prefill 256 then chunks of 32; about 552,000 keys each), counting for every key the rounds
after which its codes stop changing: 99.994 % (int4), 99.998 % (int3) and 99.993 % (int2) need at most 20 (19:
99.985 %, 99.992 %, 99.984 %; 16: 99.84 %, 99.88 %, 99.83 %; the most any key needed: 24, 23, 26; the median:
6). A key that needs more keeps the sequential rounding's codes for its first 21 coordinates, in falling order
of weight, and the last round's for the rest. Mean KL divergence on that text, rounding to convergence -> 20
rounds: 0.007551 -> 0.007548 (int4), 0.04870 -> 0.04831 (int3), 0.1678 -> 0.1682 (int2)."""


def query_model(moment: torch.Tensor, rank: int = QUERY_MODEL_RANK) -> QueryModel:
    """``(diag, factor)`` with ``diag(diag) + factor factor^T`` close to the ``(kv_heads, head_dim, head_dim)`` moment.

    ``factor`` ``(kv_heads, head_dim, rank)`` spans the moment's leading eigenvectors
    (scaled by the roots of their eigenvalues); ``diag`` keeps the rest of its diagonal,
    so the model has the moment's diagonal exactly. Both float32.
    """
    moment = moment.double()
    moment = (moment + moment.transpose(-1, -2)) / 2
    eigenvalues, vectors = torch.linalg.eigh(moment)  # ascending
    factor = vectors[..., -rank:] * eigenvalues[..., None, -rank:].clamp(min=0).sqrt()
    # eigh fixes each vector only up to its sign: make the largest entry positive, so the factor is reproducible.
    signs = torch.gather(factor, -2, factor.abs().argmax(dim=-2, keepdim=True)).sign()
    factor = factor * torch.where(signs == 0, 1.0, signs)
    diag = (moment.diagonal(dim1=-2, dim2=-1) - factor.square().sum(-1)).clamp(min=0)
    return diag.float(), factor.float()


def rope_averaged_moment(
    diag: torch.Tensor,
    factor: torch.Tensor,
    inv_freq: torch.Tensor,
    horizon: int = ROUNDING_HORIZON,
    *,
    turned: bool = False,
) -> torch.Tensor:
    """``M = sum_Δ w(Δ) R_Δ Q R_Δ^T`` ``(kv_heads, head_dim, head_dim)`` float64, ``Q = diag(diag) + factor factor^T``.

    ``R_Δ`` turns channel ``i < r`` with ``i + r`` (``r = rotary_dim / 2 = inv_freq.numel()``)
    by ``Δ * inv_freq[i]``, as :class:`~quantcache.ops.rope.RopeTable` does, and leaves the
    channels past ``2 r`` alone. A key quantized before RoPE meets a query turned by their
    distance ``Δ``: ``w(Δ) ∝ horizon - Δ`` counts the query-key pairs ``Δ`` apart in a
    ``horizon``-token context. A key quantized after RoPE (``turned``, ``rope_center``) meets a
    query turned by the query's own position ``Δ``, which ``Δ + 1`` keys of the context read:
    ``w(Δ) ∝ Δ + 1``. Written as ``R_Δ = diag(c) + diag(s) P`` (``P`` swaps each channel with
    its partner, ``s`` carries the sign), the average needs only the weighted products of the
    ``(horizon, head_dim)`` cosine and sine tables.
    """
    head_dim = diag.shape[-1]
    half = inv_freq.numel()
    moment = torch.diag_embed(diag.double()) + factor.double() @ factor.double().transpose(-1, -2)
    frequency = torch.zeros(head_dim, dtype=torch.float64)
    frequency[:half] = frequency[half : 2 * half] = inv_freq.double().cpu()
    sign = torch.zeros(head_dim, dtype=torch.float64)
    sign[:half], sign[half : 2 * half] = -1.0, 1.0
    partner = torch.arange(head_dim)
    partner[:half], partner[half : 2 * half] = torch.arange(half, 2 * half), torch.arange(half)
    distance = torch.arange(horizon, dtype=torch.float64)
    counts = distance + 1 if turned else horizon - distance
    weight = counts / counts.sum()
    angle = distance[:, None] * frequency[None]
    cos, sin = angle.cos(), angle.sin() * sign
    weighted_cos, weighted_sin = cos * weight[:, None], sin * weight[:, None]
    moment = moment.to("cpu")
    swapped_rows, swapped_columns = moment[:, partner], moment[:, :, partner]
    both = swapped_rows[:, :, partner]
    averaged = (
        (weighted_cos.T @ cos) * moment
        + (weighted_cos.T @ sin) * swapped_columns
        + (weighted_sin.T @ cos) * swapped_rows
        + (weighted_sin.T @ sin) * both
    )
    return averaged.to(diag.device)


def feedback_matrix(weight: torch.Tensor, damping: float = ROUNDING_DAMPING) -> torch.Tensor:
    """The ``(kv_heads, head_dim, head_dim)`` float32 ``N`` of :func:`round_with_feedback` for error weights ``H``.

    ``weight`` is ``H`` per kv head in the quantizer's space (row vectors: a row error
    ``e`` costs ``e H e^T``). Coordinates are taken in falling order of ``diag(H)``; in
    that order, with ``H^{-1} = U^T U`` (``U`` upper triangular), feeding coordinate
    ``i``'s error ``e_i`` forward subtracts ``e_i U[i, j] / U[i, i]`` from each later ``j``,
    and the whole sequence is ``x' = x + (x - q) N`` with ``N = U^{-1} diag(U) - I``, zero on
    and below the diagonal in that order (exactly: a coordinate's own code never moves it).
    """
    weight = weight.double()
    head_dim = weight.shape[-1]
    eye = torch.eye(head_dim, dtype=torch.float64, device=weight.device)
    mean_diagonal = weight.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=torch.finfo(torch.float64).tiny)
    weight = weight + damping * mean_diagonal[:, None, None] * eye
    order = rounding_order(weight)
    rows, columns = order[:, :, None].expand_as(weight), order[:, None].expand_as(weight)
    ordered = torch.gather(torch.gather(weight, 1, rows), 2, columns)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ordered)), upper=True)
    diagonal = torch.diag_embed(upper.diagonal(dim1=-2, dim2=-1))
    ordered_feedback = torch.linalg.solve_triangular(upper, diagonal, upper=True).triu(diagonal=1)
    feedback = torch.empty_like(ordered_feedback).scatter_(1, rows, ordered_feedback)  # rows back in place ...
    return torch.empty_like(feedback).scatter_(2, columns, feedback).float()  # ... and columns


def rounding_order(weight: torch.Tensor) -> torch.Tensor:
    """``(kv_heads, head_dim)`` int64: the coordinates in the order the rounding takes them, falling ``diag(H)``.

    :func:`feedback_matrix`'s ``N`` is strictly upper triangular in this order (damping adds
    the same to every diagonal element, so it leaves the order as it is).
    """
    return torch.argsort(weight.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)


class RowGrid(NamedTuple):
    """An integer grid with one step per row: ``code = clamp(round(x / scale + offset), low, high)``.

    ``scale`` broadcasts against ``(batch, kv_heads, seq, head_dim)`` states with a last
    dimension of 1 (``(batch, kv_heads, seq, 1)`` per token, ``(kv_heads, 1, 1)`` per head);
    ``offset`` is the zero point (``-1/2`` on the mid-rise grid), a tensor like ``scale`` or a
    number. Called, it is the grid's quantize-dequantize; :func:`round_with_feedback` given one
    rounds in its units instead.
    """

    scale: torch.Tensor
    offset: torch.Tensor | float
    low: float
    high: float

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` quantized and dequantized on the grid, float32."""
        return (self.nearest(self.levels(states)) - self.offset) * self.scale

    def levels(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` in units of the step, the codes' scale: ``x / scale + offset`` (float32)."""
        return states.float() / self.scale + self.offset

    def nearest(self, levels: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """The nearest codes of ``levels``, as float32 values inside the grid (``in_place``: written over them)."""
        rounded = levels.round_() if in_place else levels.round()
        return rounded.clamp_(self.low, self.high)


def round_with_feedback(
    space: torch.Tensor,
    round_trip: Callable[[torch.Tensor], torch.Tensor] | RowGrid,
    feedback: torch.Tensor,
    rounds: int = ROUNDING_ROUNDS,
    *,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``space`` ``(batch, kv_heads, seq, head_dim)`` moved so that ``round_trip`` of it is the feedback rounding.

    ``round_trip`` is the stream's own quantize-dequantize with the parameters already
    chosen for ``space`` (nearest rounding); ``feedback`` is :func:`feedback_matrix`'s
    ``N`` per kv head. After ``rounds`` rounds (one matrix product each) the result ``x'``
    gives ``round_trip(x') == q`` with ``q`` the fixed point (see the module docstring)
    for every key that reaches it in that many; ``rounds >= head_dim - 1`` reaches it for
    any key. Quantizing ``x'`` with the usual code gives the feedback codes, in fake and
    packed storage alike. Nothing here reads a tensor on the host, so the device never
    waits for it. A NaN or Inf element passes no error on (its row's other elements are
    rounded as if it were zero) and is returned as it came.

    A :class:`RowGrid` as ``round_trip`` rounds in the grid's units (the module docstring):
    the same fixed point up to float32 rounding, in a fraction of the operations per round.
    Given also ``feedback``'s :func:`rounding_order`, a call of :data:`SEQUENTIAL_ROWS` rows or
    more on a CPU (a prefill, eager) rounds the coordinates one by one instead, which reaches the
    fixed point itself for every key whatever ``rounds`` says.
    """
    if rounds < 1:
        raise ValueError(f"query-aware rounding needs at least one round, got {rounds}")
    if isinstance(round_trip, RowGrid):
        levels = round_trip.levels(space)
        rows = levels.numel() // (levels.shape[1] * levels.shape[-1])
        eager_on_cpu = levels.device.type == "cpu" and not torch.compiler.is_compiling()
        if order is not None and eager_on_cpu and rows >= SEQUENTIAL_ROWS:
            moved = _sequential_on_grid(levels, feedback, order, round_trip)
        else:
            moved = _fixed_point_on_grid(levels, feedback, rounds, round_trip)
        return torch.where(torch.isfinite(space), (moved - round_trip.offset) * round_trip.scale, space)
    finite = torch.isfinite(space)
    states = torch.where(finite, space, 0.0)
    matrix = feedback.to(states.device)[None]
    fed = torch.matmul(states, matrix).add_(states)  # x + x N, the same every round: x' = x + x N - q N
    levels = round_trip(states)
    for _ in range(rounds - 1):
        levels = round_trip(fed - torch.matmul(levels, matrix))
    return torch.where(finite, fed - torch.matmul(levels, matrix), space)


def _fixed_point_on_grid(levels: torch.Tensor, feedback: torch.Tensor, rounds: int, grid: RowGrid) -> torch.Tensor:
    """``y + (y - q) N`` after ``rounds`` rounds for ``levels`` ``y`` in units of ``grid``'s step (non-finite: zero).

    ``levels`` ``(batch, kv_heads, seq, head_dim)`` are laid out as ``(kv_heads, batch * seq,
    head_dim)`` (a view at batch 1), so that each round is one batched product with the kv
    heads' own ``N`` with the subtraction fused into it (``baddbmm``) rather than a product
    broadcast over the batch and a subtraction apart; eager, the round then rounds and clamps
    in place, in one of two buffers used in turn, so that a prefill's rounds do not each
    allocate (and fault in) fresh memory. Compiled, the product is written as a sum over the coordinates,
    which inductor fuses with the rounding and clamping into one loop per round (a batched product would be a
    library call of its own each round, for a few rows). Returned in ``levels``' shape, a transposed view.
    """
    batch, heads, seq, dim = levels.shape
    rows = torch.where(torch.isfinite(levels), levels, 0.0).transpose(0, 1).reshape(heads, batch * seq, dim)
    matrix = feedback.to(rows.device)
    fed = torch.baddbmm(rows, rows, matrix)  # y + y N, the same every round: y' = y + y N - q N
    codes = grid.nearest(rows)
    if torch.compiler.is_compiling():  # a graph's buffers are its compiler's to reuse
        for _ in range(rounds - 1):
            codes = grid.nearest(fed - (codes[..., None] * matrix[:, None]).sum(-2))
    else:
        spare = torch.empty_like(codes)
        for _ in range(rounds - 1):
            grid.nearest(torch.baddbmm(fed, codes, matrix, alpha=-1, out=spare), in_place=True)
            codes, spare = spare, codes
    moved = torch.baddbmm(fed, codes, matrix, alpha=-1)
    return moved.view(heads, batch, seq, dim).transpose(0, 1)


def _sequential_on_grid(
    levels: torch.Tensor, feedback: torch.Tensor, order: torch.Tensor, grid: RowGrid
) -> torch.Tensor:
    """The fixed point ``y + (y - q) N`` of ``levels`` ``y`` on ``grid``, one coordinate at a time (non-finite: zero).

    ``levels`` ``(batch, kv_heads, seq, head_dim)`` are laid out as ``(kv_heads, head_dim,
    batch * seq)`` with the coordinates in ``order``, so that one coordinate of every row is
    one contiguous run: coordinate ``k`` takes the rounding errors of the ``k`` before it in one
    small batched product (``N`` is zero below them), then is rounded, and its error is kept for
    those after it. ``head_dim`` steps of a few operations each, and a quarter of one round's
    multiplications in all: for many rows faster than :data:`ROUNDING_ROUNDS` rounds over every
    coordinate, for one row far slower. Returned in ``levels``' shape, a permuted view.
    """
    batch, heads, seq, dim = levels.shape
    finite = torch.where(torch.isfinite(levels), levels, 0.0)
    by_coordinate = finite.permute(1, 3, 0, 2).reshape(heads, dim, batch * seq)
    order = order.to(levels.device)
    rows_in_order = order[:, :, None].expand(heads, dim, batch * seq)
    states = torch.gather(by_coordinate, 1, rows_in_order)
    matrix = feedback.to(levels.device)
    square = order[:, :, None].expand(heads, dim, dim)
    # row k of ``incoming``: what each earlier coordinate's error adds to coordinate k (N's column, in order)
    incoming = torch.gather(torch.gather(matrix, 1, square), 2, order[:, None, :].expand(heads, dim, dim))
    incoming = incoming.transpose(1, 2).contiguous()
    moved = states.clone()
    errors = torch.empty_like(states)
    for k in range(dim):
        if k:
            moved[:, k : k + 1].baddbmm_(incoming[:, k : k + 1, :k], errors[:, :k])
        torch.sub(states[:, k], grid.nearest(moved[:, k]), out=errors[:, k])
    in_place = torch.empty_like(moved).scatter_(1, rows_in_order, moved)
    return in_place.view(heads, dim, batch, seq).permute(2, 0, 3, 1)
