"""Granularity, the number-format table and the per-stream scheme.

``Granularity`` is the one place that knows which elements share a parameter; every other
module trusts its ``param_shape``, ``reduce`` and ``broadcast`` to agree. They are checked here
against independent reference reductions written with plain reshapes, and the quantization
math is checked for every scope: round-trip error within half a step inside the range,
saturation to the range's ends outside it, zero exact. ``QuantArgs`` / ``KVQuantConfig`` must
refuse impossible combinations with a message naming the key, and round-trip through dict,
JSON and YAML (the state file stores the dict; msModelSlim's YAML must stay its four keys).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.ops.granularity import Granularity
from quantcache.ops.quantize import (
    QuantParams,
    compute_qparams,
    dequantize,
    dynamic_qparams,
    fake_quantize,
    quantize,
    saturated,
    stream_minmax,
)
from quantcache.scheme.args import QuantArgs, QuantMethod, QuantScope
from quantcache.scheme.number_formats import FORMATS, FormatKind, NumberFormat, QuantDtype, ZeroPointFormat, format_spec

INT8 = FORMATS[QuantDtype.INT8]
INTEGER_FORMATS = [row for row in FORMATS.values() if row.kind is FormatKind.INTEGER]
EPS = torch.finfo(torch.float32).eps
MATH = settings(max_examples=120, deadline=None)

STATIC_SCOPES = [QuantScope.PER_TENSOR, QuantScope.PER_HEAD, QuantScope.PER_CHANNEL, QuantScope.GROUP]


# ================================================================================ strategies
@st.composite
def layouts(draw: st.DrawFn, dynamic: bool | None = None) -> tuple[Granularity, tuple[int, int, int, int]]:
    """A granularity (static or dynamic) and a states shape ``(batch, kv_heads, seq, head_dim)`` it fits."""
    is_dynamic = draw(st.booleans()) if dynamic is None else dynamic
    scopes = [QuantScope.PER_TOKEN, QuantScope.GROUP] if is_dynamic else STATIC_SCOPES
    scope = draw(st.sampled_from(scopes))
    group = draw(st.sampled_from([1, 2, 4, 8])) if scope is QuantScope.GROUP else None
    head_dim = (group or 1) * draw(st.integers(1, 4)) if group else draw(st.integers(1, 12))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), head_dim)
    return Granularity(scope, is_dynamic, group), shape


def _states(seed: int, shape: tuple[int, ...], scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale + offset


def _reference_reduce(granularity: Granularity, x: torch.Tensor, op: str) -> torch.Tensor:
    """The same reduction written independently with explicit permutes and reshapes."""
    b, h, s, d = x.shape
    reduce: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t.amin(-1)) if op == "min" else (lambda t: t.amax(-1))
    scope, g = granularity.scope, granularity.group_size
    if granularity.dynamic:
        if scope is QuantScope.PER_TOKEN:
            return reduce(x).unsqueeze(-1)
        assert g is not None
        return reduce(x.reshape(b, h, s, d // g, g)).unsqueeze(-1)
    if scope is QuantScope.PER_TENSOR:
        return reduce(x.reshape(-1))
    if scope is QuantScope.PER_HEAD:
        return reduce(x.transpose(0, 1).reshape(h, -1))
    if scope is QuantScope.PER_CHANNEL:
        return reduce(x.permute(1, 3, 0, 2).reshape(h, d, -1))
    assert g is not None
    return reduce(x.reshape(b, h, s, d // g, g).permute(1, 3, 0, 2, 4).reshape(h, d // g, -1))


def _reference_expand(granularity: Granularity, param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Each element's own parameter, by explicit indexing (static scopes): ``(b, h, s, d)``."""
    _, h, _, d = shape
    heads = torch.arange(h).view(1, h, 1, 1).expand(shape)
    dims = torch.arange(d).view(1, 1, 1, d).expand(shape)
    scope = granularity.scope
    if scope is QuantScope.PER_TENSOR:
        return param.expand(shape)
    if scope is QuantScope.PER_HEAD:
        return param[heads]
    if scope is QuantScope.PER_CHANNEL:
        return param[heads, dims]
    assert granularity.group_size is not None
    return param[heads, dims // granularity.group_size]


# ================================================================================ shapes, reductions, broadcasting
@MATH
@given(layout=layouts(), seed=st.integers(0, 2**16))
def test_reduce_matches_an_independent_reduction_and_the_parameter_shape(
    layout: tuple[Granularity, tuple[int, int, int, int]], seed: int
) -> None:
    """``reduce`` gives ``param_shape`` (static) or the per-token shape with kept dims (dynamic), and the
    values an independent reshape-based reduction gives: the wrong reduction dims would mix heads or tokens."""
    granularity, shape = layout
    x = _states(seed, shape)
    low, high = granularity.reduce(x, torch.amin), granularity.reduce(x, torch.amax)
    if granularity.dynamic:
        groups = 1 if granularity.scope is QuantScope.PER_TOKEN else shape[3] // (granularity.group_size or 1)
        expected_shape = (*shape[:3], 1) if granularity.scope is QuantScope.PER_TOKEN else (*shape[:3], groups, 1)
        assert low.shape == expected_shape
        assert granularity.params_per_token(shape[1], shape[3]) == shape[1] * groups
        with pytest.raises(ValueError, match="dynamic"):
            granularity.param_shape(shape[1], shape[3])
    else:
        assert low.shape == granularity.param_shape(shape[1], shape[3])
        assert granularity.params_per_token(shape[1], shape[3]) == 0
    assert torch.equal(low, _reference_reduce(granularity, x, "min"))
    assert torch.equal(high, _reference_reduce(granularity, x, "max"))
    assert stream_minmax(x, granularity)[0].shape == low.shape


@MATH
@given(layout=layouts(dynamic=False), seed=st.integers(0, 2**16))
def test_broadcast_gives_every_element_its_own_parameter(
    layout: tuple[Granularity, tuple[int, int, int, int]], seed: int
) -> None:
    """Parameters numbered 0, 1, 2 ... broadcast against the grouped view land exactly where explicit
    indexing puts them, so element (b, h, s, d) is quantized with its head's, channel's or group's scale."""
    granularity, shape = layout
    param_shape = granularity.param_shape(shape[1], shape[3])
    param = torch.arange(math.prod(param_shape), dtype=torch.float32).reshape(param_shape)
    view = granularity.grouped(_states(seed, shape))
    spread = granularity.ungrouped(granularity.broadcast(param, view).expand_as(view), shape[3])
    assert torch.equal(spread, _reference_expand(granularity, param, shape))
    x = _states(seed, shape)
    assert torch.equal(granularity.ungrouped(granularity.grouped(x), shape[3]), x)  # grouping loses nothing


def test_group_size_that_does_not_divide_head_dim_is_a_clear_error_for_calibrated_groups() -> None:
    """The message names both numbers, for the shape and for the states."""
    granularity = Granularity(QuantScope.GROUP, False, 5)
    with pytest.raises(ValueError, match="group_size 5 does not divide head_dim 16"):
        granularity.param_shape(2, 16)
    with pytest.raises(ValueError, match="group_size 5 does not divide head_dim 16"):
        granularity.grouped(torch.zeros(1, 2, 3, 16))


@MATH
@given(
    size=st.integers(1, 40),
    head_dim=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    symmetric=st.booleans(),
    dtype=st.sampled_from(["int8", "int4", "int2"]),
)
def test_a_dynamic_group_that_does_not_divide_head_dim_is_a_shorter_last_group(
    size: int, head_dim: int, seed: int, symmetric: bool, dtype: str
) -> None:
    """``ceil(head_dim / g)`` groups per token; the last, shorter one is quantized exactly as if it stood alone
    (with a range that takes in zero: the padding), and the padding comes back out."""
    granularity = Granularity(QuantScope.GROUP, True, size)
    groups = -(-head_dim // size)
    assert granularity.groups(head_dim) == groups and granularity.params_per_token(3, head_dim) == 3 * groups
    x = _states(seed, (2, 3, 4, head_dim))
    view = granularity.grouped(x)
    assert view.shape == (2, 3, 4, groups, size)
    assert torch.equal(granularity.ungrouped(view, head_dim), x)
    fmt = format_spec(dtype)
    params = dynamic_qparams(x, granularity, symmetric=symmetric, fmt=fmt, zero_point_format=ZeroPointFormat.INT8)
    restored = fake_quantize(x, params, granularity, fmt)
    assert restored.shape == x.shape
    last = x[..., (groups - 1) * size :]
    alone = Granularity(QuantScope.PER_TOKEN, True)
    last_params = dynamic_qparams(last, alone, symmetric=symmetric, fmt=fmt, zero_point_format=ZeroPointFormat.INT8)
    assert torch.equal(restored[..., (groups - 1) * size :], fake_quantize(last, last_params, alone, fmt))


def test_group_size_that_does_not_divide_the_models_head_dim_is_refused_when_the_cache_is_built(
    llama: PreTrainedModel,
) -> None:
    """The cache knows head_dim (16) when it is built; today it builds, and the first forward raises a bare
    ValueError that names no layer and that the CLI reports as an internal error (exit 1) instead of a
    config error (exit 3)."""
    with pytest.raises(ConfigError, match="group_size"):
        cache = QuantizedCalibratingCache(llama, KVQuantConfig(scope="group", group_size=5))
        with torch.no_grad():
            llama(torch.tensor([[5, 6, 7]]), **{CACHE_KEYWORD: cache})


# ================================================================================ quantization math, every scope
def _params_for(
    granularity: Granularity, x: torch.Tensor, symmetric: bool, fmt: NumberFormat = INT8
) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
    low, high = (
        (granularity.reduce(x, torch.amin), granularity.reduce(x, torch.amax))
        if granularity.dynamic
        else stream_minmax(x, granularity)
    )
    return low, high, compute_qparams(low, high, symmetric=symmetric, fmt=fmt)


def _spread(granularity: Granularity, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    view = granularity.grouped(x)
    return granularity.ungrouped(granularity.broadcast(param.float(), view).expand_as(view), x.shape[-1])


@MATH
@given(
    layout=layouts(),
    seed=st.integers(0, 2**16),
    symmetric=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    offset=st.sampled_from([0.0, 0.5, -4.0]),
    fmt=st.sampled_from(INTEGER_FORMATS),
)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(
    layout: tuple[Granularity, tuple[int, int, int, int]],
    seed: int,
    symmetric: bool,
    scale: float,
    offset: float,
    fmt: NumberFormat,
) -> None:
    """Calibrated on the very states it then quantizes, every element is inside its range, for every integer
    format of the table (int8 down to int2)."""
    granularity, shape = layout
    x = _states(seed, shape, scale, offset * scale)
    _, _, params = _params_for(granularity, x, symmetric, fmt)
    restored = fake_quantize(x, params, granularity, fmt)
    step = _spread(granularity, params.scale, x)
    slack = 8 * EPS * (x.abs() + _spread(granularity, params.scale * fmt.levels, x))
    assert ((restored - x).abs() <= 0.5 * step * (1 + 1e-5) + slack).all()
    codes = quantize(x, params, granularity, fmt)
    assert codes.dtype == fmt.storage_dtype and codes.shape == x.shape
    assert fmt.qmin <= codes.min() and codes.max() <= fmt.qmax
    assert torch.equal(dequantize(codes, params, x.dtype, granularity), restored)
    assert not saturated(x, params, granularity, fmt).any()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so ``-0.0`` differs from ``+0.0`` and NaNs compare by payload)."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


@MATH
@given(
    layout=layouts(),
    seed=st.integers(0, 2**16),
    symmetric=st.booleans(),
    fmt=st.sampled_from(list(FORMATS.values())),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    shrink=st.sampled_from([1.0, 0.25]),
)
def test_fake_quantize_is_the_storage_round_trip_bit_for_bit(
    layout: tuple[Granularity, tuple[int, int, int, int]],
    seed: int,
    symmetric: bool,
    fmt: NumberFormat,
    dtype: torch.dtype,
    shrink: float,
) -> None:
    """The hot path skips the trip through the code type; it must still give the very bits of
    ``dequantize(quantize(x))``: signed zeros (small negatives round to ``-0.0``), clipped values (a range
    shrunk to a quarter), infinities kept, NaN kept, every format, every scope, every model dtype."""
    granularity, shape = layout
    symmetric = symmetric or fmt.kind is FormatKind.FLOAT
    x = _states(seed, shape).to(dtype)
    low, high, _ = _params_for(granularity, x.float(), symmetric, fmt)
    params = compute_qparams(low * shrink, high * shrink, symmetric=symmetric, fmt=fmt)
    flat = x.view(-1)
    flat[0] = -1e-4 * float(params.scale.min())  # rounds to a negative zero
    if flat.numel() > 2:
        flat[1], flat[2] = float("inf"), float("-inf")
    if flat.numel() > 3:
        flat[3] = float("nan")
    finite = torch.isfinite(x)
    expected = torch.where(finite, dequantize(quantize(x, params, granularity, fmt), params, dtype, granularity), x)
    restored = fake_quantize(x, params, granularity, fmt)
    assert restored.dtype == dtype
    assert torch.equal(_bits(restored[finite]), _bits(expected[finite]))
    assert torch.equal(restored[~finite].isnan(), x[~finite].isnan())
    assert torch.equal(restored[x.isinf()], x[x.isinf()])


@MATH
@given(
    layout=layouts(dynamic=False),
    seed=st.integers(0, 2**16),
    symmetric=st.booleans(),
    factor=st.sampled_from([1.5, 3.0, 100.0]),
    fmt=st.sampled_from(INTEGER_FORMATS),
)
def test_values_beyond_the_range_saturate_to_its_ends(
    layout: tuple[Granularity, tuple[int, int, int, int]], seed: int, symmetric: bool, factor: float, fmt: NumberFormat
) -> None:
    """Outside the calibrated range an element becomes the nearest end of the code range, and ``saturated``
    flags exactly the elements whose level rounds outside ``[qmin, qmax]``."""
    granularity, shape = layout
    calibration = _states(seed, shape)
    _, _, params = _params_for(granularity, calibration, symmetric, fmt)
    x = _states(seed + 1, shape, factor)
    restored = fake_quantize(x, params, granularity, fmt)
    step, zero = _spread(granularity, params.scale, x), _spread(granularity, params.zero_point, x)
    level = x / step + zero
    top, bottom = (fmt.qmax - zero) * step, (fmt.qmin - zero) * step
    above, below = level > fmt.qmax + 0.5, level < fmt.qmin - 0.5
    assert torch.equal(saturated(x, params, granularity, fmt), above | below)
    assert torch.allclose(restored[above], top[above], rtol=1e-6, atol=0)
    assert torch.allclose(restored[below], bottom[below], rtol=1e-6, atol=0)
    assert (restored <= top + 1e-6 * top.abs() + EPS).all()
    assert (restored >= bottom - 1e-6 * bottom.abs() - EPS).all()


@MATH
@given(
    layout=layouts(), seed=st.integers(0, 2**16), symmetric=st.booleans(), fmt=st.sampled_from(list(FORMATS.values()))
)
def test_zero_is_exact_whenever_the_range_holds_it(
    layout: tuple[Granularity, tuple[int, int, int, int]], seed: int, symmetric: bool, fmt: NumberFormat
) -> None:
    """Zero maps to the zero point and back to exactly 0.0 (symmetric always; asymmetric when min <= 0 <= max,
    which holds here because every group contains a zero), in every format of the table."""
    symmetric = symmetric or fmt.kind is FormatKind.FLOAT
    granularity, shape = layout
    x = _states(seed, shape)
    view = granularity.grouped(x)
    view[..., 0] = 0.0  # one zero in every channel group / token / head / tensor
    if not granularity.dynamic and granularity.scope is QuantScope.PER_CHANNEL:
        x[:, :, 0, :] = 0.0  # per-channel groups run along the sequence
    _, _, params = _params_for(granularity, x, symmetric, fmt)
    zeros = x == 0
    assert zeros.any()
    restored = fake_quantize(x, params, granularity, fmt)
    assert (restored[zeros] == 0).all()
    if symmetric:
        assert (params.zero_point == 0).all()


@pytest.mark.parametrize("scope", STATIC_SCOPES)
def test_symmetric_zero_point_is_zero_and_scales_respect_the_floor(scope: QuantScope) -> None:
    """Constant-zero data must not divide by zero: the scale floors at float32 eps for every scope."""
    granularity = Granularity(scope, False, 4 if scope is QuantScope.GROUP else None)
    x = torch.zeros(1, 2, 3, 8)
    for symmetric in (True, False):
        _, _, params = _params_for(granularity, x, symmetric)
        assert (params.scale >= EPS).all() and (params.zero_point.abs() <= 128).all()
        assert torch.equal(fake_quantize(x, params, granularity), x)


def test_format_table_rows() -> None:
    """INT8 is one row with its bounds and storage; the math reads it instead of constants."""
    assert format_spec("int8") is INT8 is format_spec(QuantDtype.INT8)
    assert (INT8.qmin, INT8.qmax, INT8.levels, INT8.symmetric_max, INT8.bits) == (-128, 127, 256, 127, 8)
    assert INT8.storage_dtype is torch.int8 and INT8.kind is FormatKind.INTEGER


# ================================================================================ the scheme (QuantArgs)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scope": "group"}, "qconfig.group_size: scope 'group' needs a positive integer, got None"),
        ({"scope": "group", "group_size": 0}, "needs a positive integer, got 0"),
        ({"scope": "group", "group_size": -4}, "needs a positive integer, got -4"),
        ({"scope": "group", "group_size": True}, "needs a positive integer, got True"),
        ({"scope": "group", "group_size": "4"}, "needs a positive integer, got '4'"),
        ({"group_size": 4}, "group_size is only used with scope 'group' (scope is 'per_channel')"),
        ({"scope": "per_token"}, "qconfig.scope 'per_token' needs dynamic: true"),
        ({"scope": "per_channel", "dynamic": True}, "qconfig.dynamic: true works with scope"),
        ({"scope": "per_tensor", "dynamic": True}, "not 'per_tensor'"),
        ({"scope": "per_head", "dynamic": True}, "not 'per_head'"),
        ({"dynamic": "yes"}, "qconfig.dynamic: expected true or false"),
        ({"symmetric": 1}, "qconfig.symmetric: expected true or false"),
        ({"dtype": "int13"}, "qconfig.dtype: unsupported value 'int13'; allowed: 'int8'"),
        ({"scope": "per_block"}, "qconfig.scope: unsupported value 'per_block'"),
        ({"method": "magic"}, "qconfig.method: unsupported value 'magic'; allowed: 'minmax'"),
        ({"observer_options": [1, 2]}, "qconfig.observer_options: expected a mapping"),
    ],
)
def test_impossible_stream_arguments_are_config_errors_naming_the_key(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        QuantArgs(**kwargs)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_float_formats_are_symmetric_only() -> None:
    """Every float row of the table refuses ``symmetric: false`` with a message naming the format."""
    floats = [dtype for dtype, row in FORMATS.items() if row.kind is FormatKind.FLOAT]
    assert floats  # fp8_e4m3, fp8_e5m2
    for dtype in floats:
        with pytest.raises(ConfigError, match=f"{dtype.value} is a float format and is symmetric only"):
            QuantArgs(dtype=dtype, symmetric=False)
        assert QuantArgs(dtype=dtype).format is FORMATS[dtype]


def test_valid_combinations_and_their_granularity() -> None:
    assert QuantArgs(scope="GROUP", group_size=8).scope is QuantScope.GROUP  # case-insensitive enum names
    assert Granularity.of(QuantArgs(scope="per_token", dynamic=True)) == Granularity(QuantScope.PER_TOKEN, True)
    assert Granularity.of(QuantArgs(scope="group", dynamic=True, group_size=4)).params_per_token(2, 16) == 8
    assert QuantArgs(method="mse", observer_options={"grid": 4}).observer_options == (("grid", 4),)


def test_from_dict_refuses_unknown_keys_and_non_mappings() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'qconfig\.key\.granularity'; allowed: scope, dtype"):
        QuantArgs.from_dict({"granularity": "per_channel"}, where="qconfig.key")
    with pytest.raises(ConfigError, match="qconfig: expected a mapping, got list"):
        QuantArgs.from_dict(["scope"])  # type: ignore[arg-type]


# ================================================================================ the config: round trips
SEED_DICT = {
    "type": "dynamic_cache",
    "qconfig": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"},
    "include": ["*"],
    "exclude": [],
}


def test_seed_config_writes_exactly_msmodelslims_four_qconfig_keys() -> None:
    """msModelSlim reads this YAML too: the seed scheme must not grow keys (``dynamic: false`` ...)."""
    for config in (KVQuantConfig(), KVQuantConfig(key=QuantArgs(), value=QuantArgs())):
        data = config.to_dict()
        assert data == SEED_DICT
        assert list(data["qconfig"]) == ["scope", "dtype", "symmetric", "method"]
        assert config.key == config.value == QuantArgs()
    assert KVQuantConfig.from_yaml(KVQuantConfig().to_yaml()) == KVQuantConfig()


@st.composite
def stream_args(draw: st.DrawFn, plain: bool = False) -> QuantArgs:
    """Valid arguments of one stream; ``plain``: static and without groups (every default left as is)."""
    dynamic = False if plain else draw(st.booleans())
    scopes = [QuantScope.PER_TENSOR, QuantScope.PER_HEAD, QuantScope.PER_CHANNEL] if plain else STATIC_SCOPES
    scope = draw(st.sampled_from([QuantScope.PER_TOKEN, QuantScope.GROUP] if dynamic else scopes))
    return QuantArgs(
        scope=scope,
        symmetric=draw(st.booleans()),
        dynamic=dynamic,
        method=QuantMethod.MINMAX,
        group_size=draw(st.sampled_from([2, 4, 8])) if scope is QuantScope.GROUP else None,
    )


@settings(max_examples=60, deadline=None)
@given(
    key=st.none() | stream_args(),
    value=st.none() | stream_args(),
    shared=stream_args(plain=True),
    exclude=st.lists(st.sampled_from(["model.layers.0.self_attn", "*.{1,2}.*"]), max_size=2),
)
def test_per_stream_config_round_trips_through_dict_json_and_yaml(
    key: QuantArgs | None, value: QuantArgs | None, shared: QuantArgs, exclude: list[str]
) -> None:
    """What the state file stores (JSON of ``to_dict``) and what ``--config`` reads (YAML) rebuild the same
    config, per-stream arguments included: flat keywords for both streams, a stream given as a mapping on
    top of them."""
    flat = {"scope": shared.scope, "symmetric": shared.symmetric, "dynamic": shared.dynamic}
    config = KVQuantConfig(
        **flat,
        group_size=shared.group_size,
        key=None if key is None else key.to_dict(full=True),
        value=None if value is None else value.to_dict(full=True),
        exclude=exclude,
    )
    assert config.key_args == (key or shared) and config.value_args == (value or shared)
    data = config.to_dict()
    assert KVQuantConfig.from_dict(data) == config
    assert KVQuantConfig.from_dict(json.loads(json.dumps(data))) == config
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize(
    ("shared", "override"),
    [
        ({"scope": "per_token", "dynamic": True}, QuantArgs(scope="per_tensor")),
        ({"scope": "group", "group_size": 4}, QuantArgs(scope="per_channel")),
        ({"scope": "group", "dynamic": True, "group_size": 4}, QuantArgs(scope="per_head", symmetric=False)),
    ],
    ids=["dynamic-shared-static-value", "group-shared-channel-value", "dynamic-group-shared-head-value"],
)
def test_a_static_override_of_dynamic_or_grouped_shared_arguments_round_trips(
    shared: dict[str, object], override: QuantArgs
) -> None:
    """``KVQuantConfig(scope="per_token", dynamic=True, value={...every field of a static per-tensor stream})``
    is valid, and its ``to_dict`` must write ``qconfig.value`` with ``dynamic: false``: otherwise ``from_dict``
    merges the flat ``dynamic: true`` in and refuses it, and the state file saved with this config cannot be
    read back ("stored config is invalid")."""
    config = KVQuantConfig(**shared, value=override.to_dict(full=True))
    assert config.value_args == override
    assert KVQuantConfig.from_dict(config.to_dict()) == config


def test_yaml_per_stream_override_inherits_the_shared_keys() -> None:
    """``qconfig.key`` lists only what differs; the rest comes from the flat msModelSlim keys."""
    config = KVQuantConfig.from_yaml("type: dynamic_cache\nqconfig:\n  symmetric: false\n  key:\n    scope: per_head\n")
    assert config.key_args == QuantArgs(scope="per_head", symmetric=False)
    assert config.value_args == QuantArgs(symmetric=False)
    with pytest.raises(ConfigError, match=r"unknown key 'qconfig\.value\.bits'"):
        KVQuantConfig.from_yaml("qconfig:\n  value:\n    bits: 4\n")
    with pytest.raises(ConfigError, match=r"qconfig\.key: expected a mapping"):
        KVQuantConfig.from_yaml("qconfig:\n  key: per_head\n")
    with pytest.raises(ConfigError, match="key: expected QuantArgs or a mapping, got str"):
        KVQuantConfig(key="per_head")  # type: ignore[arg-type]
