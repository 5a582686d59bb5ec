"""QuantizedCalibratingCache works everywhere a ``DynamicCache`` works.

Every Transformers entry point that takes a cache is driven with tiny, seeded, randomly
initialised models (Llama, Qwen2, Qwen3 and Gemma3 with mixed sliding/full attention):

* **calibrate** mode must be bit-identical to a plain ``DynamicCache(config=...)`` run
  (same logits, same tokens, same stored keys/values) while it collects statistics;
* **frozen** mode must run, give finite results close to the unquantized ones, and be
  deterministic across two runs with ``empty_copy()``.

The models here are built by this module's own helpers so that it does not depend on
the shared fixtures.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import count_calls
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from quantcache import CacheMode, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD

_VOCAB = 128
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = 16
_WINDOW = 6
_PAD = 0
_GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_NEW_TOKENS = 6
# Frozen INT8 logits may move by this fraction of the largest unquantized logit (measured: 1-3 %).
_FROZEN_REL_TOL = 0.1

_COMMON: dict[str, Any] = {
    "vocab_size": _VOCAB,
    "hidden_size": _HIDDEN,
    "intermediate_size": 2 * _HIDDEN,
    "num_attention_heads": _HEADS,
    "num_key_value_heads": _KV_HEADS,
    "head_dim": _HEAD_DIM,
    "max_position_embeddings": 256,
    "pad_token_id": _PAD,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_BUILDERS: dict[str, tuple[type[Any], type[PreTrainedModel], dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_hidden_layers": 2}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_hidden_layers": 3, "use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"num_hidden_layers": 2}),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "num_hidden_layers": len(_GEMMA3_LAYER_TYPES),
            "sliding_window": _WINDOW,
            "layer_types": list(_GEMMA3_LAYER_TYPES),
        },
    ),
}

# The transformers 5 spelling is ``cache=``; ``past_key_values=`` still works with a FutureWarning,
# which is expected (and silenced) exactly where that spelling is used on purpose.
_IGNORE_PKV_WARNING = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
_NEEDS_CACHE_KEYWORD = pytest.mark.skipif(CACHE_KEYWORD != "cache", reason="cache= is a transformers 5 keyword")
_CACHE_KWARGS = [
    pytest.param("cache", id="cache", marks=_NEEDS_CACHE_KEYWORD),
    pytest.param("past_key_values", id="past_key_values", marks=_IGNORE_PKV_WARNING),
]

_GENERATION_MODES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True},
    "beams": {"do_sample": False, "num_beams": 3},
    "sample_x2": {"do_sample": True, "num_return_sequences": 2},
    "beams_x2": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models are so small that thread start-up dominates: one thread is many times faster
    (and immune to a busy machine's cores spinning against each other). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- builders
def _build(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    config_class, model_class, defaults = _BUILDERS[arch]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**_COMMON, **defaults, **overrides})).eval()
    # Random weights emit the EOS id at random; generation must run for as many steps as asked.
    model.generation_config.eos_token_id = None
    return model.to(torch.float32)


@functools.cache
def _model(arch: str) -> PreTrainedModel:
    """The shared float32 model of ``arch``; tests only run it, never modify it."""
    return _build(arch)


@functools.cache
def _draft() -> PreTrainedModel:
    """A one-layer Llama with the same vocabulary, used as the assistant in assisted decoding."""
    return _build("llama", seed=1, num_hidden_layers=1)


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, _VOCAB, (batch, length), generator=generator)


def _calibrate(model: PreTrainedModel, seeds: tuple[int, ...] = (11, 12, 13, 14)) -> QuantizedCalibratingCache:
    """Calibrate a fresh cache on a few random batches (a fresh empty cache per batch) and freeze it.

    384 tokens cover nearly the whole vocabulary at every position the tests use, so frozen
    ranges rarely clip (random models give every token id its own, unrelated key/value).
    """
    cache = QuantizedCalibratingCache(model, KVQuantConfig())
    with torch.no_grad():
        for seed in seeds:
            model(_tokens(4, 24, seed), **{CACHE_KEYWORD: cache})
            cache = cache.empty_copy()
    return cache.freeze()


@functools.cache
def _frozen(arch: str) -> QuantizedCalibratingCache:
    """A frozen cache for ``_model(arch)``; tests use ``.empty_copy()`` of it, never the object itself."""
    return _calibrate(_model(arch))


def _fresh(model: PreTrainedModel, kind: str, arch: str | None = None) -> DynamicCache:
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "calibrate":
        return QuantizedCalibratingCache(model)
    assert kind == "frozen" and arch is not None
    cache = _frozen(arch).empty_copy()
    assert cache.is_frozen
    return cache


# ---------------------------------------------------------------------------- checks
def _storage(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _assert_same_storage(ours: DynamicCache, reference: DynamicCache) -> None:
    assert len(ours.layers) == len(reference.layers)
    for index, ((keys, values), (ref_keys, ref_values)) in enumerate(
        zip(_storage(ours), _storage(reference), strict=True)
    ):
        assert torch.equal(keys, ref_keys), f"layer {index} keys differ"
        assert torch.equal(values, ref_values), f"layer {index} values differ"
    assert ours.get_seq_length() == reference.get_seq_length()


def _stats(cache: QuantizedCalibratingCache) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in cache.state_dict().items() if name.endswith((".min", ".max"))}


def _assert_all_layers_observed(cache: QuantizedCalibratingCache) -> None:
    assert not cache.is_frozen
    for quantizer in cache.quantizers:
        assert quantizer.observed, quantizer.name
        for _, stream in quantizer.streams:
            assert stream.min is not None and stream.max is not None
            assert stream.min.dtype == torch.float32 and stream.max.dtype == torch.float32
            assert stream.min.shape == (_KV_HEADS, _HEAD_DIM)
            assert torch.isfinite(stream.min).all() and torch.isfinite(stream.max).all()
            assert (stream.min <= stream.max).all()


def _assert_monotone(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        if name.endswith(".min"):
            assert (new <= old).all(), f"{name} went up"
        else:
            assert (new >= old).all(), f"{name} went down"


def _assert_close_to_unquantized(quantized: torch.Tensor, reference: torch.Tensor) -> None:
    """Finite, not identical (quantization acted), and within a small fraction of the logit scale."""
    assert quantized.shape == reference.shape
    assert torch.isfinite(quantized).all()
    difference = (quantized.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    assert 0.0 < difference <= _FROZEN_REL_TOL * scale, f"max abs diff {difference:.4g} vs logit scale {scale:.4g}"


# ---------------------------------------------------------------------------- forward
def _two_forwards(model: PreTrainedModel, cache: DynamicCache, cache_kwarg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill 10 tokens, then one decode step continuing the same cache, with explicit positions."""
    prompt = _tokens(2, 10, seed=3)
    step = _tokens(2, 1, seed=4)
    with torch.no_grad():
        first = model(prompt, position_ids=torch.arange(10).expand(2, -1), use_cache=True, **{cache_kwarg: cache})
        assert getattr(first, CACHE_KEYWORD) is cache
        second = model(step, position_ids=torch.full((2, 1), 10), use_cache=True, **{cache_kwarg: cache})
        assert getattr(second, CACHE_KEYWORD) is cache
    assert cache.get_seq_length() == 11
    return first.logits, second.logits


