"""Property tests of the INT8 per-channel quantization math (``quantcache.ops.quantize``).

States are ``(batch, kv_heads, seq, head_dim)``; parameters are ``(kv_heads, head_dim)``.
Most tests calibrate on the very tensor they then quantize, so every value lies inside
the calibrated range. Magnitudes stay within +-100: far from zero, a constant channel
under asymmetric quantization needs a zero point beyond int32 (see
``test_asymmetric_constant_channel_far_from_zero``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantcache.cache.stream import StreamQuantizer
from quantcache.ops.packing import pack_codes, unpack_codes
from quantcache.ops.quantize import (
    INT8_MAX,
    INT8_MIN,
    QuantParams,
    channel_minmax,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
)
from quantcache.scheme.args import QuantArgs
from quantcache.scheme.number_formats import FORMATS, QuantDtype

EPS = torch.finfo(torch.float32).eps
MAX_ABS = 100.0
SETTINGS = settings(max_examples=60, deadline=None)


def _states(max_abs: float = MAX_ABS, max_side: int = 4) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=max_side),
        elements=st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False),
    )


def _calibrated(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
    low, high = channel_minmax(x)
    return low, high, compute_qparams(low, high, symmetric=symmetric)


def _per_channel_abs(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per (kv_head, channel), shaped to broadcast against ``x``."""
    return x.abs().amax(dim=(0, 2)).unsqueeze(-2)


def _bcast(param: torch.Tensor) -> torch.Tensor:
    return param.float().unsqueeze(-2)


def _float_slack(*magnitudes: torch.Tensor) -> torch.Tensor:
    """Rounding error of float32 arithmetic on values of these magnitudes (a few ulps)."""
    return 8 * EPS * sum(magnitudes)  # type: ignore[return-value]


symmetric_flag = st.booleans()


# ---------------------------------------------------------------------------------- round trip
@SETTINGS
@given(x=_states(), symmetric=symmetric_flag)
def test_round_trip_error_within_half_a_step(x: np.ndarray, symmetric: bool) -> None:
    states = torch.from_numpy(x)
    _, _, params = _calibrated(states, symmetric)
    restored = fake_quantize(states, params)
    scale = _bcast(params.scale)
    bound = 0.5 * scale * (1 + 1e-5) + _float_slack(states.abs(), _per_channel_abs(states))
    error = (restored - states).abs()
    assert torch.all(error <= bound), f"max excess {(error - bound).max().item()}"


@SETTINGS
@given(x=_states(), symmetric=symmetric_flag)
def test_codes_stay_in_int8_and_dequantize_consistently(x: np.ndarray, symmetric: bool) -> None:
    states = torch.from_numpy(x)
    _, _, params = _calibrated(states, symmetric)
    codes = quantize(states, params)
    assert codes.dtype == torch.int8
    assert codes.shape == states.shape
    expected = ((codes.float() - _bcast(params.zero_point)) * _bcast(params.scale)).to(states.dtype)
    assert torch.equal(dequantize(codes, params, states.dtype), expected)
    assert torch.equal(fake_quantize(states, params), expected)


# ---------------------------------------------------------------------------------- saturation
@SETTINGS
@given(
    x=_states(),
    symmetric=symmetric_flag,
    steps=st.floats(0.0, 1000.0),
    extra=st.floats(0.0, 1e4),
)
def test_values_beyond_the_range_saturate(x: np.ndarray, symmetric: bool, steps: float, extra: float) -> None:
    states = torch.from_numpy(x)
    low, high, params = _calibrated(states, symmetric)
    scale = _bcast(params.scale)
    shape = params.scale.unsqueeze(-2).shape
    top_code = torch.full(shape, INT8_MAX, dtype=torch.int8)
    bottom_code = torch.full(shape, INT8_MIN, dtype=torch.int8)
    # the representable range [dequantize(-128), dequantize(127)] contains [min, max] (up to half a step)
    top_edge = torch.maximum(dequantize(top_code, params), high.unsqueeze(-2))
    bottom_edge = torch.minimum(dequantize(bottom_code, params), low.unsqueeze(-2))
    margin = scale * (2 + steps) + 1e-5 * (top_edge.abs() + bottom_edge.abs()) + extra
    above = (top_edge + margin).expand_as(states).contiguous()
    below = (bottom_edge - margin).expand_as(states).contiguous()

    assert torch.equal(quantize(above, params), top_code.expand_as(states))
    assert torch.equal(quantize(below, params), bottom_code.expand_as(states))
    assert torch.equal(fake_quantize(above, params), dequantize(top_code, params).expand_as(states))
    assert torch.equal(fake_quantize(below, params), dequantize(bottom_code, params).expand_as(states))


