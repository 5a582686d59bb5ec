"""QuantizedCalibratingCache on tiny random Llama / Qwen2 / Qwen3 / Gemma3 models.

Calibrate mode must be indistinguishable from ``DynamicCache``; its statistics must equal
the min/max of the key/value states recorded independently; frozen mode must quantize
exactly the new tokens with the calibrated parameters; state must save, load and
validate. Most tests pass the cache as ``cache=``; ``past_key_values=`` (deprecated in
this transformers) is exercised explicitly.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import forge_state_file
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from quantcache import CacheMode, CalibrationError, KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.cache.model_facts import CACHE_KEYWORD, attention_module_names
from quantcache.cache.storage_layers import QuantizingLayerMixin
from quantcache.state.file import read_state_file

# the shapes of conftest.py's tiny models
VOCAB = 128
KV_HEADS = 2
HEAD_DIM = 16
SLIDING_WINDOW = 8
EPS = torch.finfo(torch.float32).eps


# ================================================================================ helpers
def _ids(seed: int, batch: int = 1, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@torch.no_grad()
def _forward(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    return model(ids, **{CACHE_KEYWORD: cache}, use_cache=True).logits


@torch.no_grad()
def _prefill_and_decode(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, steps: int) -> torch.Tensor:
    """Logits of a prefill and ``steps`` greedy decode steps, concatenated along the sequence."""
    logits = [_forward(model, ids, cache)]
    for _ in range(steps):
        token = logits[-1][:, -1:].argmax(-1)
        logits.append(_forward(model, token, cache))
    return torch.cat(logits, dim=1)


@torch.no_grad()
def _teacher_forced(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, decode: int) -> torch.Tensor:
    """Prefill all but the last ``decode`` tokens of ``ids``, then feed those one by one (same inputs for any cache)."""
    logits = [_forward(model, ids[:, : ids.shape[1] - decode], cache)]
    for position in range(ids.shape[1] - decode, ids.shape[1]):
        logits.append(_forward(model, ids[:, position : position + 1], cache))
    return torch.cat(logits, dim=1)


@torch.no_grad()
def _generate(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, steps: int) -> tuple[torch.Tensor, ...]:
    """Greedy tokens and the per-step logits."""
    out = model.generate(
        ids,
        **{CACHE_KEYWORD: cache},
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return (out.sequences, *out.logits)


def _assert_all_equal(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _calibrated(
    model: PreTrainedModel, config: KVQuantConfig | None = None, seeds: tuple[int, ...] = (10, 11), **kwargs: Any
) -> QuantizedCalibratingCache:
    """A cache calibrated on a few random prompts (one per conversation), still in calibrate mode."""
    cache = QuantizedCalibratingCache(model, config, **kwargs)
    for number, seed in enumerate(seeds):
        cache = cache if number == 0 else cache.empty_copy()
        _prefill_and_decode(model, _ids(seed, batch=2, length=10), cache, steps=2)
    return cache.empty_copy()


def _reference_fake_quant(states: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The issue's formula written out here, not the library's: clamp(round(x / s + z)) then (q - z) * s."""
    s = scale.float()[None, :, None, :]
    z = zero_point.float()[None, :, None, :]
    codes = torch.clamp(torch.round(states.float() / s + z), -128, 127)
    return ((codes - z) * s).to(states.dtype)


def _per_channel(chunks: list[torch.Tensor], reduce: str) -> torch.Tensor:
    """min or max over every token of every (batch, kv_heads, seq, head_dim) chunk -> (kv_heads, head_dim)."""
    tokens = torch.cat([chunk.transpose(1, 2).reshape(-1, chunk.shape[1], chunk.shape[3]) for chunk in chunks])
    return tokens.amin(0) if reduce == "min" else tokens.amax(0)


class RecordingDynamicCache(DynamicCache):
    """A plain DynamicCache that also keeps a copy of every key/value state handed to ``update``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.seen.setdefault(layer_idx, []).append((key_states.clone(), value_states.clone()))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class RecordingQuantCache(QuantizedCalibratingCache):
    """The cache under test, keeping a copy of the raw (not yet quantized) states of every update."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.raw.setdefault(layer_idx, []).append((key_states.clone(), value_states.clone()))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _frozen_recorder(model: PreTrainedModel, calibrated: QuantizedCalibratingCache) -> RecordingQuantCache:
    recorder = RecordingQuantCache(model, calibrated.quant_config)
    recorder.load_state_dict(calibrated.state_dict())
    return recorder.freeze()


def _random_states(seed: int, seq: int = 3, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, kv_heads, seq, head_dim, generator=generator)


def _fill_directly(cache: QuantizedCalibratingCache, layers: list[int], seed: int = 0) -> None:
    for layer in layers:
        cache.update(_random_states(seed + 2 * layer), _random_states(seed + 2 * layer + 1), layer)


# ================================================================================ calibrate mode
def _transformers_base(layer: object) -> type:
    """The Transformers layer class a quantizing layer builds on (the first one in its MRO)."""
    return next(base for base in type(layer).__mro__ if base.__module__.startswith("transformers."))


def test_calibrate_mode_forward_is_bit_identical_to_dynamic_cache(tiny_model: PreTrainedModel) -> None:
    ids = _ids(0, batch=2, length=11)
    cache = QuantizedCalibratingCache(tiny_model)
    plain = DynamicCache(config=tiny_model.config)
    assert torch.equal(_prefill_and_decode(tiny_model, ids, cache, 4), _prefill_and_decode(tiny_model, ids, plain, 4))
    assert cache.get_seq_length() == plain.get_seq_length() == 15
    for mine, theirs in zip(cache.layers, plain.layers, strict=True):
        # the same kind of layer (sliding stays sliding), with quantization mixed in
        assert isinstance(mine, type(theirs)) and isinstance(mine, QuantizingLayerMixin)
        assert _transformers_base(mine) is type(theirs)
        assert torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)
    assert cache.mode is CacheMode.CALIBRATE and not cache.is_frozen
    assert all(quantizer.observed for quantizer in cache.quantizers)


def test_calibrate_mode_generate_is_bit_identical_to_dynamic_cache(tiny_model: PreTrainedModel) -> None:
    ids = _ids(1, length=9)
    steps = 2 * SLIDING_WINDOW  # well past Gemma3's window
    mine = _generate(tiny_model, ids, QuantizedCalibratingCache(tiny_model), steps)
    theirs = _generate(tiny_model, ids, DynamicCache(config=tiny_model.config), steps)
    assert mine[0].shape == (1, 9 + steps)
    _assert_all_equal(mine, theirs)


