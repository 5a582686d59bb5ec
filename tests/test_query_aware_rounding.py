"""Query-aware rounding of keys: codes chosen per key for the logits, not per coordinate.

``rounding: query_aware`` on a query-aware key stream rounds each key's coordinates in
turn and feeds every rounding error forward through the calibrated queries' second
moment (RoPE-averaged). It must: be refused where it cannot work, with a message that
says what to set; compute exactly the sequential rounding it stands for (a fixed point
that head_dim - 1 rounds reach for any key), and nearest rounding when queries weigh
coordinates apart; average RoPE as the cache turns keys; cut the logit error it is
built for; keep fake and packed storage bit-exact; round-trip through state files and
refuse altered ones; count its stored bits and its memory.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS
from conftest import random_tokens as _tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import CalibrationError, ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis.state_report import config_text
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.storage_layers import layer_memory
from quantcache.cache.stream import StreamQuantizer
from quantcache.calibration.calibrate import calibrate
from quantcache.errors import QuantStateError
from quantcache.ops import stream_space
from quantcache.ops.bits import stream_bits
from quantcache.ops.granularity import Granularity
from quantcache.ops.observers import QueryAwareCenterObserver, QueryMomentObserver
from quantcache.ops.quantize import PreparedParams, fake_quantize_prepared
from quantcache.ops.rope import RopeTable
from quantcache.ops.rounding import (
    QUERY_MODEL_RANK,
    ROUNDING_DAMPING,
    SEQUENTIAL_ROWS,
    RowGrid,
    feedback_matrix,
    query_model,
    rope_averaged_moment,
    round_with_feedback,
    rounding_order,
)
from quantcache.scheme.args import QuantArgs, QuantScope
from quantcache.state.file import read_state_file, validate_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CENTRED = QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False, center=True, rotation="hadamard")
AWARE = replace(CENTRED, query_aware=True)
ROUNDED = replace(AWARE, rounding="query_aware")
CONFIG = KVQuantConfig(key=ROUNDED, value=CENTRED, pre_rope_keys=True)


# ---------------------------------------------------------------------------- config
def test_rounding_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError, match="needs query_aware: true on the keys"):
        replace(CENTRED, rounding="query_aware")
    with pytest.raises(ConfigError, match=r"qconfig\.rounding: unsupported value 'best'; allowed: 'nearest', "):
        QuantArgs(rounding="best")
    with pytest.raises(ConfigError, match=r"set rope_center: true \(or pre_rope_keys: true\)"):
        KVQuantConfig(key=ROUNDED, value=CENTRED)
    # a per-layer override's keys too
    with pytest.raises(ConfigError, match=r"set rope_center: true \(or pre_rope_keys: true\)"):
        KVQuantConfig(key=AWARE, value=CENTRED, layers=[{"include": ["*0*"], "qconfig": {"key": ROUNDED.to_dict()}}])
    with pytest.raises(ConfigError, match="only keys"):  # a flat setting reaches the values, which have no queries
        KVQuantConfig(**{**ROUNDED.to_dict(full=True), "pre_rope_keys": True})


def test_rounding_round_trips_through_yaml_and_reads_in_reports() -> None:
    assert KVQuantConfig.from_yaml(CONFIG.to_yaml()) == CONFIG
    assert "rounding: query_aware" in CONFIG.to_yaml()
    assert "rounding" not in AWARE.to_dict() and AWARE.to_dict(full=True)["rounding"] == "nearest"
    assert "query-aware rounding" in config_text(CONFIG)
    assert "rounding" not in config_text(KVQuantConfig(key=AWARE, value=CENTRED))


# ---------------------------------------------------------------------------- the math
def _weight(generator: torch.Generator, heads: int, dim: int, coupling: float) -> torch.Tensor:
    """A random ``(heads, dim, dim)`` error weight: ``coupling`` scales the off-diagonal part."""
    factor = torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64)
    dense = factor @ factor.mT / dim
    return torch.diag_embed(torch.rand(heads, dim, generator=generator, dtype=torch.float64) + 0.1) + coupling * dense


def _round_trip(levels: int) -> Any:
    return lambda x: torch.clamp(torch.round(x), -levels, levels - 1)


def _sequential(x: torch.Tensor, weight: torch.Tensor, round_trip: Any) -> torch.Tensor:
    """The rounding spelled out: coordinates in falling order of the damped ``diag(H)``, each error fed forward."""
    dim = weight.shape[-1]
    damped = weight + ROUNDING_DAMPING * weight.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(dim)
    result = torch.empty_like(x)
    for head in range(weight.shape[0]):
        order = torch.argsort(damped[head].diagonal(), descending=True, stable=True)
        upper = torch.linalg.cholesky(torch.linalg.inv(damped[head][order][:, order]), upper=True)
        rows = x[:, head][..., order].double().clone()
        for i in range(dim):
            code = round_trip(rows[..., i])
            error = (rows[..., i] - code) / upper[i, i]
            rows[..., i + 1 :] -= error[..., None] * upper[i, i + 1 :]
            result[:, head, :, order[i]] = code.to(result.dtype)
    return result


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 8]), st.integers(1, 9), st.floats(0.0, 4.0))
def test_the_fixed_point_is_the_sequential_rounding(seed: int, levels: int, dim: int, coupling: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = _weight(generator, 2, dim, coupling)
    states = torch.randn(1, 2, 7, dim, generator=generator) * levels
    round_trip = _round_trip(levels)
    moved = round_with_feedback(states, round_trip, feedback_matrix(weight), max(dim - 1, 1))
    codes = round_trip(moved)
    assert torch.equal(codes, _sequential(states, weight, round_trip))
    feedback = feedback_matrix(weight)
    assert torch.equal(round_trip(states + (states - codes) @ feedback[None]), codes)  # a fixed point


def _row_grid(generator: torch.Generator, grid: str, shape: tuple[int, ...]) -> RowGrid:
    """A grid with a random step per row: symmetric int4, asymmetric int3 (a zero point per row), or mid-rise int2."""
    scale = torch.exp2(torch.randn(*shape[:-1], 1, generator=generator))
    if grid == "int3-asymmetric":
        return RowGrid(scale, torch.randint(-4, 4, scale.shape, generator=generator).float(), -4.0, 3.0)
    if grid == "int2-mid-rise":
        return RowGrid(scale, -0.5, -2.0, 1.0)
    return RowGrid(scale, 0.0, -8.0, 7.0)


_GRID_CASES = (
    st.integers(0, 2**31 - 1),
    st.sampled_from(["int4", "int3-asymmetric", "int2-mid-rise"]),
    st.integers(1, 9),
    st.floats(0.0, 4.0),
)
"""Seed, grid, head_dim and coupling of the error weight."""


def _sequential_on(grid: RowGrid, states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`_sequential` on ``grid``, head by head: the reference rounds one coordinate of every row at a time,
    so each head's steps are passed as ``(batch, seq)``."""
    heads = []
    for head in range(states.shape[1]):
        offset = grid.offset[:, head, :, 0] if isinstance(grid.offset, torch.Tensor) else grid.offset
        per_coordinate = grid._replace(scale=grid.scale[:, head, :, 0], offset=offset)
        heads.append(_sequential(states[:, head : head + 1], weight[head : head + 1], per_coordinate))
    return torch.cat(heads, 1)


