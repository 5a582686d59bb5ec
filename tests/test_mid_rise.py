"""The mid-rise grid (``zero_level: false``): the math, the rows, the count and the errors.

A symmetric grid with a zero level wastes a code at low widths (int2: three of its four
codes are used) and an asymmetric one stores a zero point. The mid-rise grid puts its
levels at ``(code + 1/2) * scale``: symmetric about zero, every code used, no zero point
to store. Rows and fake quantization agree bit for bit (``test_packed.py`` runs its schemes
through both); this module pins the grid itself.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import frozen_cache_states
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis.state_report import config_text
from quantcache.ops.bits import stream_bits
from quantcache.ops.granularity import Granularity
from quantcache.ops.quantize import dynamic_qparams, fake_quantize
from quantcache.scheme.args import QuantArgs
from quantcache.scheme.number_formats import ScaleFormat, ZeroPointFormat, format_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = settings(max_examples=80, deadline=None)
DTYPES = ["int8", "int4", "int3", "int2"]
MID_RISE = {"scope": "per_token", "dynamic": True, "zero_level": False}
PER_TOKEN = Granularity.of(QuantArgs(scope="per_token", dynamic=True))
GROUP_OF_4 = Granularity.of(QuantArgs(scope="group", group_size=4, dynamic=True))


def _states(max_abs: float = 100.0) -> st.SearchStrategy[np.ndarray]:
    """``(batch, kv_heads, seq, 8)`` finite states of any signs."""
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4).map(lambda s: (*s[:3], 8)),
        elements=st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False),
    )


def _mid_rise(states: torch.Tensor, dtype: str, granularity: Granularity = PER_TOKEN, **options: object) -> tuple:
    fmt = format_spec(dtype)
    return fmt, dynamic_qparams(states, granularity, symmetric=True, fmt=fmt, zero_level=False, **options)


# ---------------------------------------------------------------------------- the math
@SETTINGS
@given(_states(), st.sampled_from(DTYPES), st.sampled_from(["float16", "log8"]), st.booleans())
def test_every_element_is_within_half_a_step_of_a_level_at_an_odd_half_step(
    x: np.ndarray, dtype: str, scale_format: str, grouped: bool
) -> None:
    """Without the ``mse`` search nothing clips (the extreme lies on the outer edge of the outermost level's
    interval), and every value comes back as ``(code + 1/2) * scale`` with the code in the format's range."""
    states = torch.from_numpy(x)
    granularity = GROUP_OF_4 if grouped else PER_TOKEN
    fmt, params = _mid_rise(states, dtype, granularity, scale_format=ScaleFormat(scale_format))
    assert (params.zero_point == -0.5).all()
    restored = fake_quantize(states, params, granularity, fmt)
    step = granularity.ungrouped(params.scale.expand_as(granularity.grouped(states)), states.shape[-1])
    assert ((restored - states).abs() <= step * 0.5 * (1 + 1e-5) + 1e-30).all()
    codes = restored / step - 0.5
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert (codes.round() >= fmt.qmin).all() and (codes.round() <= fmt.qmax).all()


