"""Centred dynamic schemes and the dynamic ``mse`` range search.

``center: true`` subtracts a calibrated mean of every (kv_head, channel) before a dynamic
scheme quantizes and adds it back after; ``method: mse`` on a dynamic scheme clips each
token's range to the least error. Both must: be refused where they cannot work, with a
message that says why; collect exactly the mean of the real (unpadded) tokens; make
the error smaller on states with a channel offset; round-trip through state files and
packed storage bit for bit; refuse altered or incomplete states; and count their bits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS, forge_state_file
from conftest import random_tokens as _tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import CalibrationError, ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.stream import StreamQuantizer
from quantcache.errors import QuantStateError
from quantcache.ops.bits import stream_bits
from quantcache.ops.granularity import Granularity
from quantcache.ops.observers import CenterObserver
from quantcache.ops.quantize import dynamic_qparams
from quantcache.scheme.args import QuantArgs, QuantMethod, QuantScope
from quantcache.scheme.number_formats import FORMATS, QuantDtype
from quantcache.state.file import read_state_file, validate_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CENTRED = QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False, center=True)
SHAPE = (KV_HEADS, HEAD_DIM)


def _offset_states(batch: int = 2, seq: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """States with a large per-channel offset (what keys carry) and the offset itself ``(kv_heads, head_dim)``."""
    generator = torch.Generator().manual_seed(seed)
    offset = torch.randn(SHAPE, generator=generator) * 8
    noise = torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=generator)
    return noise + offset[None, :, None], offset


def _calibrated(args: QuantArgs, states: torch.Tensor) -> StreamQuantizer:
    stream = StreamQuantizer("layer 0 keys", args, SHAPE)
    stream.observe(states)
    stream.freeze()
    return stream


# ---------------------------------------------------------------------------- config
def test_center_needs_a_dynamic_scheme() -> None:
    with pytest.raises(ConfigError, match="center: true needs dynamic: true"):
        QuantArgs(center=True)


def test_center_must_be_a_flag() -> None:
    with pytest.raises(ConfigError, match=r"qconfig\.center: expected true or false"):
        QuantArgs(dtype="int4", scope="per_token", dynamic=True, center="yes")


def test_a_dynamic_scheme_refuses_the_percentile_method() -> None:
    with pytest.raises(ConfigError, match="'percentile' is for static ranges"):
        QuantArgs(scope="per_token", dynamic=True, method="percentile")


def test_center_survives_the_yaml_round_trip() -> None:
    config = KVQuantConfig(key=CENTRED, value=QuantArgs(dtype="int4", scope="per_token", dynamic=True))
    assert config.key_args.to_dict()["center"] is True
    assert "center" not in config.value_args.to_dict()
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config


def test_a_layer_override_can_turn_centring_on() -> None:
    base = KVQuantConfig(dtype="int4", scope="per_token", dynamic=True)
    config = KVQuantConfig(
        dtype="int4", scope="per_token", dynamic=True, layers=[{"include": ["*.0.*"], "qconfig": {"center": True}}]
    )
    assert config.stream_args("key", "model.layers.0.self_attn").center
    assert not config.stream_args("key", "model.layers.1.self_attn").center
    assert not base.key_args.center


# ---------------------------------------------------------------------------- observer
def test_the_center_is_the_mean_of_the_real_tokens_only() -> None:
    states, _ = _offset_states()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False  # left padding of the second row
    observer = CenterObserver(CENTRED)
    observer.merge(observer.measure(states, mask))
    real = torch.cat([states[0].transpose(0, 1), states[1, :, 5:].transpose(0, 1)])  # (tokens, heads, dim)
    torch.testing.assert_close(observer.center(), real.mean(dim=0))
    padded = states.clone()
    padded[1, :, :5] = 1e6  # whatever the padding holds
    other = CenterObserver(CENTRED)
    other.merge(other.measure(padded, mask))
    torch.testing.assert_close(other.center(), observer.center(), rtol=0, atol=0)


def test_a_batch_of_padding_only_adds_nothing() -> None:
    states, _ = _offset_states()
    assert CenterObserver(CENTRED).measure(states, torch.zeros(2, 12, dtype=torch.bool)) == {}


@settings(max_examples=30, deadline=None)
@given(split=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_merged_batches_give_the_mean_of_their_concatenation(split: int, seed: int) -> None:
    states, _ = _offset_states(batch=1, seed=seed)
    observer = CenterObserver(CENTRED)
    observer.merge(observer.measure(states[:, :, :split]))
    observer.merge(observer.measure(states[:, :, split:]))
    torch.testing.assert_close(observer.center(), states[0].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_a_center_observer_has_no_range() -> None:
    with pytest.raises(TypeError, match="a mean, not a range"):
        CenterObserver(CENTRED).range()


def test_grid_is_an_option_only_of_the_mse_method() -> None:
    with pytest.raises(ConfigError, match="'grid' is not an option of method 'minmax'"):
        StreamQuantizer("keys", QuantArgs(**{**CENTRED.to_dict(full=True), "observer_options": {"grid": 4}}), SHAPE)
    searched = QuantArgs(**{**CENTRED.to_dict(full=True), "method": "mse", "observer_options": {"grid": 4}})
    assert StreamQuantizer("keys", searched, SHAPE)._search == 4


def test_a_grid_below_one_is_refused_with_the_config() -> None:
    with pytest.raises(ConfigError, match=r"observer_options\.grid: expected a whole number in \[1, 1024\]"):
        QuantArgs(dtype="int4", scope="per_token", dynamic=True, method="mse", observer_options={"grid": 0})


# ---------------------------------------------------------------------------- quantizer
def test_freezing_without_calibration_says_what_is_missing() -> None:
    stream = StreamQuantizer("layer 0 keys", CENTRED, SHAPE)
    assert stream.calibrates and not stream.observed
    with pytest.raises(CalibrationError, match="center: true learns each channel's mean"):
        stream.freeze()


def test_an_uncentred_dynamic_stream_calibrates_nothing() -> None:
    stream = StreamQuantizer("keys", QuantArgs(dtype="int4", scope="per_token", dynamic=True), SHAPE)
    states, _ = _offset_states()
    assert not stream.calibrates and stream.measure(states) is None
    stream.freeze()
    assert stream.center is None
    with pytest.raises(CalibrationError, match="does not centre"):
        stream.set_center(torch.zeros(SHAPE))


def test_a_static_stream_does_not_freeze_with_a_center() -> None:
    with pytest.raises(CalibrationError, match="freezes with parameters, not a center"):
        StreamQuantizer("keys", QuantArgs(), SHAPE).freeze_centered(None)
    with pytest.raises(CalibrationError, match="needs its calibrated center"):
        StreamQuantizer("keys", CENTRED, SHAPE).freeze_centered(None)


def test_centring_shrinks_the_error_of_states_with_a_channel_offset() -> None:
    states, offset = _offset_states()
    centred = _calibrated(CENTRED, states)
    torch.testing.assert_close(centred.center, states.mean(dim=(0, 2)))
    plain = _calibrated(QuantArgs(**{**CENTRED.to_dict(full=True), "center": False}), states)
    centred_error = (centred.fake_quantize(states) - states).square().mean()
    plain_error = (plain.fake_quantize(states) - states).square().mean()
    assert centred_error < plain_error / 10
    exact = offset[None, :, None].expand(1, -1, 3, -1).clone()  # a token equal to the center has no residual
    centred.set_center(offset)
    assert torch.equal(centred.fake_quantize(exact), exact)


def test_unfreezing_drops_the_center_and_keeps_the_statistics() -> None:
    states, _ = _offset_states()
    stream = _calibrated(CENTRED, states)
    stream.unfreeze()
    assert stream.center is None and stream.observed
    stream.freeze()
    torch.testing.assert_close(stream.center, states.mean(dim=(0, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_packed_rows_decode_to_what_fake_quantization_returns(dtype: torch.dtype, rotation: str) -> None:
    args = QuantArgs(**{**CENTRED.to_dict(full=True), "rotation": rotation, "method": "mse"})
    states, _ = _offset_states()
    stream = _calibrated(args, states)
    states = states.to(dtype)
    states[0, 1, 3, 2] = float("nan")
    decoded = stream.decode(stream.encode(states), dtype)
    fake = stream.fake_quantize(states)
    finite = torch.isfinite(states).all(dim=-1, keepdim=True).expand_as(states)
    assert torch.equal(decoded[finite], fake[finite])
    assert bool(torch.isnan(decoded[0, 1, 3]).all()) and bool(torch.isnan(fake[0, 1, 3, 2]))


# ---------------------------------------------------------------------------- dynamic mse search
def _group_error(states: torch.Tensor, args: QuantArgs, search: int) -> torch.Tensor:
    granularity = Granularity.of(args)
    params = dynamic_qparams(states, granularity, symmetric=args.symmetric, fmt=args.format, search=search)
    view = granularity.grouped(states)
    codes = torch.clamp(torch.round(view / params.scale + params.zero_point), args.format.qmin, args.format.qmax)
    return ((codes - params.zero_point) * params.scale - view).square().sum(dim=-1)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["int2", "int3", "int4", "int8"]),
    symmetric=st.booleans(),
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_the_search_never_does_worse_than_the_full_range(
    dtype: str, symmetric: bool, grouped: bool, seed: int, spread: float
) -> None:
    scope = {"scope": "group", "group_size": 8} if grouped else {"scope": "per_token"}
    args = QuantArgs(dtype=dtype, dynamic=True, symmetric=symmetric, **scope)
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(1, KV_HEADS, 5, HEAD_DIM, generator=generator).pow(3) * spread
    searched, full = _group_error(states, args, 8), _group_error(states, args, 0)
    assert bool((searched <= full).all())


def test_the_search_clips_the_tails_of_gaussian_rows_to_a_much_smaller_error() -> None:
    states = torch.randn(1, 1, 8, 64, generator=torch.Generator().manual_seed(0))  # rotated rows look like this
    args = QuantArgs(dtype="int3", scope="per_token", dynamic=True, symmetric=True)
    assert float(_group_error(states, args, 8).sum()) < 0.75 * float(_group_error(states, args, 0).sum())
    granularity = Granularity.of(args)
    searched = dynamic_qparams(states, granularity, symmetric=True, fmt=args.format, search=8)
    assert searched.scale.dtype == torch.float32 and torch.equal(searched.scale, searched.scale.half().float())


def test_the_search_ignores_non_finite_elements() -> None:
    states = torch.randn(1, 1, 2, HEAD_DIM)
    states[0, 0, 0, 3] = float("inf")
    states[0, 0, 1, 5] = float("nan")
    args = QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False, method=QuantMethod.MSE)
    params = dynamic_qparams(states, Granularity.of(args), symmetric=False, fmt=FORMATS[QuantDtype.INT4], search=8)
    assert bool(torch.isfinite(params.scale).all())


# ---------------------------------------------------------------------------- the cache and its state
def _centred_config(**overrides: object) -> KVQuantConfig:
    return KVQuantConfig(dtype="int4", scope="per_token", dynamic=True, symmetric=False, center=True, **overrides)


def _calibrated_cache(model: PreTrainedModel, config: KVQuantConfig) -> QuantizedCalibratingCache:
    cache = QuantizedCalibratingCache(model, config)
    with torch.no_grad():
        model(_tokens(2, 16, seed=1), use_cache=True, **{CACHE_KEYWORD: cache})
    return cache.freeze()


def test_a_centred_cache_saves_and_reloads_exactly(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = _calibrated_cache(llama, _centred_config())
    state = cache.state_dict()
    assert {name.rsplit(".", 1)[1] for name in state} == {"center_sum", "center_count", "center"}
    path = cache.save(tmp_path / "kv.safetensors")
    loaded = QuantizedCalibratingCache.from_file(path, llama)
    assert loaded.is_frozen
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    tokens = _tokens(1, 10, seed=5)
    with torch.no_grad():
        first = llama(tokens, use_cache=True, **{CACHE_KEYWORD: cache.empty_copy()}).logits
        second = llama(tokens, use_cache=True, **{CACHE_KEYWORD: loaded.empty_copy()}).logits
    assert torch.equal(first, second)


def test_an_uncalibrated_centred_cache_cannot_freeze(llama: PreTrainedModel) -> None:
    with pytest.raises(CalibrationError, match="before any calibration data was seen"):
        QuantizedCalibratingCache(llama, _centred_config()).freeze()


def test_packed_and_fake_storage_agree_when_centred(llama: PreTrainedModel) -> None:
    fake = _calibrated_cache(llama, _centred_config(method="mse"))
    packed = QuantizedCalibratingCache(llama, _centred_config(method="mse"), storage="packed")
    packed.load_state_dict(fake.state_dict())
    tokens = _tokens(1, 12, seed=7)
    with torch.no_grad():
        first = llama(tokens, use_cache=True, **{CACHE_KEYWORD: fake.empty_copy()}).logits
        second = llama(tokens, use_cache=True, **{CACHE_KEYWORD: packed.empty_copy()}).logits
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.__setitem__("layers.0.key.center", s["layers.0.key.center"] + 1), "center differs"),
        (lambda s: s.__setitem__("layers.0.key.center_count", torch.zeros_like(s["layers.0.key.center_count"])),
         "center_count holds zero"),
        (lambda s: s.pop("layers.0.value.center"), "lacks center"),
        (lambda s: s.__setitem__("layers.0.key.center", s["layers.0.key.center"][:1]), "shapes"),
        (lambda s: s.__setitem__("layers.0.key.center", s["layers.0.key.center"].double()), "expected torch.float32"),
        (lambda s: s.__setitem__("layers.0.key.scale", torch.ones(SHAPE)), "unexpected tensor"),
    ],
)
def test_an_altered_centred_state_is_refused(llama: PreTrainedModel, tmp_path: Path, change, message: str) -> None:
    cache = _calibrated_cache(llama, _centred_config())
    stored = read_state_file(cache.save(tmp_path / "kv.safetensors"))
    tensors = dict(stored.tensors)
    change(tensors)
    altered = type(stored)(**{**stored.__dict__, "tensors": tensors})
    assert any(message in problem for problem in validate_state(altered)), validate_state(altered)
    with pytest.raises(QuantStateError, match=message):
        read_state_file(forge_state_file(tmp_path / "altered.safetensors", altered))


def test_a_calibrating_state_with_a_center_is_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = _calibrated_cache(llama, _centred_config())
    stored = read_state_file(cache.save(tmp_path / "kv.safetensors"))
    altered = type(stored)(**{**stored.__dict__, "mode": "calibrate"})
    assert any("parameters present although mode is 'calibrate'" in p for p in validate_state(altered))


def test_padding_a_calibration_batch_leaves_the_center_unchanged(llama: PreTrainedModel) -> None:
    tokens = _tokens(1, 10, seed=2)
    plain = QuantizedCalibratingCache(llama, _centred_config())
    with torch.no_grad():
        llama(tokens, use_cache=True, **{CACHE_KEYWORD: plain})
    padded = QuantizedCalibratingCache(llama, _centred_config())
    ids = torch.cat([tokens, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # right padding: same positions
    mask = torch.cat([torch.ones_like(tokens), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded.set_attention_mask(mask)
    with torch.no_grad():
        llama(ids, attention_mask=mask, use_cache=True, **{CACHE_KEYWORD: padded})
    for (_, mine), (_, theirs) in zip(plain.quantizers[0].streams, padded.quantizers[0].streams, strict=True):
        torch.testing.assert_close(theirs.observer.center(), mine.observer.center(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- bits
def test_the_center_is_counted_in_effective_bits() -> None:
    plain = QuantArgs(dtype="int4", scope=QuantScope.PER_TOKEN, dynamic=True, symmetric=False)
    extra = stream_bits(CENTRED, KV_HEADS, HEAD_DIM, 64) - stream_bits(plain, KV_HEADS, HEAD_DIM, 64)
    assert extra == pytest.approx(32 / 64)
    assert stream_bits(CENTRED, 3, 64, 1024) == pytest.approx(4.5 + 32 / 1024)


def test_inspect_names_a_centred_scheme_and_its_quantized_layers(
    llama: PreTrainedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quantcache import cli

    config = KVQuantConfig(
        key=CENTRED, value=QuantArgs(dtype="int8", scope="per_token", dynamic=True, rotation="hadamard"), sink_tokens=1
    )
    path = _calibrated_cache(llama, config).save(tmp_path / "kv.safetensors")
    assert cli.main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "2 quantized: 0-1" in printed
    assert "keys int4 per_token asymmetric minmax dynamic centred; values int8 per_token symmetric minmax " in printed
    assert "dynamic hadamard; sink_tokens 1; include *" in printed