@pytest.mark.parametrize("cache_kwarg", _CACHE_KWARGS)
@pytest.mark.parametrize("arch", _ARCHS)
def test_forward_calibrate_is_bit_identical(arch: str, cache_kwarg: str) -> None:
    model = _model(arch)
    reference = _fresh(model, "dynamic")
    ours = _fresh(model, "calibrate")
    ref_prefill, ref_step = _two_forwards(model, reference, cache_kwarg)
    prefill, step = _two_forwards(model, ours, cache_kwarg)
    assert torch.equal(prefill, ref_prefill)
    assert torch.equal(step, ref_step)
    _assert_same_storage(ours, reference)
    _assert_all_layers_observed(ours)
    # Full-attention layers keep every token, so their statistics are exactly the stored states' extremes.
    stats = _stats(ours)
    for index, layer in enumerate(reference.layers):
        if getattr(layer, "is_sliding", False):
            continue
        for stream, stored in (("key", layer.keys), ("value", layer.values)):
            assert torch.equal(stats[f"layers.{index}.{stream}.min"], stored.amin(dim=(0, 2)).float())
            assert torch.equal(stats[f"layers.{index}.{stream}.max"], stored.amax(dim=(0, 2)).float())


@pytest.mark.parametrize("cache_kwarg", _CACHE_KWARGS)
@pytest.mark.parametrize("arch", _ARCHS)
def test_forward_frozen_is_close_and_deterministic(arch: str, cache_kwarg: str) -> None:
    model = _model(arch)
    ref_prefill, ref_step = _two_forwards(model, _fresh(model, "dynamic"), cache_kwarg)
    first = _fresh(model, "frozen", arch)
    second = _fresh(model, "frozen", arch)
    prefill, step = _two_forwards(model, first, cache_kwarg)
    _assert_close_to_unquantized(prefill, ref_prefill)
    _assert_close_to_unquantized(step, ref_step)
    again_prefill, again_step = _two_forwards(model, second, cache_kwarg)
    assert torch.equal(prefill, again_prefill) and torch.equal(step, again_step)
    _assert_same_storage(first, second)
    # Frozen mode only quantizes: the statistics stay those of the calibration.
    calibrated = _stats(_frozen(arch))
    assert _stats(first).keys() == calibrated.keys()
    assert all(torch.equal(tensor, calibrated[name]) for name, tensor in _stats(first).items())
    # The stored states of the first layer (whose input does not depend on the cache) are the
    # unquantized ones, fake-quantized with the frozen parameters.
    reference = _fresh(model, "dynamic")
    _two_forwards(model, reference, cache_kwarg)
    quantizer = first.quantizers[0]
    assert torch.equal(first.layers[0].keys, quantizer.key.fake_quantize(reference.layers[0].keys))
    assert torch.equal(first.layers[0].values, quantizer.value.fake_quantize(reference.layers[0].values))


