"""Sink tokens: the first ``sink_tokens`` tokens of a sequence stay in full precision.

In full-attention layers they are stored unquantized (fake storage) or next to their
placeholder rows (packed storage), left out of calibration statistics, followed by every
batch operation generation uses (beam reorder, batch expansion, assisted-decoding crops),
and counted in effective bits; sliding-window layers keep none.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import GENERATION_MODES, assert_packed_generates_like_fake
from conftest import random_tokens as _tokens
from transformers import DynamicCache, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INT4 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "symmetric": False}


def _run(model: PreTrainedModel, cache: Any, tokens: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(tokens, use_cache=True, **{CACHE_KEYWORD: cache})


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2", 1025])
def test_sink_tokens_must_be_a_small_whole_number(bad: Any) -> None:
    with pytest.raises(ConfigError, match="sink_tokens: expected a whole number of tokens from 0 to 1024"):
        KVQuantConfig(sink_tokens=bad)


def test_sink_tokens_survive_the_yaml_round_trip() -> None:
    config = KVQuantConfig(**INT4, sink_tokens=2)
    assert config.to_dict()["sink_tokens"] == 2 and "sink_tokens" not in KVQuantConfig().to_dict()
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_the_sink_tokens_are_kept_exactly_and_the_rest_quantized(llama: PreTrainedModel, storage: str) -> None:
    tokens = _tokens(2, 5, seed=1)
    reference = DynamicCache()
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(**INT4, sink_tokens=2), storage=storage).freeze()
    layer = cache.layers[1]
    returned: list[tuple[torch.Tensor, torch.Tensor]] = []
    update = layer.update
    layer.update = lambda *args, **kwargs: returned.append(update(*args, **kwargs)) or returned[-1]
    for chunk in (tokens[:, :1], tokens[:, 1:]):  # the sinks arrive over two updates
        _run(llama, reference, chunk)
        _run(llama, cache, chunk)
    keys, values = returned[-1]
    expected_keys, expected_values = reference.layers[1].keys, reference.layers[1].values
    assert torch.equal(keys[:, :, :2], expected_keys[:, :, :2])
    assert torch.equal(values[:, :, :2], expected_values[:, :, :2])
    assert not torch.equal(keys[:, :, 2:], expected_keys[:, :, 2:])  # the others went through int4


def test_calibration_leaves_the_sink_tokens_out(llama: PreTrainedModel) -> None:
    tokens = _tokens(2, 12, seed=2)
    reference = DynamicCache()
    _run(llama, reference, tokens)
    cache = calibrate(
        llama, tokens, quant_config=KVQuantConfig(sink_tokens=3), freeze=False, progress=False
    ).new_cache()
    for index, layer in enumerate(reference.layers):
        stream = cache.quantizers[index].key
        rest = layer.keys[:, :, 3:]
        assert torch.equal(stream.min, rest.amin(dim=(0, 2)).float())
        assert torch.equal(stream.max, rest.amax(dim=(0, 2)).float())


def test_the_padding_mask_still_lines_up_after_the_sinks(llama: PreTrainedModel) -> None:
    tokens = _tokens(1, 10, seed=3)
    plain = calibrate(
        llama, tokens, quant_config=KVQuantConfig(sink_tokens=1), freeze=False, progress=False
    ).new_cache()
    padded = QuantizedCalibratingCache(llama, KVQuantConfig(sink_tokens=1))
    ids = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(tokens), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded.set_attention_mask(mask)
    with torch.no_grad():
        llama(ids, attention_mask=mask, use_cache=True, **{CACHE_KEYWORD: padded})
    for mine, theirs in zip(plain.quantizers, padded.quantizers, strict=True):
        for name in ("key", "value"):
            for field in ("min", "max"):
                expected, got = getattr(getattr(mine, name), field), getattr(getattr(theirs, name), field)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_storage_generates_what_fake_storage_generates(
    request: pytest.FixtureRequest, arch: str, mode: dict[str, Any]
) -> None:
    config = KVQuantConfig(**INT4, center=True, method="mse", rotation="hadamard", sink_tokens=2)
    model = request.getfixturevalue(arch)
    assert_packed_generates_like_fake(model, config, _tokens(2, 16, seed=1), _tokens(1, 6, seed=4), mode)


def test_batch_operations_carry_the_sinks_along(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(**INT4, sink_tokens=2), storage="packed").freeze()
    _run(llama, cache, _tokens(2, 5, seed=5))
    layer = cache.layers[0]
    first = layer.sink_keys.clone()
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.sink_keys, first.flip(0))
    layer.batch_repeat_interleave(2)
    assert layer.sink_keys.shape[0] == 4 and torch.equal(layer.sink_values[0], layer.sink_values[1])
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer.sink_keys, first.flip(0)[[0, 1]])
    layer.crop(-1)
    assert layer.sink_keys.shape[2] == 2 and layer.keys.shape[2] == 4
    layer.crop(-3)
    assert layer.sink_keys.shape[2] == 1 and layer.keys.shape[2] == 1
    layer.reset()
    assert layer.sink_keys is None and layer.sink_bytes() == 0


def test_sliding_window_layers_keep_no_sinks(gemma3: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(gemma3, KVQuantConfig(**INT4, sink_tokens=2), storage="packed").freeze()
    _run(gemma3, cache, _tokens(1, 6, seed=6))
    kinds = [getattr(layer, "keeps_sinks", True) for layer in cache.layers]
    assert False in kinds and True in kinds
    for layer, keeps in zip(cache.layers, kinds, strict=True):
        assert (layer.sink_keys is not None) == keeps


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_effective_bits_count_the_sinks_a_packed_cache_holds(
    request: pytest.FixtureRequest, arch: str, storage: str
) -> None:
    """The honest count: sink copies are full_precision bytes in memory_report, and effective bits agree."""
    model = request.getfixturevalue(arch)
    config = KVQuantConfig(**INT4, sink_tokens=3)
    without = QuantizedCalibratingCache(model, KVQuantConfig(**INT4), storage=storage)
    cache = QuantizedCalibratingCache(model, config, storage=storage).freeze()
    full = sum(getattr(layer, "keeps_sinks", True) for layer in cache.layers)
    assert cache.sinks_held(40) == [3 if getattr(layer, "keeps_sinks", True) else 0 for layer in cache.layers]
    assert cache.sinks_held(2) == [2 if getattr(layer, "keeps_sinks", True) else 0 for layer in cache.layers]
    added = cache.effective_bits(40, unquantized_bits=32) - without.effective_bits(40, unquantized_bits=32)
    held = sum(cache.held_tokens(40))
    assert added == pytest.approx(full * 2 * 32 * 3 / (2 * held))
    if storage == "packed":
        _run(model, cache, _tokens(1, 40, seed=7))
        report = cache.memory_report()
        elements = sum(entry["dynamic_cache"] for entry in report) // 4
        counted = sum(entry["total"] - entry["reserved"] - entry["encoder"] for entry in report) * 8 / elements
        assert counted == pytest.approx(cache.effective_bits(40, unquantized_bits=32), rel=1e-12)
