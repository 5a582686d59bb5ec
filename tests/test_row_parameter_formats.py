"""What one-byte per-row parameters share: ``scale_format: log8`` and ``zero_point_format: int8``.

Each setting stores a dynamic scheme's per-token parameter (its scale, its zero point) in
one byte instead of two. Both count in the effective bits exactly as a packed cache holds
them, travel through YAML and the state file, may differ between keys and values and be
changed by a layer override. The math of each format has its own module
(``test_scale_format.py``, ``test_zero_point_format.py``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens
from transformers import PreTrainedModel

from quantcache import KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis.state_report import config_text
from quantcache.cache.model_facts import CACHE_KEYWORD

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ASYMMETRIC_INT4 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "symmetric": False}
# setting -> (its one-byte value, its two-byte default, how config_text names the one-byte value)
SETTINGS = {
    "scale_format": ("log8", "float16", "log8 scales"),
    "zero_point_format": ("int8", "int16", "int8 zero points"),
}
NAMES = sorted(SETTINGS)


def _one_byte(setting: str, **more: object) -> dict[str, object]:
    return {**ASYMMETRIC_INT4, setting: SETTINGS[setting][0], **more}


@pytest.mark.parametrize("setting", NAMES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_effective_bits_are_what_a_packed_cache_holds(request: pytest.FixtureRequest, arch: str, setting: str) -> None:
    model = request.getfixturevalue(arch)
    config = KVQuantConfig(**_one_byte(setting))
    cache = QuantizedCalibratingCache(model, config, storage="packed").freeze()
    two_bytes = config.with_stream_args(**{setting: SETTINGS[setting][1]})
    two_bytes = QuantizedCalibratingCache(model, two_bytes, storage="packed").freeze()
    with torch.no_grad():
        model(random_tokens(1, 40, seed=3), **{CACHE_KEYWORD: cache})
    report = cache.memory_report()
    elements = sum(entry["dynamic_cache"] for entry in report) // 4
    counted = sum(entry["total"] - entry["reserved"] - entry["encoder"] for entry in report) * 8 / elements
    assert counted == pytest.approx(cache.effective_bits(40, unquantized_bits=32), rel=1e-12)
    saved = two_bytes.effective_bits(40, unquantized_bits=32) - cache.effective_bits(40, unquantized_bits=32)
    assert saved == pytest.approx(8 / model.config.head_dim)


@pytest.mark.parametrize("setting", NAMES)
def test_a_one_byte_format_round_trips_through_yaml_and_is_named(setting: str) -> None:
    one_byte, default, words = SETTINGS[setting]
    config = KVQuantConfig(**_one_byte(setting))
    assert config.to_dict()["qconfig"][setting] == one_byte
    assert setting not in KVQuantConfig(**{**ASYMMETRIC_INT4, setting: default}).to_dict()["qconfig"]
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert words in config_text(config) and words.split()[-1] not in config_text(KVQuantConfig(**ASYMMETRIC_INT4))


@pytest.mark.parametrize("setting", NAMES)
def test_keys_and_values_may_store_them_apart(setting: str) -> None:
    one_byte, default, _ = SETTINGS[setting]
    config = KVQuantConfig(**_one_byte(setting), value=_one_byte(setting, **{setting: default}))
    assert getattr(config.key_args, setting).value == one_byte
    assert getattr(config.value_args, setting).value == default
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize("setting", NAMES)
def test_a_layer_override_may_change_the_format(setting: str) -> None:
    one_byte, default, _ = SETTINGS[setting]
    layers = [{"include": ["model.layers.0.self_attn"], "qconfig": {setting: default}}]
    config = KVQuantConfig(**_one_byte(setting), layers=layers)
    assert getattr(config.stream_args("key", "model.layers.0.self_attn"), setting).value == default
    assert getattr(config.stream_args("key", "model.layers.1.self_attn"), setting).value == one_byte
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize("setting", NAMES)
def test_a_saved_state_reloads_with_its_format(
    llama: PreTrainedModel, tmp_path: pytest.TempPathFactory, setting: str
) -> None:
    config = KVQuantConfig(**_one_byte(setting, center=True))
    cache = QuantizedCalibratingCache(llama, config)
    with torch.no_grad():
        llama(random_tokens(1, 12, seed=4), **{CACHE_KEYWORD: cache})
    path = cache.freeze().save(tmp_path / "one-byte.safetensors")  # type: ignore[operator]
    loaded = QuantizedCalibratingCache.from_file(path, llama)
    assert loaded.quant_config == config
    with pytest.raises(Exception, match="config"):
        QuantizedCalibratingCache(llama, config.with_stream_args(**{setting: SETTINGS[setting][1]})).load(path)
