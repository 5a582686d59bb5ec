"""One-byte per-token scales (``scale_format: log8``): the math, the rows, the count and the config.

A dynamic scheme stores each token's scale (per kv head, or per group) in its packed row.
``float16`` takes two bytes; ``log8`` takes one, the scale rounded up to a power of
``2 ** (1 / 8)``, so the per-token parameters cost half the bits. Rounding up keeps every
element of a token inside the code range; decoding looks the scale up, so a row gives the
same bits whatever else is decoded with it. What both one-byte formats share (YAML,
overrides, the state file, the count against a packed cache) is tested in
``test_row_parameter_formats.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.ops.bits import stream_bits
from quantcache.ops.granularity import Granularity
from quantcache.ops.quantize import (
    DYNAMIC_MAX_OFFSET,
    LOG8_NAN,
    compute_qparams,
    dynamic_qparams,
    fake_quantize,
    log8_decode,
    log8_encode,
    stored_scale,
)
from quantcache.scheme.args import QuantArgs
from quantcache.scheme.number_formats import ScaleFormat, format_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = settings(max_examples=80, deadline=None)
STEP = 2.0 ** (1 / 8)
LOWEST, HIGHEST = 2.0**-16, 2.0 ** (126 / 8)
INT4_LOG8 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "scale_format": "log8"}


# ---------------------------------------------------------------------------- the scale codes
def test_every_code_decodes_to_its_power_and_encodes_back() -> None:
    codes = torch.arange(LOG8_NAN, dtype=torch.uint8)
    scales = log8_decode(codes)
    expected = torch.tensor([2.0 ** ((code - 128) / 8) for code in range(LOG8_NAN)], dtype=torch.float32)
    assert torch.equal(scales, expected)
    assert torch.equal(log8_encode(scales), codes)
    assert scales[0] == LOWEST and scales[-1] == pytest.approx(HIGHEST, rel=1e-7)


def test_nan_has_its_own_code() -> None:
    assert log8_encode(torch.tensor([math.nan, 1.0])).tolist() == [LOG8_NAN, 128]
    assert torch.isnan(log8_decode(torch.tensor([LOG8_NAN], dtype=torch.uint8))).all()


def test_a_compiled_graph_encodes_log8_scales_as_eager_code_does() -> None:
    """Traced into a graph, the code is a count of the powers below the scale (a loop of the graph's own) instead of
    ``searchsorted``: the same code for every stored scale, the values between and beside them, the ends, NaN."""
    powers = log8_decode(torch.arange(LOG8_NAN, dtype=torch.uint8))
    between = torch.cat([torch.nextafter(powers, powers * 0), torch.nextafter(powers, powers * 4)])
    ends = torch.tensor([0.0, 1e-30, LOWEST / 2, HIGHEST * 2, 1e38, math.inf, math.nan])
    scales = torch.cat([powers, between, ends]).view(1, 1, -1, 1)  # per-token scales
    traced = torch.compile(log8_encode, backend="eager", fullgraph=True)
    assert torch.equal(traced(scales), log8_encode(scales))
    assert log8_encode(scales).dtype == torch.uint8


@SETTINGS
@given(st.floats(LOWEST, 50000.0, width=32))
def test_a_scale_is_rounded_up_by_less_than_one_step(scale: float) -> None:
    exact = torch.tensor([scale], dtype=torch.float32)
    stored = stored_scale(exact, ScaleFormat.LOG8)
    assert exact <= stored < exact * STEP * (1 + 1e-6)
    assert torch.equal(stored_scale(stored, ScaleFormat.LOG8), stored)  # a stored scale stays itself


@pytest.mark.parametrize(("scale", "expected"), [(1e-30, LOWEST), (2.0**-20, LOWEST), (1e9, None), (math.inf, None)])
def test_scales_outside_the_range_clamp_to_its_ends(scale: float, expected: float | None) -> None:
    stored = stored_scale(torch.tensor([scale]), ScaleFormat.LOG8)
    top = log8_decode(torch.tensor([LOG8_NAN - 1], dtype=torch.uint8))
    assert stored == (expected if expected is not None else top)


def test_float16_scales_are_rounded_up_as_before() -> None:
    exact = torch.tensor([0.1, 1.0, 3.3])
    stored = stored_scale(exact, ScaleFormat.FLOAT16)
    assert (stored >= exact).all() and torch.equal(stored, stored.half().float())


@SETTINGS
@given(st.one_of(st.floats(2.0**-23, 2.0**-14, width=32), st.floats(2.0**-14, 60000.0, width=32)))
def test_a_float16_scale_is_never_rounded_down_even_where_float16_is_subnormal(scale: float) -> None:
    """Below ``2**-14`` float16 steps are ``2**-24`` apart: a relative nudge alone would round a scale such as
    ``2**-14 / 255`` down, and the group's extreme would then saturate a step outside the codes."""
    exact = torch.tensor([scale], dtype=torch.float32)
    stored = stored_scale(exact, ScaleFormat.FLOAT16)
    assert stored >= exact and torch.equal(stored, stored.half().float())
    assert stored <= exact * (1 + 2.0**-9) + 2.0**-23  # at most a step or two above


def test_a_subnormal_float16_scale_keeps_a_constant_token_inside_the_codes() -> None:
    """The case that exposed it: an int8 token of equal values ``2**-14`` with zero in its range."""
    states = torch.full((1, 1, 1, 8), 2.0**-14)
    args = QuantArgs(scope="per_token", dynamic=True, symmetric=False, zero_point_format="int8")
    params = dynamic_qparams(
        states, Granularity.of(args), symmetric=False, fmt=args.format, zero_point_format=args.zero_point_format
    )
    restored = fake_quantize(states, params, Granularity.of(args), args.format)
    assert ((restored - states).abs() <= params.scale * 0.5).all()


# ---------------------------------------------------------------------------- per-token parameters
def _tokens_states(max_abs: float = 100.0) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4).map(lambda s: (*s[:3], 8)),
        elements=st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False),
    )