@SETTINGS
@given(_states(), st.sampled_from(DTYPES))
def test_zero_is_not_a_level_and_the_grid_is_symmetric(x: np.ndarray, dtype: str) -> None:
    """Zero comes back as half a step (it lies on the boundary of the two innermost levels), and every level
    ``(q + 1/2) * scale`` has its mirror image ``(-q - 1/2) * scale``: ``-x`` comes back as minus what ``x`` does
    wherever ``x`` is not on a boundary (a tie either way; in float32, within a thousandth of a step of one)."""
    states = torch.from_numpy(x)
    fmt, params = _mid_rise(states, dtype)
    zero = fake_quantize(torch.zeros_like(states), params, PER_TOKEN, fmt)
    assert torch.equal(zero.abs(), (params.scale * 0.5).expand_as(zero))
    steps = states / params.scale
    on_boundary = (steps - steps.round()).abs() < 1e-3  # a tie, in float32 if not exactly
    mirrored = fake_quantize(-states, params, PER_TOKEN, fmt)
    restored = fake_quantize(states, params, PER_TOKEN, fmt)
    assert torch.equal(torch.where(on_boundary, 0.0, mirrored), torch.where(on_boundary, 0.0, -restored))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_is_used(dtype: str) -> None:
    """A ramp across the range takes every one of the format's codes (a zero-level symmetric grid leaves one)."""
    fmt = format_spec(dtype)
    ramp = torch.linspace(-1.0, 1.0, 2 * fmt.levels).view(1, 1, 1, -1)
    fmt, params = _mid_rise(ramp, dtype)
    codes = (fake_quantize(ramp, params, PER_TOKEN, fmt) / params.scale - 0.5).round().unique()
    assert codes.tolist() == list(range(int(fmt.qmin), int(fmt.qmax) + 1))
    assert params.scale.item() == pytest.approx(2.0 / fmt.levels, rel=1e-3)


def _gaussian_error(dtype: str, **options: object) -> float:
    """Mean squared error, in units of the variance, of 4000 Gaussian tokens of 64 coordinates (what a rotation
    makes of a head's), each token's range searched by ``mse``."""
    fmt = format_spec(dtype)
    states = torch.randn(1, 1, 4000, 64, generator=torch.Generator().manual_seed(0))
    params = dynamic_qparams(states, PER_TOKEN, fmt=fmt, search=8, **options)  # type: ignore[arg-type]
    return float((fake_quantize(states, params, PER_TOKEN, fmt) - states).square().mean())


def test_on_gaussian_coordinates_int2_beats_both_zero_level_grids_at_fewer_bits() -> None:
    """Four mid-rise levels leave a tenth less squared error than the asymmetric grid with a zero point (0.114
    against 0.127) and a third less than the symmetric zero-level grid's three, and store no zero point."""
    mid_rise = _gaussian_error("int2", symmetric=True, zero_level=False)
    asymmetric = _gaussian_error("int2", symmetric=False, zero_point_format=ZeroPointFormat.INT8)
    assert mid_rise < 0.92 * asymmetric and mid_rise < 0.7 * _gaussian_error("int2", symmetric=True)
    assert mid_rise == pytest.approx(0.114, abs=0.001) and asymmetric == pytest.approx(0.127, abs=0.001)


def test_at_int3_the_asymmetric_grid_fits_gaussian_tokens_better() -> None:
    """At eight levels each token's own asymmetric range wins (0.031 against 0.034): there the mid-rise grid
    trades error for the byte it saves, which is why the ``int3`` preset keeps its zero points."""
    mid_rise = _gaussian_error("int3", symmetric=True, zero_level=False)
    asymmetric = _gaussian_error("int3", symmetric=False, zero_point_format=ZeroPointFormat.INT8)
    assert asymmetric < mid_rise < 1.1 * asymmetric
    assert mid_rise == pytest.approx(0.0335, abs=0.0005) and asymmetric == pytest.approx(0.0312, abs=0.0005)


def test_the_mse_search_clips_mid_rise_ranges_too() -> None:
    """One far outlier: the search gives the other elements a finer step and lets the outlier saturate."""
    states = torch.tensor([0.1, -0.2, 0.3, -0.1, 0.2, 0.0, -0.3, 10.0]).view(1, 1, 1, 8)
    _, plain = _mid_rise(states, "int2")
    _, searched = _mid_rise(states, "int2", search=8)
    assert searched.scale.item() < plain.scale.item()
    assert plain.scale.item() == pytest.approx(10.0 / 2, rel=1e-3)


@pytest.mark.parametrize(("dtype", "symmetric"), [("int2", False), ("fp8_e4m3", True)])
def test_the_math_refuses_a_mid_rise_grid_that_is_not_symmetric_and_integer(dtype: str, symmetric: bool) -> None:
    states = torch.ones(1, 1, 1, 8)
    with pytest.raises(ValueError, match=r"mid-rise grid .* is symmetric and integer"):
        dynamic_qparams(states, PER_TOKEN, symmetric=symmetric, fmt=format_spec(dtype), zero_level=False)


