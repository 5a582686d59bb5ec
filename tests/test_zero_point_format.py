"""One-byte per-token zero points (``zero_point_format: int8``): the math, the rows, the count and the errors.

An asymmetric dynamic scheme stores each token's zero point (per kv head, or per group) in
its packed row. ``int16`` takes two bytes and quantizes the group's own ``[min, max]``;
``int8`` takes one, the usual convention: the range is widened to take in zero, so the zero
point is one of the codes. Centred states hold both signs in every group, where the two
give the same codes. What both one-byte formats share (YAML, overrides, the state file,
the count against a packed cache) is tested in ``test_row_parameter_formats.py``.
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
from quantcache.ops.bits import stream_bits
from quantcache.ops.granularity import Granularity
from quantcache.ops.quantize import dynamic_qparams, fake_quantize
from quantcache.scheme.args import QuantArgs
from quantcache.scheme.number_formats import ScaleFormat, ZeroPointFormat, format_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = settings(max_examples=80, deadline=None)
DTYPES = ["int8", "int4", "int3", "int2"]
INT4_ZP8 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "symmetric": False, "zero_point_format": "int8"}
PER_TOKEN = Granularity.of(QuantArgs(scope="per_token", dynamic=True))


def _states(max_abs: float = 100.0) -> st.SearchStrategy[np.ndarray]:
    """``(batch, kv_heads, seq, 8)`` finite states of any signs."""
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4).map(lambda s: (*s[:3], 8)),
        elements=st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False),
    )


def _params(states: torch.Tensor, dtype: str, zero_point_format: str, **options: object) -> tuple:
    fmt = format_spec(dtype)
    params = dynamic_qparams(
        states, PER_TOKEN, symmetric=False, fmt=fmt, zero_point_format=ZeroPointFormat(zero_point_format), **options
    )
    return fmt, params


# ---------------------------------------------------------------------------- the math
@SETTINGS
@given(_states(), st.sampled_from(DTYPES), st.sampled_from(["float16", "log8"]), st.sampled_from([0, 8]))
def test_an_int8_zero_point_is_a_code_and_every_element_is_within_half_a_step(
    x: np.ndarray, dtype: str, scale_format: str, search: int
) -> None:
    """Whatever the signs, the zero point fits the codes (so one byte holds it), and without the ``mse`` search
    nothing clips: every element comes back within half its token's step."""
    states = torch.from_numpy(x)
    fmt, params = _params(states, dtype, "int8", scale_format=ScaleFormat(scale_format), search=search)
    assert ((params.zero_point >= fmt.qmin) & (params.zero_point <= fmt.qmax)).all()
    restored = fake_quantize(states, params, PER_TOKEN, fmt)
    if search == 0:
        assert ((restored - states).abs() <= params.scale * 0.5 * (1 + 1e-5) + 1e-30).all()
    zero = fake_quantize(torch.zeros_like(states), params, PER_TOKEN, fmt)
    assert torch.equal(zero, torch.zeros_like(states))  # zero is exact: it is a code


@SETTINGS
@given(_states(), st.sampled_from(DTYPES), st.sampled_from([0, 8]), st.floats(1e-3, 10.0))
def test_where_a_token_holds_both_signs_int8_and_int16_zero_points_agree(
    x: np.ndarray, dtype: str, search: int, margin: float
) -> None:
    """Centred states straddle zero in every group: there the one-byte format changes no scale and no code."""
    states = torch.from_numpy(x).clone()
    states[..., 0] = -states[..., 0].abs() - margin
    states[..., 1] = states[..., 1].abs() + margin
    fmt, narrow = _params(states, dtype, "int8", search=search)
    _, wide = _params(states, dtype, "int16", search=search)
    assert torch.equal(narrow.scale, wide.scale) and torch.equal(narrow.zero_point, wide.zero_point)
    assert torch.equal(fake_quantize(states, narrow, PER_TOKEN, fmt), fake_quantize(states, wide, PER_TOKEN, fmt))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_token_of_one_sign_is_widened_to_zero(dtype: str) -> None:
    """All positive: ``int16`` quantizes ``[min, max]`` (a zero point below the codes), ``int8`` ``[0, max]``
    (zero point ``qmin``); all negative: ``[min, 0]`` (zero point ``qmax``)."""
    positive = torch.linspace(4.0, 6.0, 8).view(1, 1, 1, 8)
    fmt, narrow = _params(positive, dtype, "int8")
    _, wide = _params(positive, dtype, "int16")
    assert narrow.zero_point.item() == fmt.qmin and wide.zero_point.item() < fmt.qmin
    assert narrow.scale.item() == pytest.approx(6.0 / (fmt.qmax - fmt.qmin), rel=3e-3)
    assert wide.scale.item() == pytest.approx(2.0 / (fmt.qmax - fmt.qmin), rel=3e-3)
    _, negative = _params(-positive, dtype, "int8")
    assert negative.zero_point.item() == fmt.qmax