@SETTINGS
@given(_tokens_states(), st.sampled_from(["int8", "int4", "int3", "int2"]), st.booleans())
def test_log8_codes_cover_every_token_within_half_a_step(x: np.ndarray, dtype: str, symmetric: bool) -> None:
    """Rounding the scale up never clips: every element comes back within half its token's step."""
    states = torch.from_numpy(x)
    fmt = format_spec(dtype)
    granularity = Granularity.of(QuantArgs(dtype=dtype, scope="per_token", dynamic=True))
    params = dynamic_qparams(states, granularity, symmetric=symmetric, fmt=fmt, scale_format=ScaleFormat.LOG8)
    assert torch.equal(log8_decode(log8_encode(params.scale)), params.scale)
    low, high = granularity.reduce(states, torch.amin), granularity.reduce(states, torch.amax)
    exact = compute_qparams(low, high, symmetric=symmetric, fmt=fmt, max_offset=DYNAMIC_MAX_OFFSET).scale
    assert (exact <= params.scale).all()
    assert (params.scale < torch.clamp(exact, min=LOWEST) * STEP * (1 + 1e-6)).all()  # the range starts at 2**-16
    restored = fake_quantize(states, params, granularity, fmt)
    assert ((restored - states).abs() <= params.scale * 0.5 * (1 + 1e-5) + 1e-30).all()


def test_mse_search_keeps_to_stored_scales() -> None:
    states = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    args = QuantArgs(dtype="int4", scope="per_token", dynamic=True, method="mse", scale_format="log8")
    params = dynamic_qparams(
        states, Granularity.of(args), symmetric=True, fmt=args.format, search=8, scale_format=ScaleFormat.LOG8
    )
    assert torch.equal(log8_decode(log8_encode(params.scale)), params.scale)


def test_a_row_decodes_to_the_same_bits_whatever_is_decoded_with_it(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(**INT4_LOG8), storage="packed").freeze()
    stream = cache.layers[0].quantizer.key
    states = torch.randn(1, 2, 37, 16, generator=torch.Generator().manual_seed(1)) * 3
    rows = stream.encode(states)
    whole = stream.decode(rows, torch.float32)
    for token in (0, 17, 36):
        assert torch.equal(stream.decode(rows[:, :, token : token + 1], torch.float32), whole[:, :, token : token + 1])
    assert torch.equal(whole, stream.fake_quantize(states))


# ---------------------------------------------------------------------------- rows and the count
@pytest.mark.parametrize(
    ("args", "saved"),
    [
        (QuantArgs(dtype="int4", scope="per_token", dynamic=True), 8 / 64),
        (QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False), 8 / 64),
        (QuantArgs(dtype="int2", scope="group", group_size=16, dynamic=True, symmetric=False), 8 / 16),
        (QuantArgs(scope="per_token", dynamic=True), 8 / 64),
    ],
)
def test_a_log8_scale_counts_eight_bits_fewer_per_group(args: QuantArgs, saved: float) -> None:
    one_byte = replace(args, scale_format=ScaleFormat.LOG8)
    assert stream_bits(args, 3, 64, 1024) - stream_bits(one_byte, 3, 64, 1024) == pytest.approx(saved)




# ---------------------------------------------------------------------------- the config






def test_a_static_scheme_has_no_per_token_scale_to_store() -> None:
    with pytest.raises(ConfigError, match=r"scale_format 'log8' is how a dynamic scheme stores .* set dynamic: true"):
        KVQuantConfig(dtype="int4", scale_format="log8")


def test_an_unknown_scale_format_names_the_allowed_ones() -> None:
    message = "qconfig.scale_format: unsupported value 'int8'; allowed: 'float16', 'log8'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        KVQuantConfig(**{**INT4_LOG8, "scale_format": "int8"})