def test_saturation_value_is_the_top_code_times_scale() -> None:
    params = compute_qparams(torch.tensor([[-2.0, 0.0]]), torch.tensor([[1.0, 4.0]]), symmetric=True)
    states = torch.tensor([[[[50.0, 50.0], [-50.0, -50.0]]]])  # (1, 1, 2, 2)
    restored = fake_quantize(states, params)
    assert torch.allclose(restored[0, 0, 0], torch.tensor([2.0, 4.0]))  # 127 * max|x| / 127
    assert torch.allclose(restored[0, 0, 1], torch.tensor([-2.0, -4.0]) * 128 / 127)


# ---------------------------------------------------------------------------------- zero
@SETTINGS
@given(x=_states())
def test_zero_is_exact_when_symmetric(x: np.ndarray) -> None:
    states = torch.from_numpy(x)
    _, _, params = _calibrated(states, symmetric=True)
    assert torch.equal(params.zero_point, torch.zeros_like(params.zero_point))
    zeros = torch.zeros_like(states)
    assert torch.equal(quantize(zeros, params), torch.zeros_like(states, dtype=torch.int8))
    restored = fake_quantize(zeros, params)
    assert torch.equal(restored, zeros)
    # negative zero and the values nearest zero too
    assert torch.equal(fake_quantize(-zeros, params).abs(), zeros)


# ---------------------------------------------------------------------------------- asymmetric range
@SETTINGS
@given(x=_states())
def test_asymmetric_range_covers_min_and_max(x: np.ndarray) -> None:
    states = torch.from_numpy(x)
    low, high, params = _calibrated(states, symmetric=False)
    shape = params.scale.unsqueeze(-2).shape
    bottom = dequantize(torch.full(shape, INT8_MIN, dtype=torch.int8), params).squeeze(-2)
    top = dequantize(torch.full(shape, INT8_MAX, dtype=torch.int8), params).squeeze(-2)
    slack = 0.5 * params.scale * (1 + 1e-5) + _float_slack(low.abs(), high.abs())
    assert torch.all(bottom <= low + slack)
    assert torch.all(top >= high - slack)
    # and, unless the eps floor widened it, the range is not wider than [min, max] (scale = (max - min) / 255)
    floored = params.scale > (high - low) / 255.0 * (1 + 1e-6)
    assert torch.all(floored | (top - bottom <= (high - low) + 2 * slack + params.scale))


@SETTINGS
@given(x=_states())
def test_asymmetric_zero_point_formula(x: np.ndarray) -> None:
    states = torch.from_numpy(x)
    low, high, params = _calibrated(states, symmetric=False)
    assert params.zero_point.dtype == torch.int32
    magnitude_floor = torch.clamp(torch.maximum(low.abs(), high.abs()) / 2.0**20, min=EPS)
    expected_scale = torch.maximum((high - low) / 255.0, magnitude_floor)
    assert torch.equal(params.scale, expected_scale)
    assert torch.equal(params.zero_point, (torch.round(-low / expected_scale) - 128).to(torch.int32))


# ---------------------------------------------------------------------------------- idempotence
@SETTINGS
@given(x=_states(), symmetric=symmetric_flag)
def test_fake_quantize_is_idempotent(x: np.ndarray, symmetric: bool) -> None:
    states = torch.from_numpy(x)
    _, _, params = _calibrated(states, symmetric)
    once = fake_quantize(states, params)
    twice = fake_quantize(once, params)
    assert torch.equal(twice, once)
    assert torch.equal(quantize(once, params), quantize(states, params))