def test_calibrate_mode_with_beam_search_matches_dynamic_cache(llama: PreTrainedModel) -> None:
    ids = _ids(2, batch=2, length=6)
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        mine = llama.generate(ids, **{CACHE_KEYWORD: QuantizedCalibratingCache(llama)}, **kwargs)
        theirs = llama.generate(ids, **{CACHE_KEYWORD: DynamicCache(config=llama.config)}, **kwargs)
    assert torch.equal(mine, theirs)


@pytest.mark.skipif(CACHE_KEYWORD != "cache", reason="the deprecation exists from transformers 5 on")
def test_past_key_values_forward_warns_and_behaves_like_cache_keyword(llama: PreTrainedModel) -> None:
    ids = _ids(3)
    by_keyword = QuantizedCalibratingCache(llama)
    legacy = QuantizedCalibratingCache(llama)
    expected = _forward(llama, ids, by_keyword)
    with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
        logits = llama(ids, past_key_values=legacy, use_cache=True).logits
    assert torch.equal(logits, expected)
    assert legacy.get_seq_length() == 12
    _assert_state_equal(legacy.state_dict(), by_keyword.state_dict())


@pytest.mark.skipif(CACHE_KEYWORD != "cache", reason="the deprecation exists from transformers 5 on")
def test_past_key_values_generate_warns_and_behaves_like_cache_keyword(llama: PreTrainedModel) -> None:
    ids = _ids(4)
    frozen = _calibrated(llama).freeze()
    kwargs: dict[str, Any] = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        expected = llama.generate(ids, **{CACHE_KEYWORD: frozen.empty_copy()}, **kwargs)
        with pytest.warns(FutureWarning, match="past_key_values"):
            tokens = llama.generate(ids, past_key_values=frozen.empty_copy(), **kwargs)
    assert torch.equal(tokens, expected)


# ================================================================================ statistics
def _assert_state_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_statistics_are_minmax_over_every_recorded_state(tiny_model: PreTrainedModel) -> None:
    """Prefill, decode steps, a batch of two and a second call: every token counts."""
    runs = [(_ids(20, batch=2, length=10), 3), (_ids(21, batch=1, length=13), 2)]
    cache = QuantizedCalibratingCache(tiny_model)
    recorded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for number, (ids, steps) in enumerate(runs):
        cache = cache if number == 0 else cache.empty_copy()
        plain = RecordingDynamicCache(config=tiny_model.config)
        assert torch.equal(
            _prefill_and_decode(tiny_model, ids, cache, steps), _prefill_and_decode(tiny_model, ids, plain, steps)
        )
        for layer, states in plain.seen.items():
            recorded.setdefault(layer, []).extend(states)

    num_layers = tiny_model.config.num_hidden_layers
    assert sorted(recorded) == list(range(num_layers))
    state = cache.state_dict()
    for layer in range(num_layers):
        assert len(recorded[layer]) == (1 + 3) + (1 + 2)  # one update per forward
        keys = [k for k, _ in recorded[layer]]
        values = [v for _, v in recorded[layer]]
        assert torch.equal(state[f"layers.{layer}.key.min"], _per_channel(keys, "min"))
        assert torch.equal(state[f"layers.{layer}.key.max"], _per_channel(keys, "max"))
        assert torch.equal(state[f"layers.{layer}.value.min"], _per_channel(values, "min"))
        assert torch.equal(state[f"layers.{layer}.value.max"], _per_channel(values, "max"))
        # the first call alone would give a narrower range: the second call was really folded in
        first_call = keys[:4]
        assert not (
            torch.equal(state[f"layers.{layer}.key.min"], _per_channel(first_call, "min"))
            and torch.equal(state[f"layers.{layer}.key.max"], _per_channel(first_call, "max"))
        )


def test_statistics_match_the_keys_a_plain_dynamic_cache_stores(llama: PreTrainedModel) -> None:
    ids = _ids(22, batch=2, length=8)
    cache = QuantizedCalibratingCache(llama)
    plain = DynamicCache(config=llama.config)
    _prefill_and_decode(llama, ids, cache, 5)
    _prefill_and_decode(llama, ids, plain, 5)
    for layer, stored in enumerate(plain.layers):
        assert stored.keys.shape == (2, KV_HEADS, 13, HEAD_DIM)
        quantizer = cache.quantizers[layer]
        assert torch.equal(quantizer.key.min, stored.keys.amin(dim=(0, 2)))
        assert torch.equal(quantizer.key.max, stored.keys.amax(dim=(0, 2)))
        assert torch.equal(quantizer.value.min, stored.values.amin(dim=(0, 2)))
        assert torch.equal(quantizer.value.max, stored.values.amax(dim=(0, 2)))


def test_statistics_cover_tokens_that_fall_out_of_the_sliding_window(gemma3: PreTrainedModel) -> None:
    ids = _ids(23, length=3 * SLIDING_WINDOW)
    cache = QuantizedCalibratingCache(gemma3)
    _forward(gemma3, ids, cache)
    assert cache.layers[0].keys.shape[2] == SLIDING_WINDOW - 1  # storage keeps only the window
    recorder = RecordingDynamicCache(config=gemma3.config)
    _forward(gemma3, ids, recorder)
    keys = [k for k, _ in recorder.seen[0]]
    assert keys[0].shape[2] == 3 * SLIDING_WINDOW
    assert torch.equal(cache.quantizers[0].key.min, _per_channel(keys, "min"))
    assert torch.equal(cache.quantizers[0].key.max, _per_channel(keys, "max"))


def test_direct_updates_accumulate_running_minmax(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama)
    chunks = [_random_states(seed, seq=seq) * (seed + 1) for seed, seq in enumerate((4, 1, 1, 7))]
    for chunk in chunks:
        cache.update(chunk, -chunk, 0)
    quantizer = cache.quantizers[0]
    assert torch.equal(quantizer.key.min, _per_channel(chunks, "min"))
    assert torch.equal(quantizer.value.max, -_per_channel(chunks, "min"))
    assert cache.layers[0].keys.shape[2] == 13
    assert not cache.quantizers[1].observed


