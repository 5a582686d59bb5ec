"""One calibration, many conversations: a KVQuantizer shared by the caches it makes.

What must hold: a cache from ``new_cache()`` reads the quantizer's parameters without
copying or recomputing them and without touching a file; caches of one frozen quantizer
decode concurrently in threads exactly as they do one after the other; caches that
calibrate add up in their quantizer exactly; what belongs to one conversation (its
padding mask, an evaluation hook) stays with its cache.
"""

from __future__ import annotations

import builtins
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_tokens
from transformers import PreTrainedModel

from quantcache import CalibrationError, KVQuantConfig, KVQuantizer, QuantizedCalibratingCache, calibrate
from quantcache.cache.cache import QuantizationEvent
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.stream import StreamQuantizer
from quantcache.calibration.queries import observe_queries

CALIBRATION = random_tokens(4, 16, seed=21)
PROMPTS = [random_tokens(1, 7 + index, seed=40 + index) for index in range(6)]


def _generate(model: PreTrainedModel, cache: QuantizedCalibratingCache, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, **{CACHE_KEYWORD: cache})
    tokens: torch.Tensor = out[:, prompt.shape[1] :]
    return tokens


@pytest.fixture(scope="module")
def seed_quantizer(llama: PreTrainedModel) -> KVQuantizer:
    return calibrate(llama, CALIBRATION, quant_config=KVQuantConfig(), progress=False)


@pytest.fixture(scope="module")
def int4_quantizer(llama: PreTrainedModel) -> KVQuantizer:
    return calibrate(llama, CALIBRATION, quant_config=KVQuantConfig.preset("int4"), progress=False)