# ---------------------------------------------------------------------------------- running statistics
@SETTINGS
@given(
    x=_states(max_side=5),
    seq_cuts=st.lists(st.integers(0, 5), max_size=3),
    batch_cut=st.integers(0, 5),
)
def test_running_minmax_over_chunks_equals_minmax_of_concatenation(
    x: np.ndarray, seq_cuts: list[int], batch_cut: int
) -> None:
    states = torch.from_numpy(x)
    batch, _, seq, _ = states.shape
    quantizer = StreamQuantizer("test")
    chunks = 0
    for rows in (states[: min(batch_cut, batch)], states[min(batch_cut, batch) :]):
        if rows.shape[0] == 0:
            continue
        bounds = sorted({0, seq, *(min(cut, seq) for cut in seq_cuts)})
        for start, stop in itertools.pairwise(bounds):
            quantizer.observe(rows[:, :, start:stop])
            chunks += 1
    quantizer.observe(states[:, :, :0])  # an empty update changes nothing
    assert chunks >= 1
    flat = x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])  # every token of every row
    assert quantizer.min is not None and quantizer.max is not None
    assert np.array_equal(quantizer.min.numpy(), flat.min(axis=0))
    assert np.array_equal(quantizer.max.numpy(), flat.max(axis=0))
    assert quantizer.min.dtype == torch.float32


def test_running_minmax_grows_only_outward() -> None:
    quantizer = StreamQuantizer("test")
    quantizer.observe(torch.tensor([[[[1.0, -1.0]]]]))
    quantizer.observe(torch.tensor([[[[0.5, -3.0]]]]))
    quantizer.observe(torch.tensor([[[[2.0, 0.0]]]]))
    assert quantizer.min is not None and quantizer.max is not None
    assert quantizer.min.tolist() == [[0.5, -3.0]]
    assert quantizer.max.tolist() == [[2.0, 0.0]]


# ---------------------------------------------------------------------------------- eps floor
@SETTINGS
@given(
    value=st.floats(-MAX_ABS, MAX_ABS, width=32, allow_nan=False),
    shape=hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=3),
    symmetric=symmetric_flag,
)
def test_constant_channels_use_the_eps_floor(value: float, shape: tuple[int, ...], symmetric: bool) -> None:
    states = torch.full(shape, value, dtype=torch.float32)
    _, _, params = _calibrated(states, symmetric)
    assert torch.all(torch.isfinite(params.scale)) and torch.all(params.scale >= EPS)
    if symmetric and abs(value) / 127 < EPS:
        assert torch.all(params.scale == EPS)
    if not symmetric:  # a constant channel: the eps floor, or the relative floor far from zero
        assert torch.all(params.scale == max(EPS, float(np.float32(abs(value))) / 2.0**20))
    restored = fake_quantize(states, params)
    assert torch.all(torch.isfinite(restored))
    bound = 0.5 * params.scale.unsqueeze(-2) * (1 + 1e-5) + _float_slack(states.abs(), states.abs())
    assert torch.all((restored - states).abs() <= bound)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_channel_has_no_division_by_zero(symmetric: bool) -> None:
    zeros = torch.zeros(2, 2, 3, 4)
    params = compute_qparams(*channel_minmax(zeros), symmetric=symmetric)
    assert torch.equal(params.scale, torch.full((2, 4), EPS))
    assert torch.equal(params.zero_point, torch.full((2, 4), 0 if symmetric else -128, dtype=torch.int32))
    assert torch.equal(fake_quantize(zeros, params), zeros)
    # a zero channel can still meet non-zero values later: they saturate, finitely
    ones = fake_quantize(torch.ones(1, 2, 1, 4), params)
    assert torch.all(torch.isfinite(ones)) and torch.all(ones > 0)


@pytest.mark.parametrize("value", [300.0, -300.0, 1e5, -3e7])
def test_asymmetric_constant_channel_far_from_zero(value: float) -> None:
    # The relative scale floor keeps the zero point finite and exact; the eps floor alone overflowed int32.
    states = torch.full((1, 1, 2, 2), value)
    params = compute_qparams(*channel_minmax(states), symmetric=False)
    restored = fake_quantize(states, params)
    assert torch.allclose(restored, states, rtol=1e-5)