def test_a_scale_clamped_by_log8_keeps_the_zero_point_inside_the_codes() -> None:
    """``log8`` tops out at ``2 ** 15.75``: a range far beyond it saturates, and its zero point stays a code."""
    states = torch.tensor([-3.0e9, 1.0, 2.0, 5.0e9, 0.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 8)
    for dtype in DTYPES:
        fmt, params = _params(states, dtype, "int8", scale_format=ScaleFormat.LOG8)
        assert fmt.qmin <= params.zero_point.item() <= fmt.qmax


# ---------------------------------------------------------------------------- rows and the count
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_store_zero_points_at_both_ends_of_the_codes(llama: PreTrainedModel, dtype: str) -> None:
    """A one-byte zero point is a signed byte: ``qmin`` (a token of positive states) and ``qmax`` (negative ones)
    survive the row, and a row decodes to what the fake cache returns."""
    config = KVQuantConfig(**{**INT4_ZP8, "dtype": dtype})
    stream = QuantizedCalibratingCache(llama, config, storage="packed").freeze().layers[0].quantizer.key
    states = torch.rand(1, 2, 6, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    states[:, :, 3:] *= -1
    rows = stream.encode(states)
    assert rows.shape[-1] == 16 * format_spec(dtype).bits // 8 + 2 + 1
    assert torch.equal(stream.decode(rows, torch.float32), stream.fake_quantize(states))
    fmt = format_spec(dtype)
    params = stream.params_for(states)
    assert (params.zero_point[:, :, :3] == fmt.qmin).all() and (params.zero_point[:, :, 3:] == fmt.qmax).all()


@pytest.mark.parametrize(
    ("args", "saved"),
    [
        (QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False), 8 / 64),
        (QuantArgs(dtype="int2", scope="group", group_size=16, dynamic=True, symmetric=False), 8 / 16),
        (QuantArgs(scope="per_token", dynamic=True, symmetric=False, scale_format="log8"), 8 / 64),
    ],
)
def test_an_int8_zero_point_counts_eight_bits_fewer_per_group(args: QuantArgs, saved: float) -> None:
    one_byte = replace(args, zero_point_format=ZeroPointFormat.INT8)
    assert stream_bits(args, 3, 64, 1024) - stream_bits(one_byte, 3, 64, 1024) == pytest.approx(saved)




def test_centred_states_give_the_same_cache_output_as_int16_zero_points(llama: PreTrainedModel) -> None:
    """Through a whole model: a centred, rotated scheme's keys and values are the same bits with either format."""
    base = {**INT4_ZP8, "center": True, "rotation": "hadamard", "method": "mse"}
    narrow = frozen_cache_states(llama, KVQuantConfig(**base))
    wide = frozen_cache_states(llama, KVQuantConfig(**base | {"zero_point_format": "int16"}))
    assert torch.equal(narrow, wide)


# ---------------------------------------------------------------------------- the config






@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        (
            {**INT4_ZP8, "symmetric": True},
            r"zero_point_format 'int8' .* is symmetric and stores none: .* symmetric: false",
        ),
        (
            {"dtype": "int4", "symmetric": False, "zero_point_format": "int8"},
            r"zero_point_format 'int8' .* is static .*: leave zero_point_format out, or set dynamic: true",
        ),
        (
            {"dtype": "fp8_e4m3", "scope": "per_token", "dynamic": True, "zero_point_format": "int8"},
            r"is symmetric and stores none",
        ),
        ({**INT4_ZP8, "zero_point_format": "log8"}, re.escape("unsupported value 'log8'; allowed: 'int16', 'int8'")),
    ],
)
def test_a_zero_point_format_where_no_zero_point_is_stored_is_refused(settings_: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVQuantConfig(**settings_)