def test_calibrate_returns_a_frozen_quantizer_without_conversation(seed_quantizer: KVQuantizer) -> None:
    assert isinstance(seed_quantizer, KVQuantizer)
    assert seed_quantizer.is_frozen
    assert seed_quantizer.quantized_layers == list(range(len(seed_quantizer.layer_names)))
    assert "layers.0.key.scale" in seed_quantizer.state_dict()


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_new_cache_shares_the_parameters_and_reads_no_file(
    seed_quantizer: KVQuantizer, storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_files(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"new_cache opened a file: {args[:1]}")

    frozen_calls: list[Any] = []
    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(os, "open", no_files)
    monkeypatch.setattr(StreamQuantizer, "freeze", lambda self: frozen_calls.append(self))
    cache = seed_quantizer.new_cache(storage=storage)
    assert isinstance(cache, QuantizedCalibratingCache)
    assert cache.storage.value == storage and cache.get_seq_length() == 0
    assert cache.quantizer is seed_quantizer
    assert all(layer.quantizer is mine for layer, mine in zip(cache.layers, seed_quantizer.quantizers, strict=True))
    assert frozen_calls == []  # nothing recomputed


def test_new_cache_refuses_a_config_beside_a_quantizer(seed_quantizer: KVQuantizer) -> None:
    with pytest.raises(TypeError, match="either a KVQuantizer or a model and config"):
        QuantizedCalibratingCache(seed_quantizer, KVQuantConfig())


@pytest.mark.parametrize(("preset", "storage"), [("seed", "packed"), ("int4", "packed"), ("int4", "fake")])
def test_caches_of_one_loaded_quantizer_decode_in_threads_as_in_sequence(
    llama: PreTrainedModel,
    seed_quantizer: KVQuantizer,
    int4_quantizer: KVQuantizer,
    preset: str,
    storage: str,
    tmp_path: Path,
) -> None:
    calibrated = seed_quantizer if preset == "seed" else int4_quantizer
    quantizer = KVQuantizer.load(calibrated.save(tmp_path / "kv.safetensors"), llama)
    sequential = [_generate(llama, quantizer.new_cache(storage=storage), prompt) for prompt in PROMPTS]
    start = threading.Barrier(len(PROMPTS))

    def run(prompt: torch.Tensor) -> torch.Tensor:
        cache = quantizer.new_cache(storage=storage)
        start.wait()  # every thread decodes at once
        return _generate(llama, cache, prompt)

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        threaded = list(pool.map(run, PROMPTS))
    for expected, got in zip(sequential, threaded, strict=True):
        assert torch.equal(got, expected)
    # the threads' tokens differ from prompt to prompt: a shared conversation would have mixed them up
    assert len({tuple(tokens[0].tolist()) for tokens in sequential}) > 1


def _calibrating_pass(model: PreTrainedModel, cache: QuantizedCalibratingCache, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(ids, **{CACHE_KEYWORD: cache}, use_cache=True)


def test_several_caches_calibrate_one_quantizer_as_one_batch(llama: PreTrainedModel) -> None:
    """Min/max statistics of one cache per row equal those of one forward over all rows, bit for bit."""
    together = KVQuantizer(llama, KVQuantConfig(symmetric=False))
    _calibrating_pass(llama, together.new_cache(), CALIBRATION)
    apart = KVQuantizer(llama, KVQuantConfig(symmetric=False))
    for row in CALIBRATION:
        _calibrating_pass(llama, apart.new_cache(), row.unsqueeze(0))
    expected, got = together.freeze().state_dict(), apart.freeze().state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_caches_calibrating_in_threads_add_up_exactly(llama: PreTrainedModel) -> None:
    rows = random_tokens(8, 12, seed=33)
    sequential = KVQuantizer(llama, KVQuantConfig())
    for row in rows:
        _calibrating_pass(llama, sequential.new_cache(), row.unsqueeze(0))
    threaded = KVQuantizer(llama, KVQuantConfig())
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda row: _calibrating_pass(llama, threaded.new_cache(), row.unsqueeze(0)), rows))
    expected, got = sequential.freeze().state_dict(), threaded.freeze().state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_centred_statistics_from_threads_match_up_to_summation_order(llama: PreTrainedModel) -> None:
    """Sums (centres, query-aware energies) add in whatever order the threads merge: float32 rounding only."""
    rows = random_tokens(6, 12, seed=34)
    config = KVQuantConfig.preset("int4")
    sequential = calibrate(llama, [row.unsqueeze(0) for row in rows], quant_config=config, progress=False)
    threaded = KVQuantizer(llama, config)

    forward = threading.Lock()  # transformers 4.x collects hidden states through hooks shared by every caller

    def feed(row: torch.Tensor) -> None:
        cache = threaded.new_cache()
        with forward, torch.no_grad():
            out = llama(row.unsqueeze(0), **{CACHE_KEYWORD: cache}, use_cache=True, output_hidden_states=True)
        observe_queries(cache, llama, out.hidden_states)  # merges while other threads run the model

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(feed, rows))
    expected, got = sequential.state_dict(), threaded.freeze().state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_calibrate_continues_from_a_copy(llama: PreTrainedModel) -> None:
    first = calibrate(llama, CALIBRATION[:2], quant_config=KVQuantConfig(), freeze=False, progress=False)
    before = {name: tensor.clone() for name, tensor in first.state_dict().items()}
    both = calibrate(llama, CALIBRATION[2:], quantizer=first, progress=False)
    assert both is not first and not first.is_frozen
    assert all(torch.equal(first.state_dict()[name], tensor) for name, tensor in before.items())
    once = calibrate(llama, CALIBRATION, quant_config=KVQuantConfig(), progress=False)
    assert all(torch.equal(both.state_dict()[name], tensor) for name, tensor in once.state_dict().items())


def test_calibrate_refuses_a_frozen_quantizer_and_both_names(
    llama: PreTrainedModel, seed_quantizer: KVQuantizer
) -> None:
    with pytest.raises(ValueError, match="the quantizer is frozen"):
        calibrate(llama, CALIBRATION, quantizer=seed_quantizer, progress=False)
    with pytest.raises(TypeError, match="quantizer= only"):
        calibrate(llama, CALIBRATION, quantizer=seed_quantizer, cache=seed_quantizer, progress=False)


def test_save_and_load_round_trip(tmp_path: Path, llama: PreTrainedModel, int4_quantizer: KVQuantizer) -> None:
    path = int4_quantizer.save(tmp_path / "kv.safetensors")
    loaded = KVQuantizer.load(path, llama)
    assert loaded.is_frozen and loaded.quant_config == int4_quantizer.quant_config
    expected = int4_quantizer.state_dict()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in expected.items())
    prompt = PROMPTS[0]
    assert torch.equal(
        _generate(llama, loaded.new_cache(storage="packed"), prompt),
        _generate(llama, int4_quantizer.new_cache(storage="packed"), prompt),
    )
    # the one-object path reads the same file into a cache of its own quantizer
    cache = QuantizedCalibratingCache.from_file(path, llama, storage="packed")
    assert cache.quantizer is not loaded and cache.storage.value == "packed"
    assert all(torch.equal(cache.state_dict()[name], tensor) for name, tensor in expected.items())