# ---------------------------------------------------------------------------------- dtypes
@SETTINGS
@given(x=_states(), symmetric=symmetric_flag, dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_inputs_give_fp32_parameters_and_outputs_in_their_dtype(
    x: np.ndarray, symmetric: bool, dtype: torch.dtype
) -> None:
    low_precision = torch.from_numpy(x).to(dtype)
    same_values = low_precision.float()  # the identical values, in float32

    params_low = compute_qparams(*channel_minmax(low_precision), symmetric=symmetric)
    params_fp32 = compute_qparams(*channel_minmax(same_values), symmetric=symmetric)
    assert params_low.scale.dtype == torch.float32
    assert torch.equal(params_low.scale, params_fp32.scale)
    assert torch.equal(params_low.zero_point, params_fp32.zero_point)

    args = QuantArgs(symmetric=symmetric)
    observer_low, observer_fp32 = StreamQuantizer("low", args), StreamQuantizer("fp32", args)
    observer_low.observe(low_precision)
    observer_fp32.observe(same_values)
    observer_low.freeze()
    observer_fp32.freeze()
    assert observer_low.params is not None and observer_fp32.params is not None
    assert torch.equal(observer_low.params.scale, observer_fp32.params.scale)
    assert torch.equal(observer_low.params.zero_point, observer_fp32.params.zero_point)

    restored = fake_quantize(low_precision, params_low)
    assert restored.dtype == dtype
    assert restored.device == low_precision.device
    assert torch.equal(quantize(low_precision, params_low), quantize(same_values, params_fp32))
    assert torch.equal(restored, fake_quantize(same_values, params_fp32).to(dtype))
    assert torch.equal(observer_low.fake_quantize(low_precision), restored)


def test_dequantize_default_dtype_is_float32() -> None:
    params = QuantParams(torch.full((1, 2), 0.5), torch.zeros(1, 2, dtype=torch.int32))
    codes = torch.tensor([[[[1, -2]]]], dtype=torch.int8)
    out = dequantize(codes, params)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[[0.5, -1.0]]]]
    assert dequantize(codes, params, torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- msModelSlim layout
@SETTINGS
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    seq=st.integers(1, 4),
    head_dim=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    symmetric=symmetric_flag,
)
def test_per_channel_layout_matches_msmodelslim_columns(
    batch: int, kv_heads: int, seq: int, head_dim: int, seed: int, symmetric: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    # channel-dependent offsets so a transposed or mis-reshaped layout cannot pass by chance
    offsets = torch.arange(kv_heads * head_dim, dtype=torch.float32).reshape(1, kv_heads, 1, head_dim)
    states = torch.randn(batch, kv_heads, seq, head_dim, generator=generator) + 3 * offsets
    columns = states.transpose(1, 2).reshape(-1, kv_heads * head_dim)

    low, high = channel_minmax(states)
    assert low.shape == high.shape == (kv_heads, head_dim)
    assert torch.equal(low.reshape(-1), columns.amin(dim=0))
    assert torch.equal(high.reshape(-1), columns.amax(dim=0))

    params = compute_qparams(low, high, symmetric=symmetric)
    column_params = compute_qparams(columns.amin(dim=0), columns.amax(dim=0), symmetric=symmetric)
    assert torch.equal(params.scale.reshape(-1), column_params.scale)
    assert torch.equal(params.zero_point.reshape(-1), column_params.zero_point)

    column_codes = torch.clamp(
        torch.round(columns / column_params.scale + column_params.zero_point), INT8_MIN, INT8_MAX
    )
    codes = quantize(states, params)
    assert torch.equal(codes.transpose(1, 2).reshape(-1, kv_heads * head_dim).float(), column_codes)


# ---------------------------------------------------------------------------------- independent transcription
def _reference_fake_quant(x: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The issue's formulas, one float32 scalar at a time, on msModelSlim's 2-D column layout.

    Returns (scale, zero_point, codes, dequantized), the per-channel ones as (kv_heads, head_dim).
    """
    f32 = np.float32
    batch, kv_heads, seq, head_dim = x.shape
    columns = x.transpose(0, 2, 1, 3).reshape(-1, kv_heads * head_dim)
    rows, width = columns.shape
    scale = np.zeros(width, dtype=np.float32)
    zero_point = np.zeros(width, dtype=np.int64)
    for col in range(width):
        lo = f32(min(float(columns[row, col]) for row in range(rows)))
        hi = f32(max(float(columns[row, col]) for row in range(rows)))
        if symmetric:
            lo, hi = min(lo, f32(0.0)), max(hi, f32(0.0))
            s = f32(max(-lo, hi)) / f32(127.0)
            s = max(s, f32(np.finfo(np.float32).eps))
            z = 0
        else:
            s = f32(hi - lo) / f32(255.0)
            s = max(s, f32(np.finfo(np.float32).eps), f32(max(abs(lo), abs(hi))) / f32(2.0**20))
            z = int(np.round(f32(-lo) / s)) - 128
        scale[col], zero_point[col] = s, z
    codes = np.zeros_like(columns, dtype=np.int64)
    restored = np.zeros_like(columns)
    for row in range(rows):
        for col in range(width):
            q = np.round(f32(columns[row, col]) / scale[col] + f32(zero_point[col]))
            q = min(max(int(q), -128), 127)
            codes[row, col] = q
            restored[row, col] = f32(f32(q - zero_point[col]) * scale[col])

    def back(a: np.ndarray) -> np.ndarray:
        return a.reshape(batch, seq, kv_heads, head_dim).transpose(0, 2, 1, 3)

    return scale.reshape(kv_heads, head_dim), zero_point.reshape(kv_heads, head_dim), back(codes), back(restored)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_library_matches_independent_transcription_of_the_formulas(symmetric: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 5, 4)) * rng.uniform(0.1, 4.0, (1, 3, 1, 4)) + rng.normal(0, 2, (1, 3, 1, 4))
    x = x.astype(np.float32)
    x[1, 2, :, 3] = 0.0  # a channel that is zero in one batch row only
    x[:, 0, :, 1] = abs(x[:, 0, :, 1]) + 1.0  # an all-positive channel (asymmetric zero point far from -128)
    ref_scale, ref_zero, ref_codes, ref_restored = _reference_fake_quant(x, symmetric)

    states = torch.from_numpy(x)
    params = compute_qparams(*channel_minmax(states), symmetric=symmetric)
    assert np.array_equal(params.scale.numpy(), ref_scale)
    assert np.array_equal(params.zero_point.numpy().astype(np.int64), ref_zero)
    assert np.array_equal(quantize(states, params).numpy().astype(np.int64), ref_codes)
    assert np.array_equal(fake_quantize(states, params).numpy(), ref_restored)
    if symmetric:
        assert not ref_zero.any()
    else:
        assert ref_zero[0, 1] < -128  # the all-positive channel


def test_known_values_by_hand() -> None:
    # one channel, range [-1, 3]: symmetric scale 3/127; asymmetric scale 4/255, zero point round(63.75) - 128 = -64
    low, high = torch.tensor([[-1.0]]), torch.tensor([[3.0]])
    sym = compute_qparams(low, high, symmetric=True)
    asym = compute_qparams(low, high, symmetric=False)
    assert math.isclose(sym.scale.item(), 3 / 127, rel_tol=1e-7)
    assert sym.zero_point.item() == 0
    assert math.isclose(asym.scale.item(), 4 / 255, rel_tol=1e-7)
    assert asym.zero_point.item() == -64
    x = torch.tensor([[[[-1.0], [0.0], [1.4], [3.0]]]])  # (1, 1, 4, 1)
    assert quantize(x, sym).flatten().tolist() == [-42, 0, 59, 127]
    assert quantize(x, asym).flatten().tolist() == [-128, -64, 25, 127]
    # a strictly positive range is widened to include zero when symmetric, not when asymmetric
    positive = compute_qparams(torch.tensor([[2.0]]), torch.tensor([[4.0]]), symmetric=True)
    assert math.isclose(positive.scale.item(), 4 / 127, rel_tol=1e-7)
    positive_asym = compute_qparams(torch.tensor([[2.0]]), torch.tensor([[4.0]]), symmetric=False)
    assert math.isclose(positive_asym.scale.item(), 2 / 255, rel_tol=1e-7)
    assert positive_asym.zero_point.item() == -255 - 128


def test_channel_minmax_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="batch, kv_heads, seq, head_dim"):
        channel_minmax(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="empty"):
        channel_minmax(torch.zeros(1, 2, 0, 4))


# ---------------------------------------------------------------------------------- ties round half to even
# x / scale + zero_point landing exactly on a half: the state file's ``encoding`` documents round half to even
# (torch.round), and a reader of an exported or packed cache must get the same codes. Half up (floor(v + 0.5)) and
# half away from zero each differ from it on at least two of these.
TIES = [0.5, 1.5, 2.5, -0.5, -1.5]
HALF_TO_EVEN = [0.0, 2.0, 2.0, 0.0, -2.0]
TIE_SCALE = 0.25  # a power of two: x = level * scale and x / scale are exact in float32


def _at_ties(zero_point: int) -> tuple[torch.Tensor, QuantParams]:
    """States ``(1, 1, 5, 1)`` whose ``x / scale + zero_point`` are exactly :data:`TIES`, and those parameters."""
    states = ((torch.tensor(TIES) - zero_point) * TIE_SCALE).reshape(1, 1, -1, 1)
    params = QuantParams(torch.tensor([[TIE_SCALE]]), torch.tensor([[zero_point]], dtype=torch.int32))
    return states, params


@pytest.mark.parametrize("zero_point", [0, 3, -5])
def test_exact_ties_round_half_to_even_when_quantizing_and_fake_quantizing(zero_point: int) -> None:
    states, params = _at_ties(zero_point)
    assert quantize(states, params).flatten().tolist() == HALF_TO_EVEN
    expected = [(level - zero_point) * TIE_SCALE for level in HALF_TO_EVEN]
    assert fake_quantize(states, params).flatten().tolist() == expected


@pytest.mark.parametrize("dtype", [QuantDtype.INT4, QuantDtype.INT3, QuantDtype.INT2])
def test_exact_ties_round_half_to_even_in_packed_codes(dtype: QuantDtype) -> None:
    """The packed path: codes quantized at a narrower format, packed to its width and unpacked."""
    fmt = FORMATS[dtype]
    states, params = _at_ties(0)
    states = torch.cat([states, torch.zeros(1, 1, 3, 1)], dim=2).reshape(1, 1, 1, 8)  # one row of 8 codes
    params = QuantParams(torch.full((1, 8), TIE_SCALE), torch.zeros(1, 8, dtype=torch.int32))
    codes = quantize(states, params, fmt=fmt)
    offset = -int(fmt.qmin)
    unpacked = unpack_codes(pack_codes(codes, fmt.bits, offset), fmt.bits, offset, 8)
    expected = [min(max(level, fmt.qmin), fmt.qmax) for level in HALF_TO_EVEN] + [0.0] * 3
    assert unpacked.flatten().tolist() == expected


@pytest.mark.parametrize(
    ("low", "high", "zero_point"),
    [
        (-62.5 * 0.0625, 192.5 * 0.0625, 62 - 128),  # -min / scale = 62.5: even 62 (half up: 63)
        (1.5 * 0.0625, 256.5 * 0.0625, -2 - 128),  # -min / scale = -1.5: even -2 (half up: -1)
    ],
)
def test_an_asymmetric_zero_point_on_a_tie_rounds_half_to_even(low: float, high: float, zero_point: int) -> None:
    params = compute_qparams(torch.tensor([[low]]), torch.tensor([[high]]), symmetric=False)
    assert params.scale.item() == 0.0625  # (high - low) / 255, exactly
    assert params.zero_point.item() == zero_point