@settings(max_examples=40, deadline=None)
@given(*_GRID_CASES)
def test_rounding_in_units_of_a_row_step_reaches_the_sequential_fixed_point(
    seed: int, grid_kind: str, dim: int, coupling: float
) -> None:
    """A :class:`RowGrid` rounds in its units: its codes are the sequential rounding's in the states' own units."""
    generator = torch.Generator().manual_seed(seed)
    weight = _weight(generator, 2, dim, coupling)
    states = torch.randn(1, 2, 7, dim, generator=generator) * 3
    grid = _row_grid(generator, grid_kind, tuple(states.shape))
    states = states * grid.scale
    moved = round_with_feedback(states, grid, feedback_matrix(weight), max(dim - 1, 1))
    assert torch.equal(grid(moved), _sequential_on(grid, states, weight))


@settings(max_examples=25, deadline=None)
@given(*_GRID_CASES, st.integers(1, 2))
def test_many_rows_round_one_coordinate_at_a_time_to_the_fixed_point(
    seed: int, grid_kind: str, dim: int, coupling: float, batch: int
) -> None:
    """Given the order, a call of ``SEQUENTIAL_ROWS`` rows or more reaches the sequential rounding itself, whatever
    the rounds (here one), in every batch row and head; NaN and Inf elements pass through and pass no error on."""
    generator = torch.Generator().manual_seed(seed)
    weight = _weight(generator, 2, dim, coupling)
    seq = -(-SEQUENTIAL_ROWS // batch)
    grid = _row_grid(generator, grid_kind, (batch, 2, seq, dim))
    states = torch.randn(batch, 2, seq, dim, generator=generator) * 3 * grid.scale
    spoiled = states.clone()
    spoiled[0, 1, 3, 0], spoiled[-1, 0, 7, dim - 1] = float("nan"), float("-inf")
    moved = round_with_feedback(spoiled, grid, feedback_matrix(weight), 1, order=rounding_order(weight))
    assert torch.isnan(moved[0, 1, 3, 0]) and moved[-1, 0, 7, dim - 1] == float("-inf")
    at_level_zero = torch.where(torch.isfinite(spoiled), spoiled, -grid.offset * grid.scale)  # as a grid rounds them
    finite = torch.isfinite(spoiled)
    assert torch.equal(grid(moved)[finite], _sequential_on(grid, at_level_zero, weight)[finite])


def _strongly_coupled_keys() -> tuple[torch.Tensor, RowGrid, torch.Tensor, torch.Tensor]:
    """``SEQUENTIAL_ROWS`` keys on an integer grid, and the feedback matrix and order of a weight whose fixed point
    takes more than one round to reach: ``(states, grid, feedback, order)``."""
    generator = torch.Generator().manual_seed(11)
    weight = _weight(generator, 2, HEAD_DIM, 4.0)
    states = torch.randn(1, 2, SEQUENTIAL_ROWS, HEAD_DIM, generator=generator) * 3
    grid = RowGrid(torch.ones(1, 2, SEQUENTIAL_ROWS, 1), 0.0, -8.0, 7.0)
    return states, grid, feedback_matrix(weight), rounding_order(weight)


def test_fewer_rows_than_the_threshold_run_the_rounds_they_are_given() -> None:
    """One row short of ``SEQUENTIAL_ROWS``, one round is one round: the codes differ from the fixed point's
    (this weight needs more), and equal what one round gives without the order."""
    states, grid, feedback, order = _strongly_coupled_keys()
    fixed_point = grid(round_with_feedback(states, grid, feedback, 1, order=order))
    short = (states[:, :, 1:], grid._replace(scale=grid.scale[:, :, 1:]))
    one_round = short[1](round_with_feedback(*short, feedback, 1, order=order))
    assert torch.equal(one_round, short[1](round_with_feedback(*short, feedback, 1)))
    assert not torch.equal(one_round, fixed_point[:, :, 1:])
    assert torch.equal(fixed_point, grid(round_with_feedback(states, grid, feedback, HEAD_DIM - 1)))


def test_a_prefill_rounds_its_keys_as_the_same_keys_given_a_few_at_a_time() -> None:
    """A stream's codes for a prefill of ``SEQUENTIAL_ROWS`` keys (one by one, to the fixed point) are those of the
    same keys in calls of a few rows (the rounds), where the rounds reach the fixed point."""
    generator = torch.Generator().manual_seed(4)
    stream = _frozen_rounding_stream(replace(ROUNDED, symmetric=True), generator)
    states = torch.randn(2, KV_HEADS, SEQUENTIAL_ROWS // 2, HEAD_DIM, generator=generator) * 2
    at_once = stream.encode(states)
    in_chunks = torch.cat(
        [stream.encode(states[:, :, start : start + 16]) for start in range(0, states.shape[2], 16)], 2
    )
    assert torch.equal(at_once, in_chunks)


def test_a_row_grid_quantizes_as_the_streams_round_trip_does() -> None:
    """Called, a :class:`RowGrid` is the format's quantize-dequantize with those parameters, bit for bit."""
    generator = torch.Generator().manual_seed(5)
    states = torch.randn(2, KV_HEADS, 6, HEAD_DIM, generator=generator) * 4
    fmt = QuantArgs(dtype="int3").format
    for grid in (_row_grid(generator, "int3-asymmetric", tuple(states.shape)), RowGrid(torch.tensor(0.25), 0.0, -4, 3)):
        zero_point = grid.offset if isinstance(grid.offset, torch.Tensor) else torch.zeros_like(grid.scale)
        prepared = PreparedParams(grid.scale.expand(*states.shape[:-1], 1), zero_point.expand(*states.shape[:-1], 1))
        expected = fake_quantize_prepared(states, prepared, Granularity(QuantScope.PER_TOKEN, dynamic=True), fmt)
        assert torch.equal(grid(states), expected)


def _frozen_rounding_stream(args: QuantArgs, generator: torch.Generator) -> StreamQuantizer:
    """A key stream of ``args`` frozen with a random query model and channel scales, centred on zero."""
    stream = StreamQuantizer("layer 0 keys", args, (KV_HEADS, HEAD_DIM))
    model = (
        torch.rand(KV_HEADS, HEAD_DIM, generator=generator),
        torch.randn(KV_HEADS, HEAD_DIM, 1, generator=generator),
    )
    stream.freeze_centered(
        torch.zeros(KV_HEADS, HEAD_DIM), torch.rand(KV_HEADS, HEAD_DIM, generator=generator) + 0.5, model
    )
    stream.space.rope_frequencies = 1.0 / (100.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    return stream


@pytest.mark.parametrize(
    ("scope", "dtype", "in_units"),
    [
        ("per_token", "int4", True),
        ("per_token", "int2", True),
        ("group", "int4", False),
        ("per_token", "fp8_e4m3", False),
    ],
)
def test_streams_round_in_units_of_their_step_where_a_row_shares_one(scope: str, dtype: str, in_units: bool) -> None:
    """Per-token integer streams hand their grid to the rounding; groups (a step per group) and float8 (no uniform
    grid) hand their quantize-dequantize; both reach the same codes as the general path."""
    group = {"group_size": 16} if scope == "group" else {}
    args = replace(ROUNDED, dtype=dtype, scope=scope, symmetric=dtype == "fp8_e4m3", **group)
    generator = torch.Generator().manual_seed(8)
    stream = _frozen_rounding_stream(args, generator)
    states = torch.randn(2, KV_HEADS, 64, HEAD_DIM, generator=generator) * 3
    given_types: list[type] = []

    def recording(space: torch.Tensor, round_trip: Any, *rest: Any, **options: Any) -> torch.Tensor:
        given_types.append(type(round_trip))
        return round_with_feedback(space, round_trip, *rest, **options)

    def general(space: torch.Tensor, round_trip: Any, *rest: Any, **options: Any) -> torch.Tensor:
        # a plain callable: the rounds run in the states' own units
        return round_with_feedback(space, lambda x: round_trip(x), *rest, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream_space, "round_with_feedback", recording)
        rows = stream.encode(states)
        patch.setattr(stream_space, "round_with_feedback", general)
        general_rows = stream.encode(states)
    assert given_types == [RowGrid if in_units else type(partial(int))]
    agree = (rows == general_rows).float().mean()
    assert agree >= 0.999  # the same fixed point up to float32 rounding of near ties


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 16))
def test_queries_that_weigh_coordinates_apart_leave_nearest_rounding(seed: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.diag_embed(torch.rand(3, dim, generator=generator, dtype=torch.float64) + 1e-3)
    feedback = feedback_matrix(weight)
    assert not bool(feedback.any())
    states = torch.randn(2, 3, 5, dim, generator=generator) * 4
    assert torch.equal(round_with_feedback(states, _round_trip(8), feedback), states)


def test_feedback_is_strictly_triangular_in_the_order_of_falling_weight() -> None:
    weight = _weight(torch.Generator().manual_seed(1), 2, 12, 2.0)
    feedback = feedback_matrix(weight)
    for head in range(2):
        order = torch.argsort(weight[head].diagonal(), descending=True, stable=True)
        ordered = feedback[head][order][:, order]
        assert torch.equal(ordered, ordered.triu(diagonal=1)) and bool(ordered.any())


def test_feedback_cuts_the_weighted_error_of_rounding() -> None:
    generator = torch.Generator().manual_seed(2)
    weight = _weight(generator, 2, 16, 3.0)
    states = torch.randn(1, 2, 512, 16, generator=generator) * 3
    round_trip = _round_trip(8)

    def cost(error: torch.Tensor) -> float:
        return float(torch.einsum("bhsi,hij,bhsj->", error.double(), weight, error.double()))

    nearest = cost(states - round_trip(states))
    fed = cost(states - round_trip(round_with_feedback(states, round_trip, feedback_matrix(weight))))
    assert fed < 0.75 * nearest


def test_non_finite_elements_pass_through_and_pass_no_error_on() -> None:
    weight = _weight(torch.Generator().manual_seed(3), 1, 8, 2.0)
    states = torch.randn(1, 1, 4, 8) * 3
    spoiled = states.clone()
    spoiled[0, 0, 1, 2], spoiled[0, 0, 2, 5] = float("nan"), float("inf")
    feedback = feedback_matrix(weight)
    moved = round_with_feedback(spoiled, _round_trip(8), feedback)
    assert torch.isnan(moved[0, 0, 1, 2]) and moved[0, 0, 2, 5] == float("inf")
    assert int(torch.isfinite(moved).sum()) == 30
    zeroed = torch.where(torch.isfinite(spoiled), spoiled, 0.0)
    expected = round_with_feedback(zeroed, _round_trip(8), feedback)
    finite = torch.isfinite(spoiled)
    assert torch.equal(moved[finite], expected[finite])
    assert torch.equal(moved[0, 0, [0, 3]], round_with_feedback(states, _round_trip(8), feedback)[0, 0, [0, 3]])


@pytest.mark.parametrize("rotary", [16, 8])
def test_rope_average_is_the_turn_the_cache_applies_averaged_over_causal_distances(rotary: int) -> None:
    """Checked against the cache's own RoPE table turning basis vectors, partial RoPE included."""
    generator = torch.Generator().manual_seed(4)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    diag, factor = torch.rand(2, 16, generator=generator), torch.randn(2, 16, 2, generator=generator)
    horizon = 40
    averaged = rope_averaged_moment(diag, factor, inv_freq, horizon)
    moment = torch.diag_embed(diag.double()) + factor.double() @ factor.double().mT
    table = RopeTable(inv_freq)
    expected = torch.zeros(2, 16, 16, dtype=torch.float64)
    for distance in range(horizon):
        # Each basis vector as its own head at one position: row i is (R e_i)^T, so the stack is R^T.
        turn = table.rotate(torch.eye(16)[None, :, None, :], distance)[0, :, 0, :].double().T
        expected += (horizon - distance) * (turn @ moment @ turn.T)
    expected /= sum(range(1, horizon + 1))
    torch.testing.assert_close(averaged, expected, rtol=1e-6, atol=1e-6)


def test_query_model_keeps_the_diagonal_and_the_leading_direction() -> None:
    generator = torch.Generator().manual_seed(5)
    direction = torch.randn(2, 6, 1, generator=generator)
    noise = torch.rand(2, 6, generator=generator)
    moment = 10 * direction @ direction.mT + torch.diag_embed(noise)
    diag, factor = query_model(moment)
    assert factor.shape == (2, 6, QUERY_MODEL_RANK) and diag.shape == (2, 6)
    modelled = torch.diag_embed(diag) + factor @ factor.mT
    torch.testing.assert_close(modelled.diagonal(dim1=-2, dim2=-1), moment.diagonal(dim1=-2, dim2=-1))
    assert torch.equal(query_model(-moment * -1)[1], factor)  # reproducible: the largest entry is positive
    assert bool((torch.gather(factor, 1, factor.abs().argmax(dim=1, keepdim=True)) > 0).all())
    exact_diag, exact_factor = query_model(direction @ direction.mT)  # a rank-one moment is modelled exactly
    torch.testing.assert_close(exact_factor @ exact_factor.mT, direction @ direction.mT, rtol=1e-5, atol=1e-5)
    assert float(exact_diag.abs().max()) < 1e-5


def test_the_space_weighs_an_error_by_the_logit_error_it_makes_in_the_models_space() -> None:
    """``H`` in the quantizer's space is ``J M J^T`` with ``J`` the linear part of the way back (rows: where each
    basis error lands among the keys), found here by sending basis vectors through ``inverse``."""
    generator = torch.Generator().manual_seed(8)
    stream = StreamQuantizer("layer 0 keys", ROUNDED, (KV_HEADS, HEAD_DIM))
    center = torch.randn(KV_HEADS, HEAD_DIM, generator=generator)
    scale = torch.rand(KV_HEADS, HEAD_DIM, generator=generator) + 0.5
    model = (
        torch.rand(KV_HEADS, HEAD_DIM, generator=generator),
        torch.randn(KV_HEADS, HEAD_DIM, 1, generator=generator),
    )
    stream.freeze_centered(center, scale, model)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    stream.space.rope_frequencies = inv_freq
    basis = torch.eye(HEAD_DIM)[None, None].expand(1, KV_HEADS, HEAD_DIM, HEAD_DIM)
    way_back = (stream.space.inverse(basis, torch.float64) - stream.space.inverse(basis * 0, torch.float64))[0]
    weight = way_back @ rope_averaged_moment(*model, inv_freq) @ way_back.mT
    matrix, order = stream.space.feedback_on(torch.device("cpu"))
    torch.testing.assert_close(matrix, feedback_matrix(weight), rtol=1e-4, atol=1e-5)
    assert torch.equal(order, rounding_order(weight))


# ---------------------------------------------------------------------------- statistics
def test_observer_sums_the_query_moment_of_each_kv_head_and_leaves_padding_out() -> None:
    observer = QueryMomentObserver(ROUNDED)
    keys, queries = torch.randn(2, 2, 5, 4), torch.randn(2, 6, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    observer.merge(observer.measure(keys, mask))
    observer.merge(observer.measure_queries(queries, 2, mask))
    stats = observer.statistics
    kept = torch.where(mask[:, None, :, None], queries, 0.0).reshape(2, 2, 3, 5, 4)
    expected = torch.einsum("bgtsi,bgtsj->gij", kept, kept)
    torch.testing.assert_close(stats["query_moment_sum"], expected)
    torch.testing.assert_close(stats["query_moment_sum"].diagonal(dim1=-2, dim2=-1), stats["query_square_sum"])
    torch.testing.assert_close(observer.query_moment(), expected / 8)
    assert set(QueryMomentObserver.fields) == {*QueryAwareCenterObserver.fields, "query_moment_sum"}


def test_calibration_freezes_the_query_model_its_moments_imply(llama: PreTrainedModel) -> None:
    cache = calibrate(llama, _tokens(2, 12, seed=6), quant_config=CONFIG, batch_size=2, progress=False).new_cache()
    for quantizer in cache.quantizers:
        key = quantizer.key
        assert isinstance(key.observer, QueryMomentObserver)
        expected = query_model(key.observer.query_moment())
        assert key.space.query_model is not None
        assert all(torch.equal(a, b) for a, b in zip(key.space.query_model, expected, strict=True))
        assert key.space.rope_frequencies is not None and quantizer.value.space.query_model is None


def test_freezing_needs_the_query_model_and_refuses_one_it_cannot_use() -> None:
    stream = StreamQuantizer("layer 0 keys", ROUNDED, (KV_HEADS, HEAD_DIM))
    center, scale = torch.zeros(KV_HEADS, HEAD_DIM), torch.ones(KV_HEADS, HEAD_DIM)
    with pytest.raises(CalibrationError, match="layer 0 keys: a query model is what rounding: query_aware needs"):
        stream.freeze_centered(center, scale)
    plain = StreamQuantizer("layer 0 keys", AWARE, (KV_HEADS, HEAD_DIM))
    model = (torch.ones(KV_HEADS, HEAD_DIM), torch.ones(KV_HEADS, HEAD_DIM, 1))
    with pytest.raises(CalibrationError, match="a query model is what rounding: query_aware needs, and only it"):
        plain.freeze_centered(center, scale, model)
    stream.freeze_centered(center, scale, model)  # frozen, but no RoPE frequencies: outside a cache
    with pytest.raises(ValueError, match="needs the query model, channel scales and RoPE frequencies"):
        stream.fake_quantize(torch.randn(1, KV_HEADS, 2, HEAD_DIM))


# ---------------------------------------------------------------------------- what it buys
def test_rounding_cuts_the_logit_error_of_correlated_queries() -> None:
    """Queries that all look along one direction: feeding errors forward moves them off it, so the logit error
    ``q . (k - k')`` falls, at the same codes' width, while the keys' own error rises."""
    generator = torch.Generator().manual_seed(7)
    direction = torch.randn(HEAD_DIM, generator=generator)
    keys = torch.randn(1, KV_HEADS, 256, HEAD_DIM, generator=generator)
    queries = direction * torch.randn(1, 2 * KV_HEADS, 256, 1, generator=generator) + 0.05 * torch.randn(
        1, 2 * KV_HEADS, 256, HEAD_DIM, generator=generator
    )
    errors = {}
    for args in (AWARE, ROUNDED):
        stream = StreamQuantizer("layer 0 keys", args, (KV_HEADS, HEAD_DIM))
        stream.space.rope_frequencies = torch.zeros(HEAD_DIM // 2)  # no turn: the queries' own directions
        stream.merge(stream.measure(keys))
        stream.merge(stream.measure_queries(queries))
        stream.freeze()
        error = stream.fake_quantize(keys) - keys
        errors[args.rounding.value] = (float((error @ direction).square().sum()), float(error.square().sum()))
    assert errors["query_aware"][0] < 0.5 * errors["nearest"][0]
    assert errors["query_aware"][1] > errors["nearest"][1]


# ---------------------------------------------------------------------------- state, storage, bits
def test_the_query_model_round_trips_and_alterations_are_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    state = calibrate(llama, _tokens(2, 8, seed=3), quant_config=CONFIG, progress=False).new_cache().state_dict()
    saved = {k.rsplit(".", 1)[1] for k in state if ".key." in k} - set(QueryMomentObserver.fields)
    assert saved == {"center", "channel_scale", "query_diag", "query_factor"}
    cache = QuantizedCalibratingCache(llama, CONFIG)
    cache.load_state_dict(state)
    path = cache.save(tmp_path / "rounded.safetensors")
    loaded = QuantizedCalibratingCache.from_file(path, llama)
    ids = _tokens(1, 9, seed=4)
    with torch.no_grad():
        expected = llama(ids, **{CACHE_KEYWORD: cache.empty_copy()}).logits
        assert torch.equal(llama(ids, **{CACHE_KEYWORD: loaded}).logits, expected)
        nearest = QuantizedCalibratingCache(llama, replace(CONFIG, key=AWARE))
        rounding_fields = ("query_moment_sum", "query_diag", "query_factor")
        nearest.load_state_dict({k: v for k, v in state.items() if not k.endswith(rounding_fields)})
        assert not torch.equal(llama(ids, **{CACHE_KEYWORD: nearest}).logits, expected)  # the rounding did something
    stored = read_state_file(path)
    assert validate_state(stored) == []
    for field, change in (("query_diag", 1.01), ("query_factor", 1.01)):
        bad = {**state, f"layers.0.key.{field}": state[f"layers.0.key.{field}"] * change}
        altered = type(stored)(**{**stored.__dict__, "tensors": bad})
        assert any("differ from what its query_moment_sum implies" in p for p in validate_state(altered))
        with pytest.raises(QuantStateError, match="query_diag/query_factor differ"):
            QuantizedCalibratingCache(llama, CONFIG).load_state_dict(bad)
    flipped = {**state, "layers.0.key.query_factor": -state["layers.0.key.query_factor"]}
    QuantizedCalibratingCache(llama, CONFIG).load_state_dict(flipped)  # the same model, the other sign
    wrong = {**state, "layers.0.key.query_factor": torch.ones(KV_HEADS, HEAD_DIM, 2)}
    with pytest.raises(QuantStateError, match="tensors have shapes"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(wrong)
    negative = {**state, "layers.0.key.query_diag": -state["layers.0.key.query_diag"] - 1}
    with pytest.raises(QuantStateError, match="query_diag holds negative values"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(negative)
    missing = {k: v for k, v in state.items() if k != "layers.1.key.query_factor"}
    with pytest.raises(QuantStateError, match="query_factor"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(missing)
    imported = {k: v for k, v in state.items() if k.endswith(("center", "channel_scale", "query_diag", "query_factor"))}
    with pytest.raises(QuantStateError, match="frozen parameters without the statistics they were calibrated from"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(imported)  # what a save would refuse
    QuantizedCalibratingCache(llama, CONFIG).load_state_dict(imported, origin="imported from test")  # another tool's


@pytest.mark.parametrize("group_size", [None, 8, 6])
@pytest.mark.parametrize("dtype", ["int4", "int2", "int2-mid-rise", "fp8_e4m3"])
def test_packed_rows_decode_to_what_fake_quantization_gives(group_size: int | None, dtype: str) -> None:
    """Per token or per group (a ragged last one too), integer (on either grid) or float8 codes: the feedback moves
    the states before the one quantization both storages share, so their results agree bit for bit, NaN and Inf
    included."""
    scope = {"scope": "group", "group_size": group_size} if group_size else {"scope": "per_token"}
    mid_rise = dtype.endswith("mid-rise")
    grid = {"symmetric": True, "zero_level": False} if mid_rise else {"symmetric": dtype.startswith("fp8")}
    args = replace(ROUNDED, dtype=dtype.removesuffix("-mid-rise"), **grid, **scope)
    generator = torch.Generator().manual_seed(9)
    stream = _frozen_rounding_stream(args, generator)
    states = torch.randn(2, KV_HEADS, 5, HEAD_DIM, generator=generator) * 3
    states[0, 1, 2, 3], states[1, 0, 4, 0] = float("nan"), float("inf")
    fake, packed = stream.fake_quantize(states), stream.decode(stream.encode(states), states.dtype)
    finite = torch.isfinite(states).all(dim=-1, keepdim=True).expand_as(states)
    assert torch.equal(fake[finite], packed[finite])
    nearest = StreamQuantizer("layer 0 keys", replace(args, rounding="nearest"), (KV_HEADS, HEAD_DIM))
    nearest.freeze_centered(stream.center, stream.channel_scale)
    assert not torch.equal(nearest.fake_quantize(states)[finite], fake[finite])  # the rounding did something


def test_bits_count_the_query_model_and_memory_the_feedback(llama: PreTrainedModel) -> None:
    for seq_len in (16, 1024):
        extra = stream_bits(ROUNDED, KV_HEADS, HEAD_DIM, seq_len) - stream_bits(AWARE, KV_HEADS, HEAD_DIM, seq_len)
        assert extra == pytest.approx(32 * (1 + QUERY_MODEL_RANK) / seq_len)
    cache = calibrate(llama, _tokens(1, 8, seed=3), quant_config=CONFIG, progress=False).new_cache(storage="packed")
    plain_config = replace(CONFIG, key=AWARE)
    plain = calibrate(llama, _tokens(1, 8, seed=3), quant_config=plain_config, progress=False).new_cache(
        storage="packed"
    )
    with torch.no_grad():
        for each in (cache, plain):
            llama(_tokens(1, 5, seed=8), **{CACHE_KEYWORD: each})
    model_bytes = KV_HEADS * HEAD_DIM * (1 + QUERY_MODEL_RANK) * 4
    feedback_bytes = KV_HEADS * HEAD_DIM * HEAD_DIM * 4 + KV_HEADS * HEAD_DIM * 8  # the matrix and the order
    for mine, theirs in zip(cache.layers, plain.layers, strict=False):
        assert layer_memory(mine)["parameters"] - layer_memory(theirs)["parameters"] == model_bytes
        assert (layer_memory(mine)["encoder"], layer_memory(theirs)["encoder"]) == (feedback_bytes, 0)
    report = cache.memory_report()[0]
    assert report["total"] == sum(
        report[part] for part in ("codes", "parameters", "full_precision", "reserved", "encoder")
    )


def test_a_compiled_graph_runs_the_rounds_it_is_given_however_many_rows() -> None:
    """Traced by ``torch.compile``, a call of ``SEQUENTIAL_ROWS`` rows with the order runs its rounds (a loop over
    the coordinates would unroll into ``head_dim`` steps per graph): one round's codes, not the fixed point's."""
    states, grid, feedback, order = _strongly_coupled_keys()
    eager = grid(round_with_feedback(states, grid, feedback, 1, order=order))
    compiled = torch.compile(lambda s: round_with_feedback(s, grid, feedback, 1, order=order), backend="eager")
    traced = grid(compiled(states))
    assert torch.equal(traced, grid(round_with_feedback(states, grid, feedback, 1)))
    assert not torch.equal(traced, eager)


@pytest.mark.parametrize(("device", "sequential"), [("cpu", True), ("meta", False)])
def test_only_a_cpu_rounds_one_coordinate_at_a_time(
    device: str, sequential: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the CPU (here the meta device, where a GPU's path runs without one) a call of ``SEQUENTIAL_ROWS`` rows
    runs the rounds: ``head_dim`` small steps would each be a kernel launch there."""
    from quantcache.ops import rounding

    calls: list[int] = []
    sequential_on_grid = rounding._sequential_on_grid

    def spy(levels: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(int(levels.shape[2]))
        return sequential_on_grid(levels, *args)

    monkeypatch.setattr(rounding, "_sequential_on_grid", spy)
    generator = torch.Generator().manual_seed(2)
    weight = _weight(generator, 2, HEAD_DIM, 1.0)
    states = torch.randn(1, 2, SEQUENTIAL_ROWS, HEAD_DIM, generator=generator).to(device)
    grid = RowGrid(torch.ones(1, 2, SEQUENTIAL_ROWS, 1, device=device), 0.0, -8.0, 7.0)
    moved = round_with_feedback(states, grid, feedback_matrix(weight), 3, order=rounding_order(weight))
    assert moved.shape == states.shape and moved.device.type == device
    assert calls == ([SEQUENTIAL_ROWS] if sequential else [])