# ---------------------------------------------------------------------------- rows, the cache and the count
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_hold_codes_and_a_scale_only_and_decode_to_the_fake_cache(llama: PreTrainedModel, dtype: str) -> None:
    config = KVQuantConfig(**MID_RISE, dtype=dtype, scale_format="log8", rotation="hadamard")
    stream = QuantizedCalibratingCache(llama, config, storage="packed").freeze().layers[0].quantizer.key
    states = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(2))
    rows = stream.encode(states)
    assert rows.shape[-1] == 16 * format_spec(dtype).bits // 8 + 1
    assert torch.equal(stream.decode(rows, torch.float32), stream.fake_quantize(states))


@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(dtype="int2", scope="per_token", dynamic=True, scale_format="log8"),
        QuantArgs(dtype="int3", scope="group", group_size=16, dynamic=True),
    ],
)
def test_it_counts_what_a_symmetric_row_does(args: QuantArgs) -> None:
    """No zero point: the bits of the symmetric zero-level grid, and a byte per group fewer than an int8 zero
    point."""
    mid_rise = replace(args, zero_level=False)
    one_byte = replace(args, symmetric=False, zero_point_format=ZeroPointFormat.INT8)
    groups = 64 // (args.group_size or 64)
    assert stream_bits(mid_rise, 3, 64, 1024) == stream_bits(args, 3, 64, 1024)
    assert stream_bits(one_byte, 3, 64, 1024) - stream_bits(mid_rise, 3, 64, 1024) == pytest.approx(8 * groups / 64)


def test_a_mid_rise_cache_differs_from_the_zero_level_one_and_generates(llama: PreTrainedModel) -> None:
    """Through a whole model, keys and values rotated and centred: the grid changes what the cache returns."""
    base = {**MID_RISE, "dtype": "int2", "center": True, "rotation": "hadamard", "method": "mse"}
    mid_rise = frozen_cache_states(llama, KVQuantConfig(**base))
    zero_level = frozen_cache_states(llama, KVQuantConfig(**base | {"zero_level": True}))
    assert mid_rise.shape == zero_level.shape and not torch.equal(mid_rise, zero_level)


# ---------------------------------------------------------------------------- the config
def test_it_round_trips_through_yaml_and_is_written_only_when_set() -> None:
    config = KVQuantConfig(dtype="int2", **MID_RISE, value={"zero_level": True})
    assert config.key_args.zero_level is False and config.value_args.zero_level is True
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert "zero_level" not in KVQuantConfig(dtype="int2", scope="per_token", dynamic=True).to_yaml()
    assert QuantArgs(**MID_RISE).to_dict()["zero_level"] is False
    assert QuantArgs(**MID_RISE).to_dict(full=True)["zero_level"] is False


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({**MID_RISE, "symmetric": False}, r"zero_level: false .* this stream is asymmetric: set symmetric: true"),
        ({"dtype": "int4", "zero_level": False}, r"this stream is static: .* leave zero_level out"),
        ({**MID_RISE, "dtype": "fp8_e4m3"}, r"this stream is fp8_e4m3 \(a float format\):"),
        ({**MID_RISE, "zero_level": "no"}, re.escape("qconfig.zero_level: expected true or false, got 'no'")),
        (
            {**MID_RISE, "symmetric": False, "zero_point_format": "int8"},
            r"this stream is asymmetric: set symmetric: true",
        ),
    ],
)
def test_a_mid_rise_grid_that_cannot_be_is_refused(settings_: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVQuantConfig(**settings_)


def test_reports_name_the_grid() -> None:
    config = KVQuantConfig(dtype="int2", **MID_RISE, value={"zero_level": True})
    text = config_text(config)
    assert text.startswith("keys int2 per_token mid-rise minmax dynamic; values int2 per_token symmetric")