# ================================================================================ frozen mode
def test_frozen_outputs_change_slightly(tiny_model: PreTrainedModel) -> None:
    frozen = _calibrated(tiny_model).freeze()
    assert frozen.is_frozen and frozen.mode is CacheMode.FROZEN
    ids = _ids(30, length=13)
    quantized = _teacher_forced(tiny_model, ids, frozen, 3)
    reference = _teacher_forced(tiny_model, ids, DynamicCache(config=tiny_model.config), 3)
    # measured (seeded): largest |difference| / largest |reference logit|, and 1 - cosine similarity; Gemma 3's
    # sliding-window attention computes otherwise in transformers 4.x
    ratio, distance = {
        "gemma3_text": (0.046042, 8.5419e-4) if CACHE_KEYWORD == "cache" else (0.083787, 1.7756e-3),
        "llama": (0.032384, 3.0142e-4),
        "qwen2": (0.030619, 4.9305e-4),
        "qwen3": (0.045575, 4.8602e-4),
    }[tiny_model.config.model_type]
    difference = (quantized - reference).abs().max()
    assert float(difference / reference.abs().max()) == pytest.approx(ratio, rel=0.01)
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0)
    assert 1 - float(cosine) == pytest.approx(distance, rel=0.02)


def test_asymmetric_frozen_outputs_stay_close(qwen2: PreTrainedModel) -> None:
    frozen = _calibrated(qwen2, KVQuantConfig(symmetric=False)).freeze()
    assert any(bool((t != 0).any()) for k, t in frozen.state_dict().items() if k.endswith("zero_point"))
    ids = _ids(31, length=12)
    quantized = _teacher_forced(qwen2, ids, frozen, 2)
    reference = _teacher_forced(qwen2, ids, DynamicCache(config=qwen2.config), 2)
    assert 0 < (quantized - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_frozen_update_quantizes_only_the_new_tokens(llama: PreTrainedModel, symmetric: bool) -> None:
    calibrated = _calibrated(llama, KVQuantConfig(symmetric=symmetric))
    recorder = _frozen_recorder(llama, calibrated)
    state = recorder.state_dict()
    ids = _ids(32, length=9)
    logits = _forward(llama, ids, recorder)

    snapshots = []
    for layer, stored in enumerate(recorder.layers):
        ((raw_keys, raw_values),) = recorder.raw[layer]
        expected_keys = _reference_fake_quant(
            raw_keys, state[f"layers.{layer}.key.scale"], state[f"layers.{layer}.key.zero_point"]
        )
        expected_values = _reference_fake_quant(
            raw_values, state[f"layers.{layer}.value.scale"], state[f"layers.{layer}.value.zero_point"]
        )
        assert torch.equal(stored.keys, expected_keys)
        assert torch.equal(stored.values, expected_values)
        assert not torch.equal(stored.keys, raw_keys)  # quantization did change something
        snapshots.append((stored.keys.clone(), stored.values.clone()))

    for step in range(2):
        _forward(llama, logits[:, -1:].argmax(-1), recorder)
        for layer, stored in enumerate(recorder.layers):
            old_keys, old_values = snapshots[layer]
            length = old_keys.shape[2]
            assert stored.keys.shape[2] == length + 1
            assert torch.equal(stored.keys[:, :, :length], old_keys)  # earlier tokens untouched
            assert torch.equal(stored.values[:, :, :length], old_values)
            raw_keys, raw_values = recorder.raw[layer][1 + step]
            assert raw_keys.shape[2] == 1
            assert torch.equal(
                stored.keys[:, :, length:],
                _reference_fake_quant(
                    raw_keys, state[f"layers.{layer}.key.scale"], state[f"layers.{layer}.key.zero_point"]
                ),
            )
            assert torch.equal(
                stored.values[:, :, length:],
                _reference_fake_quant(
                    raw_values, state[f"layers.{layer}.value.scale"], state[f"layers.{layer}.value.zero_point"]
                ),
            )
            snapshots[layer] = (stored.keys.clone(), stored.values.clone())


def test_frozen_mode_collects_no_statistics(llama: PreTrainedModel) -> None:
    frozen = _calibrated(llama).freeze()
    before = frozen.state_dict()
    _prefill_and_decode(llama, _ids(33, length=20), frozen, 2)
    big_keys, big_values = 100 * _random_states(33), -100 * _random_states(34)  # far outside the calibrated range
    frozen.update(big_keys, big_values, 0)
    _assert_state_equal(frozen.state_dict(), before)
    stored = frozen.layers[0].keys[:, :, -3:]
    assert stored.abs().max() < 10  # saturated at the calibrated range
    assert torch.equal(
        stored, _reference_fake_quant(big_keys, before["layers.0.key.scale"], before["layers.0.key.zero_point"])
    )


def test_freeze_computes_parameters_from_statistics(llama: PreTrainedModel) -> None:
    for symmetric in (True, False):
        cache = _calibrated(llama, KVQuantConfig(symmetric=symmetric)).freeze()
        state = cache.state_dict()
        for layer in range(2):
            for stream in ("key", "value"):
                low, high = state[f"layers.{layer}.{stream}.min"], state[f"layers.{layer}.{stream}.max"]
                if symmetric:
                    scale = torch.clamp(torch.maximum(-low.clamp(max=0), high.clamp(min=0)) / 127, min=EPS)
                    zero = torch.zeros_like(scale, dtype=torch.int32)
                else:
                    scale = torch.clamp((high - low) / 255, min=EPS)
                    zero = (torch.round(-low / scale) - 128).to(torch.int32)
                assert torch.equal(state[f"layers.{layer}.{stream}.scale"], scale)
                assert torch.equal(state[f"layers.{layer}.{stream}.zero_point"], zero)


# ================================================================================ layer selection
def test_excluded_layer_passes_through_bit_identically(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(exclude=("model.layers.1.self_attn",))
    calibrated = _calibrated(llama, config)
    assert calibrated.quantized_layers == [0]
    assert not calibrated.quantizers[1].observed
    assert calibrated.quantizers[1].key.min is None and calibrated.quantizers[1].value.max is None
    assert {key.split(".")[1] for key in calibrated.state_dict()} == {"0"}

    recorder = _frozen_recorder(llama, calibrated)
    _prefill_and_decode(llama, _ids(40), recorder, 2)
    excluded = recorder.layers[1]
    assert torch.equal(excluded.keys, torch.cat([k for k, _ in recorder.raw[1]], dim=2))
    assert torch.equal(excluded.values, torch.cat([v for _, v in recorder.raw[1]], dim=2))
    assert not torch.equal(recorder.layers[0].keys, torch.cat([k for k, _ in recorder.raw[0]], dim=2))
    assert not recorder.quantizers[1].frozen and recorder.quantizers[1].key.min is None


def test_excluded_first_layer_matches_dynamic_cache(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(include=("model.layers.1.self_attn",))
    frozen = _calibrated(llama, config).freeze()
    assert frozen.quantized_layers == [1]
    ids = _ids(41)
    plain = DynamicCache(config=llama.config)
    quantized = _forward(llama, ids, frozen)
    reference = _forward(llama, ids, plain)
    # layer 0 sees the same input either way and is left alone; layer 1 is quantized
    assert torch.equal(frozen.layers[0].keys, plain.layers[0].keys)
    assert torch.equal(frozen.layers[0].values, plain.layers[0].values)
    assert not torch.equal(frozen.layers[1].keys, plain.layers[1].keys)
    assert not torch.equal(quantized, reference)


def test_exclude_wins_over_include(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(include=("model.layers.{0,1}.self_attn",), exclude=("*layers.1*",))
    cache = QuantizedCalibratingCache(llama, config)
    assert cache.quantized_layers == [0]
    assert [quantizer.enabled for quantizer in cache.quantizers] == [True, False]


def test_everything_excluded_cannot_freeze(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(exclude=("*",)))
    assert cache.quantized_layers == []
    reference = _forward(llama, _ids(42), DynamicCache(config=llama.config))
    assert torch.equal(_forward(llama, _ids(42), cache), reference)
    assert cache.state_dict() == {}
    with pytest.raises(CalibrationError, match="no layer is selected"):
        cache.freeze()
    with pytest.raises(CalibrationError, match="nothing to save"):
        cache.save(tmp_path / "kv.safetensors")
    assert list(tmp_path.iterdir()) == []


class _Wrapper(nn.Module):
    """A model whose attention modules live under another prefix (``lm.model.layers.{i}.self_attn``)."""

    def __init__(self, inner: PreTrainedModel) -> None:
        super().__init__()
        self.config = inner.config
        self.lm = inner


def test_module_names_come_from_the_model(llama: PreTrainedModel, gemma3: PreTrainedModel) -> None:
    assert attention_module_names(llama, 2) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert attention_module_names(gemma3, 4) == [f"model.layers.{i}.self_attn" for i in range(4)]
    wrapped = _Wrapper(llama)
    assert attention_module_names(wrapped, 3) == [
        "lm.model.layers.0.self_attn",
        "lm.model.layers.1.self_attn",
        "model.layers.2.self_attn",  # no module claims index 2: the conventional name
    ]
    config = KVQuantConfig(include=("lm.model.layers.1.self_attn",))
    cache = QuantizedCalibratingCache(wrapped, config)
    assert cache.layer_names == ["lm.model.layers.0.self_attn", "lm.model.layers.1.self_attn"]
    assert cache.quantized_layers == [1]
    with pytest.warns(UserWarning, match="matches no attention module"):
        from_config = QuantizedCalibratingCache(llama.config, config)
    assert from_config.quantized_layers == []


def test_include_a_single_layer_by_its_name(qwen2: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(qwen2, KVQuantConfig(include=("model.layers.1.self_attn",)))
    assert cache.quantized_layers == [1]
    _forward(qwen2, _ids(43), cache)
    assert [quantizer.observed for quantizer in cache.quantizers] == [False, True, False]
    assert sorted(cache.state_dict()) == [f"layers.1.{s}.{f}" for s in ("key", "value") for f in ("max", "min")]
    cache.freeze()  # the excluded, unobserved layers do not block freezing
    assert cache.quantizers[1].frozen and not cache.quantizers[0].frozen


def test_warns_on_unmatched_pattern(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(include=("model.layers.*.self_atn",))
    with pytest.warns(UserWarning, match=r"'model\.layers\.\*\.self_atn' matches no attention module"):
        cache = QuantizedCalibratingCache(llama, config)
    assert cache.quantized_layers == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizedCalibratingCache(llama, config, warn_unmatched=False)
        QuantizedCalibratingCache(llama, KVQuantConfig(include=("model.layers.{0,1}.self_attn",)))


def test_from_config_gives_conventional_names(gemma3: PreTrainedModel, llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(gemma3.config)
    assert cache.layer_names == [f"model.layers.{i}.self_attn" for i in range(4)]
    assert cache.quantized_layers == [0, 1, 2, 3]
    assert (cache.kv_heads, cache.head_dim) == (KV_HEADS, HEAD_DIM)
    # each layer is the quantizing counterpart of the layer DynamicCache builds (sliding stays sliding)
    assert [_transformers_base(layer).__name__ for layer in cache.layers] == [
        type(layer).__name__ for layer in DynamicCache(config=gemma3.config).layers
    ]
    # a cache built from the config works with the model like one built from the model
    from_config = QuantizedCalibratingCache(llama.config)
    from_model = QuantizedCalibratingCache(llama)
    ids = _ids(44)
    assert torch.equal(_forward(llama, ids, from_config), _forward(llama, ids, from_model))
    _assert_state_equal(from_config.state_dict(), from_model.state_dict())


@pytest.mark.parametrize("thing", [object(), nn.Linear(2, 2), "meta-llama/Llama-3.2-1B", None])
def test_non_model_is_a_type_error(thing: object) -> None:
    with pytest.raises(TypeError, match="transformers model or its config"):
        QuantizedCalibratingCache(thing)  # type: ignore[arg-type]


# ================================================================================ mode changes & copies
def test_unfreeze_keeps_statistics_and_drops_parameters(llama: PreTrainedModel) -> None:
    cache = _calibrated(llama)
    statistics = cache.state_dict()
    cache.freeze()
    assert any(key.endswith(".scale") for key in cache.state_dict())
    assert cache.unfreeze() is cache
    assert cache.mode is CacheMode.CALIBRATE
    _assert_state_equal(cache.state_dict(), statistics)
    assert all(quantizer.key.params is None and quantizer.value.params is None for quantizer in cache.quantizers)
    # calibrating again extends the kept statistics
    more = cache.empty_copy()
    big = _ids(45, length=16)
    assert torch.equal(_forward(llama, big, more), _forward(llama, big, DynamicCache(config=llama.config)))
    for key, old in statistics.items():
        new = more.state_dict()[key]
        assert torch.all(new <= old) if key.endswith("min") else torch.all(new >= old)
    assert any(not torch.equal(more.state_dict()[key], old) for key, old in statistics.items())


def test_reset_statistics(llama: PreTrainedModel) -> None:
    cache = _calibrated(llama).freeze()
    assert cache.reset_statistics() is cache
    assert cache.mode is CacheMode.CALIBRATE
    assert cache.state_dict() == {}
    assert all(not q.observed and not q.frozen for q in cache.quantizers)
    with pytest.raises(CalibrationError, match="before any calibration"):
        cache.freeze()


def test_empty_copy_is_empty_but_keeps_parameters(gemma3: PreTrainedModel) -> None:
    frozen = _calibrated(gemma3).freeze()
    _prefill_and_decode(gemma3, _ids(50), frozen, 1)
    assert frozen.get_seq_length() > 0
    fresh = frozen.empty_copy()
    assert fresh.get_seq_length() == 0
    assert fresh.is_frozen
    assert [type(layer) for layer in fresh.layers] == [type(layer) for layer in frozen.layers]
    assert all(not getattr(layer, "is_initialized", False) for layer in fresh.layers)
    _assert_state_equal(fresh.state_dict(), frozen.state_dict())
    assert fresh.layers is not frozen.layers
    assert fresh.quantizer is frozen.quantizer  # one calibration, a new conversation

    stored = [layer.keys.clone() for layer in frozen.layers]
    _prefill_and_decode(gemma3, _ids(51), fresh, 1)
    assert all(torch.equal(layer.keys, old) for layer, old in zip(frozen.layers, stored, strict=True))

    # a copy of the quantizer has statistics of its own
    before = frozen.state_dict()
    independent = frozen.quantizer.copy().new_cache()
    independent.unfreeze()
    _forward(gemma3, _ids(52, length=20), independent.empty_copy())
    independent.reset_statistics()
    _assert_state_equal(frozen.state_dict(), before)
    assert frozen.is_frozen


def test_empty_copy_in_calibrate_mode_adds_to_the_same_statistics(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama)
    _forward(llama, _ids(53), cache)
    before = cache.state_dict()
    fresh = cache.empty_copy()
    _forward(llama, _ids(54, length=20), fresh)
    assert fresh.state_dict().keys() == before.keys()
    _assert_state_equal(cache.state_dict(), fresh.state_dict())
    assert any(not torch.equal(fresh.state_dict()[k], before[k]) for k in before)
    # what two caches calibrated is the min/max over both conversations
    for name, tensor in before.items():
        reduce = torch.minimum if name.endswith(".min") else torch.maximum
        assert torch.equal(reduce(tensor, fresh.state_dict()[name]), fresh.state_dict()[name])


def test_deepcopy(llama: PreTrainedModel) -> None:
    frozen = _calibrated(llama).freeze()
    logits = _forward(llama, _ids(55), frozen)
    duplicate = copy.deepcopy(frozen)
    assert duplicate.is_frozen and duplicate.get_seq_length() == frozen.get_seq_length()
    _assert_state_equal(duplicate.state_dict(), frozen.state_dict())
    token = logits[:, -1:].argmax(-1)
    assert torch.equal(_forward(llama, token, duplicate), _forward(llama, token, frozen))
    for mine, theirs in zip(duplicate.layers, frozen.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and mine.keys is not theirs.keys
    before = frozen.state_dict()
    duplicate.reset_statistics()
    _assert_state_equal(frozen.state_dict(), before)
    assert frozen.is_frozen


def test_repr(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(include=("model.layers.0.self_attn",)))
    _forward(llama, _ids(56, length=5), cache)
    assert repr(cache) == "QuantizedCalibratingCache(mode=calibrate, storage=fake, layers=2, quantized=1, seq_length=5)"
    assert repr(cache.quantizer) == "KVQuantizer(mode=calibrate, layers=2, quantized=1)"


# ================================================================================ state dict
def test_state_dict_keys_shapes_dtypes(qwen3: PreTrainedModel) -> None:
    cache = _calibrated(qwen3)
    layers = range(qwen3.config.num_hidden_layers)
    stats = {f"layers.{i}.{s}.{f}" for i in layers for s in ("key", "value") for f in ("min", "max")}
    state = cache.state_dict()
    assert set(state) == stats
    for tensor in state.values():
        assert tensor.shape == (KV_HEADS, HEAD_DIM) and tensor.dtype == torch.float32
    assert all(torch.all(state[k.replace("min", "max")] >= state[k]) for k in state if k.endswith("min"))

    cache.freeze()
    state = cache.state_dict()
    params = {f"layers.{i}.{s}.{f}" for i in layers for s in ("key", "value") for f in ("scale", "zero_point")}
    assert set(state) == stats | params
    for key, tensor in state.items():
        assert tensor.shape == (KV_HEADS, HEAD_DIM)
        assert tensor.dtype == (torch.int32 if key.endswith("zero_point") else torch.float32)
    # a snapshot, not a view into the cache
    state["layers.0.key.min"].fill_(123.0)
    assert not torch.equal(cache.state_dict()["layers.0.key.min"], state["layers.0.key.min"])


def test_load_state_dict_restores_frozen_behaviour(llama: PreTrainedModel) -> None:
    frozen = _calibrated(llama).freeze()
    loaded = QuantizedCalibratingCache(llama)
    assert loaded.load_state_dict(frozen.state_dict()) == []
    assert loaded.is_frozen
    _assert_state_equal(loaded.state_dict(), frozen.state_dict())
    ids = _ids(60)
    _assert_all_equal(_generate(llama, ids, loaded, 4), _generate(llama, ids, frozen.empty_copy(), 4))


def test_load_state_dict_of_statistics_only_is_calibrate_mode(llama: PreTrainedModel) -> None:
    calibrated = _calibrated(llama)
    target = _calibrated(llama, seeds=(99,)).freeze()
    target.load_state_dict(calibrated.state_dict())
    assert target.mode is CacheMode.CALIBRATE
    assert all(q.key.params is None for q in target.quantizers)
    _assert_state_equal(target.state_dict(), calibrated.state_dict())


def _drop(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.startswith(prefix)}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: _drop(s, "layers.1."), r"no entries for quantized layers \[1\].*model\.layers\.1\.self_attn"),
        (lambda s: _drop(s, "layers.0.value.max"), r"missing \['layers\.0\.value\.max'\].*layer 0"),
        (lambda s: _drop(s, "layers.1.key.scale"), r"missing \['layers\.1\.key\.scale'\]"),
        (lambda s: {**s, "layers.0.key.mean": s["layers.0.key.min"]}, r"does not use.*layers\.0\.key\.mean"),
        (lambda s: {**s, "layers.2.key.min": s["layers.0.key.min"]}, r"does not use.*layers\.2\.key\.min"),
        (lambda s: {**s, "model.bias": torch.zeros(1)}, r"does not use.*model\.bias"),
        (
            lambda s: {**s, "layers.1.value.min": torch.zeros(KV_HEADS, HEAD_DIM + 1)},
            r"layer 1 .*value tensors have shapes.*\(2, 17\).*\(2, 16\)",
        ),
        (
            lambda s: {k: (v[:1] if k.startswith("layers.0.key") else v) for k, v in s.items()},
            r"layer 0 .*key.*\(1, 16\).*another model",
        ),
        (
            lambda s: {**s, "layers.0.key.max": torch.full((KV_HEADS, HEAD_DIM), float("nan"))},
            r"layers\.0\.key\.max contains NaN",
        ),
    ],
)
def test_strict_load_errors_leave_the_cache_unchanged(
    llama: PreTrainedModel, mutate: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], message: str
) -> None:
    good = _calibrated(llama).freeze().state_dict()
    target = _calibrated(llama, seeds=(98,))
    before = target.state_dict()
    with pytest.raises(QuantStateError, match=message):
        target.load_state_dict(mutate(good))
    assert target.mode is CacheMode.CALIBRATE
    _assert_state_equal(target.state_dict(), before)


def test_non_strict_load_returns_unexpected_keys(llama: PreTrainedModel) -> None:
    frozen = _calibrated(llama).freeze()
    extra = {"layers.0.key.mean": torch.zeros(KV_HEADS, HEAD_DIM), "layers.7.value.min": torch.zeros(2, 16)}
    target = QuantizedCalibratingCache(llama)
    unexpected = target.load_state_dict({**frozen.state_dict(), **extra}, strict=False)
    assert sorted(unexpected) == sorted(extra)
    _assert_state_equal(target.state_dict(), frozen.state_dict())
    # non-strict tolerates a missing layer of statistics, but a frozen state must freeze every quantized layer
    partial = _drop(frozen.state_dict(), "layers.1.")
    with pytest.raises(QuantStateError, match=r"none for quantized layers \[1\]"):
        QuantizedCalibratingCache(llama).load_state_dict(partial, strict=False)
    statistics_only = {k: v for k, v in partial.items() if k.endswith((".min", ".max"))}
    assert QuantizedCalibratingCache(llama).load_state_dict(statistics_only, strict=False) == []
    with pytest.raises(QuantStateError, match="missing"):
        QuantizedCalibratingCache(llama).load_state_dict(_drop(partial, "layers.0.key.min"), strict=False)


def test_state_for_an_excluded_layer_is_unexpected(llama: PreTrainedModel) -> None:
    full = _calibrated(llama).freeze().state_dict()
    only_first = QuantizedCalibratingCache(llama, KVQuantConfig(include=("model.layers.0.self_attn",)))
    with pytest.raises(QuantStateError, match=r"does not use.*layers\.1\..*quantized layers here: \[0\]"):
        only_first.load_state_dict(full)
    assert sorted(only_first.load_state_dict(full, strict=False)) == sorted(k for k in full if k.startswith("layers.1"))
    assert only_first.quantized_layers == [0] and only_first.quantizers[0].frozen


# ================================================================================ files
def test_save_and_from_file_round_trip_is_bit_identical(tiny_model: PreTrainedModel, tmp_path: Path) -> None:
    frozen = _calibrated(tiny_model, KVQuantConfig(symmetric=False, exclude=("*layers.0*",))).freeze()
    path = frozen.save(tmp_path / "sub" / "kv.safetensors")
    assert path == tmp_path / "sub" / "kv.safetensors" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["kv.safetensors"]  # no temporary left behind

    reloaded = QuantizedCalibratingCache.from_file(path, tiny_model)
    assert reloaded.quant_config == frozen.quant_config
    assert reloaded.is_frozen
    _assert_state_equal(reloaded.state_dict(), frozen.state_dict())
    ids = _ids(70, length=10)
    expected = _generate(tiny_model, ids, frozen.empty_copy(), 5)
    _assert_all_equal(_generate(tiny_model, ids, reloaded, 5), expected)
    # load() into an existing cache with the same config behaves the same
    target = QuantizedCalibratingCache(tiny_model, frozen.quant_config)
    assert target.load(str(path)) is target
    _assert_all_equal(_generate(tiny_model, ids, target, 5), expected)
    assert torch.equal(
        _forward(tiny_model, ids, frozen.empty_copy()),
        _forward(tiny_model, ids, QuantizedCalibratingCache.from_file(path, tiny_model.config)),
    )


def test_saved_file_metadata(llama: PreTrainedModel, tmp_path: Path) -> None:
    config = KVQuantConfig(symmetric=False)
    path = _calibrated(llama, config).save(tmp_path / "kv.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        names = set(handle.keys())
    fields = {key: json.loads(value) for key, value in metadata.items()}  # every value is one JSON document
    assert fields["format"] == "quantcache.kv_state"
    assert fields["format_version"] == 2
    assert fields["mode"] == "calibrate"
    assert fields["config"] == config.to_dict()
    model = fields["model"]
    assert model["num_layers"] == 2
    assert model["kv_heads"] == KV_HEADS
    assert model["head_dim"] == HEAD_DIM
    assert model["layer_names"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert model["model_type"] == "llama"
    assert isinstance(model["config_sha256"], str) and len(model["config_sha256"]) == 64
    assert fields["checksum"].startswith("sha256:") and len(fields["checksum"]) == 7 + 64
    assert "zero_point" in fields["encoding"]["dequantize"] and fields["encoding"]["dtypes"]["zero_point"] == "I32"
    assert names == {f"layers.{i}.{s}.{f}" for i in range(2) for s in ("key", "value") for f in ("min", "max")}
    reloaded = QuantizedCalibratingCache.from_file(path, llama)
    assert reloaded.mode is CacheMode.CALIBRATE and reloaded.quant_config == config


def test_load_with_another_config_is_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    path = _calibrated(llama).freeze().save(tmp_path / "kv.safetensors")
    other = QuantizedCalibratingCache(llama, KVQuantConfig(symmetric=False))
    with pytest.raises(QuantStateError, match=r"calibrated with config.*KVQuantizer\.load\(path, model\)"):
        other.load(path)
    assert other.state_dict() == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_key_value_heads": 4}, "kv_heads 2 vs 4"),
        ({"head_dim": 8}, "head_dim 16 vs 8"),
        ({"num_hidden_layers": 3}, "num_layers 2 vs 3"),
    ],
)
def test_from_file_for_another_model_shape(
    llama: PreTrainedModel,
    make_model: Callable[..., PreTrainedModel],
    tmp_path: Path,
    overrides: dict[str, int],
    message: str,
) -> None:
    path = _calibrated(llama).freeze().save(tmp_path / "kv.safetensors")
    other = make_model("llama", **overrides)
    with pytest.raises(QuantStateError, match=rf"made for another model: {message} \(file vs this model\)"):
        QuantizedCalibratingCache.from_file(path, other)
    with pytest.raises(QuantStateError, match=message):
        QuantizedCalibratingCache(other).load(path)


def test_from_file_for_another_architecture_with_more_layers(
    llama: PreTrainedModel, qwen2: PreTrainedModel, tmp_path: Path
) -> None:
    path = _calibrated(llama).freeze().save(tmp_path / "kv.safetensors")
    with pytest.raises(QuantStateError, match="num_layers 2 vs 3"):
        QuantizedCalibratingCache.from_file(path, qwen2)


@pytest.fixture
def saved_state(llama: PreTrainedModel, tmp_path: Path) -> Path:
    return _calibrated(llama).freeze().save(tmp_path / "kv.safetensors")


def _rewrite_metadata(path: Path, **changes: str | None) -> Path:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    target = path.with_name("edited.safetensors")
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_truncated_file(saved_state: Path, llama: PreTrainedModel) -> None:
    data = saved_state.read_bytes()
    saved_state.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantStateError, match="truncated or corrupted"):
        QuantizedCalibratingCache.from_file(saved_state, llama)


@pytest.mark.parametrize("where", ["length", "json"])
def test_corrupted_header(saved_state: Path, llama: PreTrainedModel, where: str) -> None:
    data = bytearray(saved_state.read_bytes())
    if where == "length":
        data[:8] = (2**40).to_bytes(8, "little")
    else:
        assert data[8:9] == b"{"
        data[8:12] = b"#!%@"
    saved_state.write_bytes(bytes(data))
    with pytest.raises(QuantStateError, match="not a readable safetensors file"):
        QuantizedCalibratingCache.from_file(saved_state, llama)
    with pytest.raises(QuantStateError):
        QuantizedCalibratingCache(llama).load(saved_state)


def test_not_a_safetensors_file(tmp_path: Path, llama: PreTrainedModel) -> None:
    path = tmp_path / "kv.safetensors"
    path.write_text("hello, I am text\n")
    with pytest.raises(QuantStateError, match="not a readable safetensors file"):
        QuantizedCalibratingCache.from_file(path, llama)


def test_safetensors_file_not_from_quantcache(tmp_path: Path, llama: PreTrainedModel) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"layers.0.key.min": torch.zeros(KV_HEADS, HEAD_DIM)}, str(path), metadata={"format": "pt"})
    with pytest.raises(QuantStateError, match=r"not a quantcache KV state.*'pt'"):
        QuantizedCalibratingCache.from_file(path, llama)
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(QuantStateError, match=r"not a quantcache KV state.*None"):
        QuantizedCalibratingCache.from_file(path, llama)


def test_wrong_format_version(saved_state: Path, llama: PreTrainedModel) -> None:
    edited = _rewrite_metadata(saved_state, format_version="99")
    with pytest.raises(QuantStateError, match="format version 99 is not supported"):
        QuantizedCalibratingCache.from_file(edited, llama)
    untouched = _rewrite_metadata(saved_state)
    assert QuantizedCalibratingCache.from_file(untouched, llama).is_frozen  # the rewrite itself is harmless


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"config": "{not json"}, "'config' is corrupted"),
        ({"config": json.dumps({"type": "dynamic_cache", "qconfig": {"dtype": "int5"}})}, "stored config is invalid"),
        ({"model": None}, "lacks 'model'"),
        ({"mode": json.dumps("quantized")}, "'mode' is 'quantized'"),
        ({"model": json.dumps({"num_layers": 2, "layer_names": ["only.one"]})}, "inconsistent"),
        ({"checksum": json.dumps("sha256:" + "0" * 64)}, "checksum mismatch"),
        ({"quantcache_version": json.dumps("9.9.9")}, "checksum mismatch"),
    ],
)
def test_damaged_metadata(
    saved_state: Path, llama: PreTrainedModel, changes: dict[str, str | None], message: str
) -> None:
    with pytest.raises(QuantStateError, match=message):
        QuantizedCalibratingCache.from_file(_rewrite_metadata(saved_state, **changes), llama)