# ---------------------------------------------------------------------------- generate
def _generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    cache_kwarg: str = CACHE_KEYWORD,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", _NEW_TOKENS)
    return model.generate(
        input_ids,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=_PAD,
        **{cache_kwarg: cache},
        **kwargs,
    )


def _expected_rows(input_ids: torch.Tensor, mode: dict[str, Any]) -> int:
    return int(input_ids.shape[0]) * int(mode.get("num_return_sequences", 1))


@pytest.mark.parametrize("mode", sorted(_GENERATION_MODES))
@pytest.mark.parametrize("cache_kwarg", _CACHE_KWARGS)
@pytest.mark.parametrize("arch", _ARCHS)
def test_generate_calibrate_is_bit_identical(arch: str, cache_kwarg: str, mode: str) -> None:
    model = _model(arch)
    prompt = _tokens(1, 8, seed=5)
    settings = _GENERATION_MODES[mode]
    reference = _fresh(model, "dynamic")
    ours = _fresh(model, "calibrate")
    expected = _generate(model, prompt, reference, cache_kwarg, **settings)
    reorders = count_calls(ours, "reorder_cache")
    got = _generate(model, prompt, ours, cache_kwarg, **settings)
    assert got.sequences.shape == (_expected_rows(prompt, settings), 8 + _NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))
    _assert_same_storage(ours, reference)
    _assert_all_layers_observed(ours)
    if "num_beams" in settings:
        assert reorders, "beam search never reordered the cache"


@pytest.mark.parametrize("mode", sorted(_GENERATION_MODES))
@pytest.mark.parametrize("cache_kwarg", _CACHE_KWARGS)
@pytest.mark.parametrize("arch", _ARCHS)
def test_generate_frozen_is_close_and_deterministic(arch: str, cache_kwarg: str, mode: str) -> None:
    model = _model(arch)
    prompt = _tokens(1, 8, seed=5)
    settings = _GENERATION_MODES[mode]
    expected = _generate(model, prompt, _fresh(model, "dynamic"), cache_kwarg, **settings)
    first_cache = _fresh(model, "frozen", arch)
    first = _generate(model, prompt, first_cache, cache_kwarg, **settings)
    second_cache = _fresh(model, "frozen", arch)
    second = _generate(model, prompt, second_cache, cache_kwarg, **settings)
    assert first.sequences.shape == (_expected_rows(prompt, settings), 8 + _NEW_TOKENS)
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(first.sequences[:, :8], expected.sequences[:, :8])
    assert all(torch.equal(a, b) for a, b in zip(first.logits, second.logits, strict=True))
    assert all(torch.isfinite(step).all() for step in first.logits)
    # The first step sees the same prompt in both runs: only the quantization of the cache differs.
    _assert_close_to_unquantized(first.logits[0], expected.logits[0])
    _assert_same_storage(first_cache, second_cache)


