"""Presets: every named scheme is a valid config that runs end to end, fake and packed.

``KVQuantConfig.preset(name)`` is what the CLI's ``--preset`` and the quality benchmark hand to users, so
each name in :data:`quantcache.scheme.presets.PRESETS` must calibrate, freeze and drive every ``generate`` mode
(greedy, beams, assisted) on a full-attention and a sliding-window model, with identical results in fake
and packed storage. ``seed`` must stay msModelSlim's scheme exactly; unknown names and bad overrides must
be errors that help; a dynamic preset (its channel means, or no tensor at all) must still save and reload.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import generate_greedy, packed_row_bytes
from conftest import random_tokens as _tokens
from transformers import DynamicCache, PreTrainedModel

from quantcache import CalibrationError, ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.ops.bits import stream_bits
from quantcache.scheme.args import STREAM_KEYS, QuantArgs, QuantScope
from quantcache.scheme.presets import PRESETS, preset_settings

NAMES = sorted(PRESETS)
ARCHS = ("llama", "gemma3")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generate(model: PreTrainedModel, cache: QuantizedCalibratingCache, **settings: Any) -> Any:
    return generate_greedy(model, cache, _tokens(1, 8, seed=3), **settings)


MODES: dict[str, dict[str, Any]] = {"greedy": {}, "beams": {"num_beams": 2}, "assisted": {"assistant_model": None}}


# ================================================================================ end to end
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_every_preset_calibrates_freezes_and_generates_fake_and_packed(
    models: dict[str, PreTrainedModel], arch: str, name: str
) -> None:
    """calibrate -> frozen cache -> greedy, beam (2) and assisted (the same model drafting) generation, in both
    storages: packed gives exactly fake's tokens and logits and holds rows of the preset's width; without a
    residual window, assisted greedy decoding reproduces plain greedy decoding (the cache's crops lose nothing)."""
    if arch == "gemma3" and CACHE_KEYWORD != "cache":
        pytest.skip("transformers 4.x cannot crop a sliding-window layer past its window (assisted decoding)")
    model = models[arch]
    frozen = calibrate(
        model, _tokens(2, 16, seed=1), quant_config=KVQuantConfig.preset(name), progress=False
    ).new_cache()
    assert frozen.is_frozen and frozen.get_seq_length() == 0
    assert frozen.quant_config == KVQuantConfig.preset(name)
    packed_frozen = QuantizedCalibratingCache(model, KVQuantConfig.preset(name), storage="packed")
    packed_frozen.load_state_dict(frozen.state_dict())
    if not packed_frozen.is_frozen:  # an all-dynamic preset has no parameters to load
        packed_frozen.freeze()
    key_args, value_args = frozen.quant_config.key_args, frozen.quant_config.value_args
    outputs: dict[str, dict[str, Any]] = {}
    for storage, source in (("fake", frozen), ("packed", packed_frozen)):
        for mode, settings in MODES.items():
            cache = source.empty_copy()
            run = _generate(model, cache, **{key: model if key == "assistant_model" else value
                                            for key, value in settings.items()})
            outputs.setdefault(storage, {})[mode] = run.sequences, run.logits
            assert run.sequences.shape == (1, 14)
            assert all(torch.isfinite(step).all() for step in run.logits)
            for layer in cache.layers:
                stored = layer.keys
                if storage == "packed":
                    assert stored.dtype == torch.uint8
                    assert stored.shape[-1] == packed_row_bytes(key_args)
                    assert layer.values.shape[-1] == packed_row_bytes(value_args)
                else:
                    assert stored.dtype == torch.float32
    for mode in MODES:
        fake_sequences, fake_logits = outputs["fake"][mode]
        packed_sequences, packed_logits = outputs["packed"][mode]
        assert torch.equal(packed_sequences, fake_sequences), mode
        assert all(torch.equal(a, b) for a, b in zip(packed_logits, fake_logits, strict=True)), mode
    if not frozen.quant_config.residual_window:
        # Assisted decoding verifies candidates in a chunk, and a window keeps the newest tokens of the chunk
        # exact where decoding one token at a time keeps each query's own newest: only without a window are
        # the two the same reads, and then nothing may differ.
        assert torch.equal(outputs["fake"]["assisted"][0], outputs["fake"]["greedy"][0])


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_lose_more_the_fewer_bits_they_spend(models: dict[str, PreTrainedModel], arch: str) -> None:
    """Each preset quantizes (logits move) and the error ranks with the code width: int8 < int4 < int3 < int2,
    and dynamic int8 beats the static seed. A preset wired to the wrong scheme breaks the ranking."""
    model = models[arch]
    prompt = _tokens(2, 136, seed=2)  # five times the longest residual window: most of the history is quantized
    with torch.no_grad():
        reference = model(prompt, **{CACHE_KEYWORD: DynamicCache(config=model.config)}).logits[:, 128:]
    errors: dict[str, float] = {}
    for name in NAMES:
        cache = calibrate(
            model, _tokens(4, 24, seed=1), quant_config=KVQuantConfig.preset(name), progress=False
        ).new_cache()
        with torch.no_grad():  # the second chunk attends to a quantized history
            model(prompt[:, :128], **{CACHE_KEYWORD: cache})
            positions = torch.arange(128, 136).expand(2, -1)
            logits = model(prompt[:, 128:], position_ids=positions, **{CACHE_KEYWORD: cache})
        errors[name] = float((logits.logits - reference).square().mean().sqrt())
    assert all(error > 0 for error in errors.values()), errors
    assert errors["int8"] < errors["int4"] < errors["int3"] < errors["int2"], errors
    assert errors["int8"] < errors["seed"] and errors["int8"] < errors["fp8"], errors


# ================================================================================ the config API
def test_seed_is_the_default_config_and_msmodelslims_four_keys() -> None:
    """``seed`` is the config you get with no arguments, written as msModelSlim's own qconfig."""
    assert KVQuantConfig.preset("seed") == KVQuantConfig()
    assert KVQuantConfig.preset("seed").to_dict()["qconfig"] == {
        "scope": "per_channel",
        "dtype": "int8",
        "symmetric": True,
        "method": "minmax",
    }


@pytest.mark.parametrize("name", ["nope", "INT4", "int4 ", ""])
def test_an_unknown_preset_is_a_config_error_listing_the_names(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown preset") as raised:
        KVQuantConfig.preset(name)
    message = str(raised.value)
    assert all(known in message for known in PRESETS)
    assert repr(name) in message


@pytest.mark.parametrize("name", NAMES)
def test_each_preset_is_what_its_settings_say_and_round_trips(name: str) -> None:
    """The config is built from the table's settings (a copy: editing it cannot change the preset), and survives
    the YAML and dict round trips the CLI and the state file use."""
    config = KVQuantConfig.preset(name)
    settings = preset_settings(name)
    flat = {field: value for field, value in settings.items() if field in STREAM_KEYS}
    for stream in ("key", "value"):  # flat settings are both streams', a stream's own mapping goes on top
        assert getattr(config, stream) == QuantArgs.from_dict({**flat, **settings.get(stream, {})}), stream
    for field, value in settings.items():
        if field not in (*STREAM_KEYS, "key", "value"):
            assert getattr(config, field) == value, field
    settings["dtype"] = "int2"
    assert KVQuantConfig.preset(name) == config
    assert KVQuantConfig.from_dict(config.to_dict()) == config
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize("name", NAMES)
def test_each_description_says_what_its_scheme_is(name: str) -> None:
    """``--preset`` help shows the descriptions: each must name the preset's format, granularity, symmetry,
    rotation and whether it is calibrated, so a changed setting cannot leave a stale description behind."""
    description = PRESETS[name][0].lower()
    args = KVQuantConfig.preset(name).key_args
    assert args.dtype.value.replace("_", " ") in description
    assert ("hadamard" in description) == (args.rotation.value == "hadamard")
    assert ("asymmetric" in description) == (not args.symmetric)
    assert ("mid-rise" in description) == (not args.zero_level)
    assert KVQuantConfig.preset(name).value_args.zero_level == args.zero_level  # both streams, or say which
    value_args = KVQuantConfig.preset(name).value_args
    if value_args.symmetric != args.symmetric:  # streams that differ are named apart
        assert "keys asymmetric, values symmetric" in description
    assert ("per token" in description) == (args.scope in (QuantScope.PER_TOKEN, QuantScope.GROUP))
    assert (f"groups of {args.group_size} channels" in description) == (args.scope is QuantScope.GROUP)
    assert ("per-channel" in description) == (args.scope is QuantScope.PER_CHANNEL)
    assert ("static" in description) == (not args.dynamic)
    assert ("centred on calibrated channel means" in description) == args.center
    clipped = {stream.method.value == "mse" for stream in (args, value_args)}
    assert ("clipped to the least error" in description) == (True in clipped)
    if len(clipped) == 2:  # streams that differ are named apart
        assert "value ranges clipped" in description and "keys take their whole range" in description
    assert args.method.value in ("minmax", "mse")
    config = KVQuantConfig.preset(name)
    window, block = config.residual_window, config.residual_block
    said = f"newest {window} tokens" if block == 1 else f"newest {window} to {window + block - 1} tokens"
    assert (said in description) == bool(window)
    assert (f"leave it {block} at a time" in description) == (block > 1)
    assert ("weighed by calibrated query energy" in description) == args.query_aware
    assert not value_args.query_aware
    assert ("one-byte scales" in description) == (args.scale_format.value == "log8")
    one_byte_zero_points = "one-byte scales and zero points" in description or "one-byte zero points" in description
    assert one_byte_zero_points == (args.zero_point_format.value == "int8")


@pytest.mark.parametrize("name", NAMES)
def test_the_bits_a_description_promises_are_the_accounted_bits(name: str) -> None:
    """Descriptions quote bits per element (keys and values together) for a real model's head_dim (64); the
    accounting must agree."""
    description = PRESETS[name][0]
    promised = re.search(r"~([\d.]+) bits", description)
    if promised is None:
        assert name in ("seed", "c8")  # static: their bits depend on the length the scales are spread over
        return
    config = KVQuantConfig.preset(name)
    streams = (config.key_args, config.value_args)
    bits = sum(stream_bits(args, kv_heads=3, head_dim=64, seq_len=1024) for args in streams) / 2
    assert round(bits, 2) == float(promised.group(1))


def test_overrides_apply_on_top_of_the_preset(llama: PreTrainedModel) -> None:
    """``exclude`` and flat stream keywords replace what the preset says and keep the rest; a cache built from it
    obeys. Storage is the cache's, not the preset's."""
    config = KVQuantConfig.preset("int4", exclude=["model.layers.0.self_attn"])
    assert config.exclude == ("model.layers.0.self_attn",)
    assert config.key_args == KVQuantConfig.preset("int4").key_args
    cache = QuantizedCalibratingCache(llama, config, storage="packed")
    assert cache.quantized_layers == [1] and cache.storage.value == "packed"
    assert KVQuantConfig.preset("int8", symmetric=False).value.symmetric is False
    assert KVQuantConfig.preset("seed", dtype="int3").key.dtype.value == "int3"
    with pytest.raises(TypeError, match="takes no storage"):
        KVQuantConfig.preset("int4", storage="packed")


def test_an_override_that_contradicts_the_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        KVQuantConfig.preset("int4", group_size=8)  # int4 is per token
    with pytest.raises(ConfigError, match="symmetric"):
        KVQuantConfig.preset("fp8", symmetric=False)  # float formats are symmetric only
    with pytest.raises((TypeError, ConfigError), match="no_such_field"):
        KVQuantConfig.preset("int8", no_such_field=1)


# ================================================================================ saving
@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize("name", [name for name in NAMES if KVQuantConfig.preset(name).key_args.dynamic])
def test_a_dynamic_preset_saves_and_reloads_frozen(
    gemma3: PreTrainedModel, name: str, storage: str, tmp_path: Path
) -> None:
    """A dynamic preset saves only its channel means, scales and query model (a centred one) or no tensor at all: the
    file records the scheme, and reloads ready to quantize (fake or packed), generating what the saved cache
    generates."""
    frozen = calibrate(
        gemma3, _tokens(1, 8, seed=4), quant_config=KVQuantConfig.preset(name), progress=False
    ).new_cache()
    fields = {key.rsplit(".", 1)[1] for key in frozen.state_dict()}
    config = KVQuantConfig.preset(name)
    expected = {"center_sum", "center_count", "center"} if config.key_args.center else set()
    if config.key_args.query_aware:  # and the channel scales, with the key and query sums they came from
        expected |= {"key_square_sum", "query_square_sum", "query_count", "channel_scale"}
    if config.key_args.rounding.value == "query_aware":  # and the query model, with the moments it came from
        expected |= {"query_moment_sum", "query_diag", "query_factor"}
    assert fields == expected
    path = frozen.save(tmp_path / f"{name}.safetensors")
    reloaded = QuantizedCalibratingCache.from_file(path, gemma3, storage=storage)
    assert reloaded.is_frozen
    assert reloaded.state_dict().keys() == frozen.state_dict().keys()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in frozen.state_dict().items())
    assert reloaded.quant_config == KVQuantConfig.preset(name) and reloaded.storage.value == storage
    expected = _generate(gemma3, frozen.empty_copy())
    got = _generate(gemma3, reloaded)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))
    # load() into a cache built with the same preset works too; one never frozen has nothing to save.
    loaded = QuantizedCalibratingCache(gemma3, KVQuantConfig.preset(name)).load(path)
    assert loaded.is_frozen
    with pytest.raises(CalibrationError, match="nothing to save"):
        QuantizedCalibratingCache(gemma3, KVQuantConfig.preset(name)).save(tmp_path / "unfrozen.safetensors")