def test_restricted_quantizer_shares_parameters_and_leaves_the_original(int4_quantizer: KVQuantizer) -> None:
    only = int4_quantizer.restricted_to([1])
    assert only.quantized_layers == [1]
    assert int4_quantizer.quantized_layers == list(range(len(int4_quantizer.layer_names)))
    assert only.quantizers[1].key is int4_quantizer.quantizers[1].key


def test_on_quantize_hears_only_its_own_cache(llama: PreTrainedModel, seed_quantizer: KVQuantizer) -> None:
    heard: list[QuantizationEvent] = []
    listening = seed_quantizer.new_cache()
    listening.on_quantize = heard.append
    other = seed_quantizer.new_cache()
    _calibrating_pass(llama, other, PROMPTS[0])
    assert heard == []
    _calibrating_pass(llama, listening, PROMPTS[1])
    layers = len(seed_quantizer.layer_names)
    assert [(event.layer_idx, event.stream) for event in heard] == [
        (index, stream) for index in range(layers) for stream in ("key", "value")
    ]
    first = heard[0]
    assert first.states.shape == first.quantized.shape == first.clipped.shape
    assert torch.equal(first.quantized, listening.layers[0].keys)
    assert listening.empty_copy().on_quantize is listening.on_quantize


def test_attention_masks_stay_with_their_cache(llama: PreTrainedModel) -> None:
    """A padded conversation's mask must not leak into another cache calibrating the same quantizer."""
    ids = random_tokens(1, 10, seed=50)
    padded = torch.cat([torch.zeros((1, 3), dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros((1, 3), dtype=torch.long), torch.ones_like(ids)], dim=1)

    shared = KVQuantizer(llama, KVQuantConfig())
    masked = shared.new_cache().set_attention_mask(mask)
    plain = shared.new_cache()
    with torch.no_grad():
        llama(padded, attention_mask=mask, **{CACHE_KEYWORD: masked}, use_cache=True)
    _calibrating_pass(llama, plain, ids)
    assert all(getattr(layer, "token_mask", None) is None for layer in plain.layers)
    alone = KVQuantizer(llama, KVQuantConfig())
    with torch.no_grad():
        llama(padded, attention_mask=mask, **{CACHE_KEYWORD: alone.new_cache().set_attention_mask(mask)})
    _calibrating_pass(llama, alone.new_cache(), ids)
    expected, got = alone.freeze().state_dict(), shared.freeze().state_dict()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_observe_queries_refuses_a_frozen_quantizer_and_a_bad_layer(
    llama: PreTrainedModel, seed_quantizer: KVQuantizer
) -> None:
    queries = torch.zeros(1, 4, 3, 16)
    with pytest.raises(CalibrationError, match="the quantizer is frozen"):
        seed_quantizer.observe_queries(0, queries)
    calibrating = KVQuantizer(llama, KVQuantConfig.preset("int4"))
    assert calibrating.query_layers == [0, 1] and calibrating.observes_queries
    for index in (-1, 2, True, "0"):
        with pytest.raises(ValueError, match="layer_idx must be a layer index from 0 to 1"):
            calibrating.observe_queries(index, queries)  # type: ignore[arg-type]
    assert KVQuantizer(llama, KVQuantConfig()).query_layers == []


def test_what_a_quantizer_says_of_its_layers(llama: PreTrainedModel, int4_quantizer: KVQuantizer) -> None:
    assert int4_quantizer.needs_calibration
    assert not KVQuantizer(llama, KVQuantConfig(dynamic=True, scope="per_token")).needs_calibration
    assert int4_quantizer.stream_args(1, "key") == int4_quantizer.quant_config.key
    assert int4_quantizer.statistic_fields(0, "value") == ("center_sum", "center_count")
    assert int4_quantizer.restricted_to([0]).statistic_fields(1, "value") == ()
    cache = int4_quantizer.new_cache()
    assert cache.effective_bits(64) == int4_quantizer.effective_bits(64)
    assert cache.held_tokens(64) == int4_quantizer.held_tokens(64) == [64, 64]
    copy = int4_quantizer.copy()
    copy.reset_statistics()
    assert int4_quantizer.is_frozen and "layers.0.key.center" in int4_quantizer.state_dict()
    assert not copy.is_frozen and copy.state_dict() == {}