def test_file_with_missing_tensors(saved_state: Path, llama: PreTrainedModel) -> None:
    stored = read_state_file(saved_state)
    tensors = {n: t for n, t in stored.tensors.items() if n != "layers.1.value.zero_point"}
    # written with a valid checksum: the validator itself must notice the gap
    forge_state_file(saved_state, replace(stored, tensors=tensors))
    with pytest.raises(QuantStateError, match=r"missing \['layers\.1\.value\.zero_point'\]"):
        QuantizedCalibratingCache.from_file(saved_state, llama)


def test_file_with_a_tensor_removed_behind_its_back(saved_state: Path, llama: PreTrainedModel) -> None:
    with safe_open(str(saved_state), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {n: handle.get_tensor(n) for n in handle.keys() if n != "layers.1.value.zero_point"}  # noqa: SIM118
    save_file(tensors, str(saved_state), metadata=metadata)
    with pytest.raises(QuantStateError, match="checksum mismatch"):
        QuantizedCalibratingCache.from_file(saved_state, llama)


def test_missing_file(tmp_path: Path, llama: PreTrainedModel) -> None:
    with pytest.raises(QuantStateError, match="not found"):
        QuantizedCalibratingCache.from_file(tmp_path / "nope.safetensors", llama)
    with pytest.raises(QuantStateError, match="not found"):
        QuantizedCalibratingCache(llama).load(tmp_path / "nope.safetensors")


def test_save_to_a_directory_is_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    with pytest.raises(QuantStateError, match="is a directory"):
        _calibrated(llama).save(tmp_path)


# ================================================================================ errors
def test_freeze_without_statistics(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama)
    with pytest.raises(CalibrationError, match="before any calibration data"):
        cache.freeze()
    assert cache.mode is CacheMode.CALIBRATE


def test_freeze_with_an_included_layer_never_observed(qwen2: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(qwen2)
    _fill_directly(cache, [0, 2])
    with pytest.raises(CalibrationError, match=r"never observed.*: 1 \(model\.layers\.1\.self_attn\); ") as info:
        cache.freeze()
    assert "model.layers.0" not in str(info.value) and "model.layers.2" not in str(info.value)
    assert cache.mode is CacheMode.CALIBRATE
    assert all(q.params is None for q in (cache.quantizers[0].key, cache.quantizers[2].value))
    # excluding the unobserved layer is the documented way out
    excluded = QuantizedCalibratingCache(qwen2, KVQuantConfig(exclude=("model.layers.1.self_attn",)))
    _fill_directly(excluded, [0, 2])
    assert excluded.freeze().is_frozen


@pytest.mark.parametrize(("bad", "stream"), [(float("nan"), "keys"), (float("inf"), "values"), (-float("inf"), "keys")])
def test_non_finite_states_name_the_layer(llama: PreTrainedModel, bad: float, stream: str) -> None:
    cache = QuantizedCalibratingCache(llama)
    _fill_directly(cache, [0])
    keys, values = _random_states(5), _random_states(6)
    (keys if stream == "keys" else values)[0, 1, 2, 3] = bad
    with pytest.raises(CalibrationError, match=rf"layer 1 \(model\.layers\.1\.self_attn\) {stream}.*NaN or Inf"):
        cache.update(keys, values, 1)


def test_huge_finite_states_are_not_mistaken_for_non_finite(llama: PreTrainedModel) -> None:
    """The calibration check sums the new statistics first; a sum that overflows must fall back to looking at
    each element, not report NaN or Inf that are not there."""
    cache = QuantizedCalibratingCache(llama)
    huge = _random_states(7).sign() * 3e37
    assert not torch.isfinite(huge.sum()) and torch.isfinite(huge).all()
    cache.update(huge, huge, 0)
    assert torch.equal(cache.quantizers[0].key.max, huge.amax(dim=(0, 2)))


def test_nan_during_a_model_forward_is_reported(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama)
    handle = llama.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(CalibrationError, match=r"layer 1 \(model\.layers\.1\.self_attn\) keys"):
            _forward(llama, _ids(80), cache)
    finally:
        handle.remove()


def test_states_of_another_shape_on_a_frozen_layer(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama)
    _fill_directly(cache, [0, 1])
    cache.freeze()
    cache.update(_random_states(7), _random_states(8), 0)  # right shape: fine
    for kv_heads, head_dim in ((KV_HEADS + 1, HEAD_DIM), (KV_HEADS, HEAD_DIM // 2)):
        with pytest.raises(
            CalibrationError, match=r"layer 1 \(model\.layers\.1\.self_attn\) keys.*do not fit.*\(2, 16\)"
        ):
            cache.update(
                _random_states(9, kv_heads=kv_heads, head_dim=head_dim),
                _random_states(10, kv_heads=kv_heads, head_dim=head_dim),
                1,
            )
    assert cache.layers[1].keys.shape[2] == 3  # nothing stored by the failed updates


def test_states_of_another_shape_while_calibrating(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama)
    _fill_directly(cache, [0])
    with pytest.raises(CalibrationError, match="do not fit"):
        cache.update(_random_states(1, kv_heads=1), _random_states(2, kv_heads=1), 0)


@pytest.mark.parametrize("layer_idx", [2, 5, -1])
def test_layer_index_out_of_range(llama: PreTrainedModel, layer_idx: int) -> None:
    cache = QuantizedCalibratingCache(llama)
    with pytest.raises(IndexError, match=rf"layer_idx {layer_idx} is outside this cache's 2 layers"):
        cache.update(_random_states(0), _random_states(1), layer_idx)


# ================================================================================ sliding windows
def test_gemma3_sliding_layers_keep_their_window_when_frozen(gemma3: PreTrainedModel) -> None:
    frozen = _calibrated(gemma3).freeze()
    ids = _ids(90, length=6)
    steps = 3 * SLIDING_WINDOW
    quantized = frozen.empty_copy()
    plain = DynamicCache(config=gemma3.config)
    tokens = _generate(gemma3, ids, quantized, steps)[0]
    _generate(gemma3, ids, plain, steps)
    assert tokens.shape[1] == 6 + steps
    total = 6 + steps - 1  # the last token is generated but never fed back
    lengths = [layer.keys.shape[2] for layer in quantized.layers]
    assert lengths == [layer.keys.shape[2] for layer in plain.layers]
    for layer, layer_type in zip(quantized.layers, gemma3.config.layer_types, strict=True):
        if layer_type == "sliding_attention":
            assert layer.is_sliding and layer.keys.shape[2] <= SLIDING_WINDOW
        else:
            assert not layer.is_sliding and layer.keys.shape[2] == total
    assert quantized.get_seq_length() == total


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("name", "mode", "symmetric"),
    [
        ("v1_llama_symmetric_frozen", CacheMode.FROZEN, True),
        ("v1_llama_asymmetric_frozen", CacheMode.FROZEN, False),
        ("v1_llama_symmetric_calibrate", CacheMode.CALIBRATE, True),
    ],
)
def test_version_1_files_still_load(llama: PreTrainedModel, name: str, mode: CacheMode, symmetric: bool) -> None:
    # Written by quantcache 0.1.0 (format version 1, no checksum) from the tiny llama of conftest.py.
    path = DATA / f"{name}.safetensors"
    stored = read_state_file(path)
    assert stored.format_version == 1
    cache = QuantizedCalibratingCache.from_file(path, llama)
    assert cache.mode is mode and cache.quant_config.key.symmetric is symmetric
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            assert torch.equal(cache.state_dict()[key], handle.get_tensor(key))