_TRANSFORMERS_5_GENERATE = pytest.mark.skipif(
    CACHE_KEYWORD != "cache",
    reason="transformers 4.x generate neither crops sliding-window layers nor continues from a used cache the same way",
)


@_TRANSFORMERS_5_GENERATE
@pytest.mark.parametrize("arch", _ARCHS)
def test_assisted_decoding(arch: str) -> None:
    """A draft model proposes tokens; rejected ones are cropped from the target's cache."""
    model = _model(arch)
    draft = _draft()
    prompt = _tokens(1, 8, seed=6)
    settings = {"assistant_model": draft, "do_sample": False, "max_new_tokens": 10}
    reference = _fresh(model, "dynamic")
    expected = _generate(model, prompt, reference, **settings)
    plain = _generate(model, prompt, _fresh(model, "dynamic"), max_new_tokens=10)
    # Greedy assisted decoding gives the target's greedy tokens.
    assert torch.equal(expected.sequences, plain.sequences)

    ours = _fresh(model, "calibrate")
    crops = count_calls(ours, "crop")
    got = _generate(model, prompt, ours, **settings)
    assert any(args[0] < 0 for args in crops), "assisted decoding never cropped rejected draft tokens"
    assert torch.equal(got.sequences, expected.sequences)
    _assert_same_storage(ours, reference)
    _assert_all_layers_observed(ours)

    frozen_runs = []
    for _ in range(2):
        cache = _fresh(model, "frozen", arch)
        frozen_crops = count_calls(cache, "crop")
        frozen_runs.append(_generate(model, prompt, cache, **settings))
        assert frozen_crops
        assert [layer.keys.shape[-2] for layer in cache.layers] == [layer.keys.shape[-2] for layer in reference.layers]
    first, second = frozen_runs
    assert first.sequences.shape == expected.sequences.shape
    assert torch.equal(first.sequences, second.sequences)
    assert all(torch.isfinite(step).all() for step in first.logits)


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = _tokens(2, 9, seed=8)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3] = _PAD
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("mode", ["greedy", "sample", "beams"])
@pytest.mark.parametrize("arch", _ARCHS)
def test_left_padded_batch(arch: str, mode: str) -> None:
    model = _model(arch)
    input_ids, attention_mask = _left_padded_batch()
    settings = {**_GENERATION_MODES[mode], "attention_mask": attention_mask}
    reference = _fresh(model, "dynamic")
    expected = _generate(model, input_ids, reference, **settings)
    ours = _fresh(model, "calibrate")
    got = _generate(model, input_ids, ours, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))
    _assert_same_storage(ours, reference)

    first = _generate(model, input_ids, _fresh(model, "frozen", arch), **settings)
    second = _generate(model, input_ids, _fresh(model, "frozen", arch), **settings)
    assert first.sequences.shape == expected.sequences.shape
    assert torch.equal(first.sequences, second.sequences)
    _assert_close_to_unquantized(first.logits[0], expected.logits[0])


def _conversation(model: PreTrainedModel, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Generate, then generate again from the previous output plus a new user turn, reusing the cache."""
    first = _generate(model, _tokens(1, 7, seed=9), cache, max_new_tokens=4).sequences
    follow_up = torch.cat([first, _tokens(1, 3, seed=10)], dim=-1)
    length_before = cache.get_seq_length()
    assert 0 < length_before < follow_up.shape[1]
    second = _generate(model, follow_up, cache, max_new_tokens=4).sequences
    assert torch.equal(second[:, : follow_up.shape[1]], follow_up)
    return first, second, length_before


@pytest.mark.parametrize("arch", _ARCHS)
def test_continue_conversation_with_the_same_cache(arch: str) -> None:
    model = _model(arch)
    reference = _fresh(model, "dynamic")
    expected = _conversation(model, reference)
    ours = _fresh(model, "calibrate")
    got = _conversation(model, ours)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2] == expected[2]
    _assert_same_storage(ours, reference)

    frozen_first, frozen_second = _fresh(model, "frozen", arch), _fresh(model, "frozen", arch)
    once, twice = _conversation(model, frozen_first), _conversation(model, frozen_second)
    assert torch.equal(once[0], twice[0]) and torch.equal(once[1], twice[1])
    _assert_same_storage(frozen_first, frozen_second)
    assert frozen_first.get_seq_length() == reference.get_seq_length()


@_TRANSFORMERS_5_GENERATE
@pytest.mark.parametrize("kind", ["calibrate", "frozen"])
@pytest.mark.parametrize("arch", _ARCHS)
def test_deepcopy_of_a_used_cache(arch: str, kind: str) -> None:
    model = _model(arch)
    prompt = _tokens(1, 9, seed=14)
    cache = _fresh(model, kind, arch)
    with torch.no_grad():
        model(prompt, **{CACHE_KEYWORD: cache})
    twin = copy.deepcopy(cache)
    assert type(twin) is QuantizedCalibratingCache and twin.mode is cache.mode
    assert twin.quantizers[0] is not cache.quantizers[0]
    _assert_same_storage(twin, cache)

    step = _tokens(1, 1, seed=15)
    with torch.no_grad():
        original = model(step, **{CACHE_KEYWORD: cache}, position_ids=torch.tensor([[9]])).logits
        copied = model(step, **{CACHE_KEYWORD: twin}, position_ids=torch.tensor([[9]])).logits
    assert torch.equal(original, copied)
    _assert_same_storage(twin, cache)
    assert all(torch.equal(a, b) for a, b in zip(_stats(twin).values(), _stats(cache).values(), strict=True))

    # Continuing both with generate gives the same tokens; the two caches no longer share anything.
    history = torch.cat([prompt, step], dim=-1)
    twin_stats = {name: tensor.clone() for name, tensor in _stats(twin).items()}
    twin_keys = [keys.clone() for keys, _ in _storage(twin)]
    original_out = _generate(model, history, cache, max_new_tokens=4).sequences
    assert twin.get_seq_length() == 10 < cache.get_seq_length()
    assert all(torch.equal(keys, before) for (keys, _), before in zip(_storage(twin), twin_keys, strict=True))
    assert all(torch.equal(twin_stats[name], tensor) for name, tensor in _stats(twin).items())
    copied_out = _generate(model, history, twin, max_new_tokens=4).sequences
    assert torch.equal(original_out, copied_out)
    _assert_same_storage(twin, cache)


@pytest.mark.parametrize("kind", ["calibrate", "frozen"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batch_repeat_interleave_and_select(arch: str, kind: str) -> None:
    """``generate`` in this transformers version expands inputs before the cache fills, so call them directly."""
    model = _model(arch)
    prompt = _tokens(2, 9, seed=16)
    step = _tokens(6, 1, seed=17)
    outputs = []
    caches = []
    for cache in (_fresh(model, "dynamic"), _fresh(model, kind, arch)):
        with torch.no_grad():
            model(prompt, **{CACHE_KEYWORD: cache})
            cache.batch_repeat_interleave(3)
            logits = model(step, **{CACHE_KEYWORD: cache}, position_ids=torch.full((6, 1), 9)).logits
            cache.batch_select_indices(torch.tensor([0, 4]))
            more = model(step[[0, 4]], **{CACHE_KEYWORD: cache}, position_ids=torch.full((2, 1), 10)).logits
        outputs.append((logits, more))
        caches.append(cache)
    (ref_logits, ref_more), (logits, more) = outputs
    if kind == "calibrate":
        assert torch.equal(logits, ref_logits) and torch.equal(more, ref_more)
        _assert_same_storage(caches[1], caches[0])
    else:
        _assert_close_to_unquantized(logits, ref_logits)
        _assert_close_to_unquantized(more, ref_more)
    assert caches[1].layers[0].keys.shape[0] == 2


# ---------------------------------------------------------------------------- dtypes
@functools.cache
def _model_in(arch: str, dtype: torch.dtype) -> PreTrainedModel:
    return copy.deepcopy(_model(arch)).to(dtype)


def _skip_if_cpu_refuses(dtype: torch.dtype, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (RuntimeError, NotImplementedError) as error:
        if dtype is torch.float16 and ("Half" in str(error) or "float16" in str(error)):
            pytest.skip(f"this CPU build of torch cannot run the model in float16: {error}")
        raise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dtypes(arch: str, dtype: torch.dtype) -> None:
    model = _model_in(arch, dtype)
    prompt = _tokens(1, 8, seed=18)
    reference = _fresh(model, "dynamic")
    ours = _fresh(model, "calibrate")
    with torch.no_grad():
        expected = _skip_if_cpu_refuses(dtype, lambda: model(prompt, **{CACHE_KEYWORD: reference}).logits)
        got = model(prompt, **{CACHE_KEYWORD: ours}).logits
    assert torch.equal(got, expected)
    _assert_same_storage(ours, reference)
    _assert_all_layers_observed(ours)

    frozen = _skip_if_cpu_refuses(dtype, lambda: _calibrate(model))
    for name, tensor in frozen.state_dict().items():
        expected_dtype = torch.int32 if name.endswith(".zero_point") else torch.float32
        assert tensor.dtype == expected_dtype, name
    with torch.no_grad():
        logits = model(prompt, **{CACHE_KEYWORD: (cache := frozen.empty_copy())}).logits
    assert logits.dtype == expected.dtype
    for keys, values in _storage(cache):
        assert keys.dtype == dtype and values.dtype == dtype
    _assert_close_to_unquantized(logits, expected)
    out = _generate(model, prompt, frozen.empty_copy(), max_new_tokens=3)
    assert out.sequences.shape == (1, 11)
    assert all(torch.isfinite(step).all() for step in out.logits)

    if dtype is not torch.float32:
        # Statistics and parameters are float32 whatever the model dtype, and close to the fp32 model's.
        rtol = 0.01 if dtype is torch.float16 else 0.04
        full = _calibrate(_model(arch)).state_dict()
        half = frozen.state_dict()
        assert full.keys() == half.keys()
        for name, tensor in full.items():
            if name.endswith(".zero_point"):
                assert torch.equal(half[name], tensor), name
            else:
                bound = rtol * tensor.abs().max()
                assert (half[name] - tensor).abs().max() <= bound, name


# ---------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("mode", ["greedy", "beams"])
@pytest.mark.parametrize("kind", ["calibrate", "frozen"])
def test_gemma3_sliding_layers_keep_their_window(kind: str, mode: str) -> None:
    model = _model("gemma3")
    prompt = _tokens(1, 10, seed=19)
    settings = {**_GENERATION_MODES[mode], "max_new_tokens": 8}
    reference = _fresh(model, "dynamic")
    expected = _generate(model, prompt, reference, **settings)
    ours = _fresh(model, kind, "gemma3")
    got = _generate(model, prompt, ours, **settings)
    if kind == "calibrate":
        assert torch.equal(got.sequences, expected.sequences)
    assert ours.is_sliding == reference.is_sliding == [t == "sliding_attention" for t in _GEMMA3_LAYER_TYPES]
    lengths = [layer.keys.shape[-2] for layer in ours.layers]
    assert lengths == [layer.keys.shape[-2] for layer in reference.layers]
    for layer, sliding, length in zip(ours.layers, ours.is_sliding, lengths, strict=True):
        if sliding:
            assert layer.sliding_window == _WINDOW
            assert length <= _WINDOW
        else:
            assert length == 10 + 8 - 1
    assert ours.get_seq_length() == reference.get_seq_length()


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("arch", _ARCHS)
def test_statistics_accumulate_across_steps_batches_and_calls(arch: str) -> None:
    model = _model(arch)
    cache = QuantizedCalibratingCache(model)
    assert cache.mode is CacheMode.CALIBRATE and _stats(cache) == {}
    with torch.no_grad():
        model(_tokens(1, 8, seed=20), **{CACHE_KEYWORD: cache})
        after_prefill = _stats(cache)
        for position in range(8, 11):
            model(_tokens(1, 1, seed=position), **{CACHE_KEYWORD: cache}, position_ids=torch.tensor([[position]]))
        after_decode = _stats(cache)
        _assert_monotone(after_prefill, after_decode)
        cache = cache.empty_copy()
        assert cache.get_seq_length() == 0
        model(_tokens(3, 12, seed=21), **{CACHE_KEYWORD: cache})
    after_batch = _stats(cache)
    _assert_monotone(after_decode, after_batch)

    cache = cache.empty_copy()
    _generate(model, _tokens(1, 8, seed=22), cache, max_new_tokens=4)
    after_generate = _stats(cache)
    _assert_monotone(after_batch, after_generate)

    cache = cache.empty_copy()
    _generate(model, _tokens(2, 8, seed=24), cache, do_sample=True, max_new_tokens=4)
    after_second = _stats(cache)
    _assert_monotone(after_generate, after_second)
    changed = [name for name in after_second if not torch.equal(after_second[name], after_generate[name])]
    assert changed, "a second generate on different text left every statistic unchanged"
    _assert_all_layers_observed(cache)
