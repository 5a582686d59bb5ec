"""Residual window: the newest ``residual_window`` tokens are read back in full precision.

A layer returns its newest tokens' full-precision states until that many newer tokens
have followed (KIVI's residual), and quantizes a token when it leaves the window,
``residual_block`` at a time. Fake and packed storage agree, in full-attention and
sliding-window layers, through every batch operation generation uses, and the copy is
counted in effective bits and in ``memory_report``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GENERATION_MODES, SLIDING_WINDOW, assert_packed_generates_like_fake
from conftest import random_tokens as _tokens
from transformers import DynamicCache, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis.state_report import config_text
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.errors import QuantStateError
from quantcache.export import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INT4 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "symmetric": False}


def _run(model: PreTrainedModel, cache: Any, tokens: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(tokens, use_cache=True, **{CACHE_KEYWORD: cache})


def _returns(cache: Any, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record what layer ``index`` of ``cache`` returns from each update (copies)."""
    layer = cache.layers[index]
    returned: list[tuple[torch.Tensor, torch.Tensor]] = []
    update = layer.update

    def recording(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = update(*args, **kwargs)
        returned.append((keys.clone(), values.clone()))
        return keys, values

    layer.update = recording
    return returned


@pytest.mark.parametrize("bad", [-1, True, 2.5, "8", 65537])
def test_the_window_must_be_a_whole_number_of_tokens(bad: Any) -> None:
    with pytest.raises(ConfigError, match="residual_window: expected a whole number of tokens from 0 to 65536"):
        KVQuantConfig(residual_window=bad)


def test_the_window_survives_the_yaml_round_trip_and_is_named() -> None:
    config = KVQuantConfig(**INT4, residual_window=16)
    assert config.to_dict()["residual_window"] == 16 and "residual_window" not in KVQuantConfig().to_dict()
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert "residual_window 16" in config_text(config) and "residual_window" not in config_text(KVQuantConfig())


# (chunks the tokens arrive in, window): one at a time, a chunk longer than the window, a window longer than
# what is held, and a window of one.
_ARRIVALS = [((5, 1, 1, 1), 3), ((9,), 4), ((2, 1), 6), ((4, 2, 1), 1)]


@pytest.mark.parametrize("pre_rope_keys", [False, True])
@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize(("chunks", "window"), _ARRIVALS)
def test_the_newest_tokens_are_exact_and_older_ones_read_back_from_their_codes(
    llama: PreTrainedModel, storage: str, pre_rope_keys: bool, chunks: tuple[int, ...], window: int
) -> None:
    """After each update, the last ``window`` positions equal the unquantized cache's; every other position
    equals what the same frozen scheme without a window returns (the token's codes)."""
    config = KVQuantConfig(**INT4, pre_rope_keys=pre_rope_keys)
    tokens = _tokens(2, sum(chunks), seed=1)
    reference = DynamicCache(config=llama.config)
    plain = QuantizedCalibratingCache(llama, config, storage=storage).freeze()
    windowed = QuantizedCalibratingCache(llama, replace(config, residual_window=window), storage=storage).freeze()
    # Layer 0: its new states depend on the tokens alone, whatever the caches did before.
    exact, quantized, got = _returns(reference, 0), _returns(plain, 0), _returns(windowed, 0)
    start = 0
    for size in chunks:
        for cache in (reference, plain, windowed):
            _run(llama, cache, tokens[:, start : start + size])
        start += size
        for stream in (0, 1):
            held = min(window, start)
            assert torch.equal(got[-1][stream][:, :, start - held :], exact[-1][stream][:, :, start - held :])
            assert torch.equal(got[-1][stream][:, :, : start - held], quantized[-1][stream][:, :, : start - held])
            assert not torch.equal(quantized[-1][stream], exact[-1][stream])  # the scheme does change states


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_sliding_window_layers_keep_the_window_past_their_own(gemma3: PreTrainedModel, storage: str) -> None:
    config = KVQuantConfig(**INT4, residual_window=3, sink_tokens=1)
    plain = QuantizedCalibratingCache(gemma3, replace(config, residual_window=0), storage=storage).freeze()
    windowed = QuantizedCalibratingCache(gemma3, config, storage=storage).freeze()
    sliding = 0  # the first layer slides; its new states depend on the tokens alone
    assert not windowed.layers[sliding].keeps_sinks
    reference = DynamicCache(config=gemma3.config)
    exact, quantized, got = _returns(reference, sliding), _returns(plain, sliding), _returns(windowed, sliding)
    tokens = _tokens(1, SLIDING_WINDOW + 6, seed=2)
    for step in range(tokens.shape[1]):
        for cache in (reference, plain, windowed):
            _run(gemma3, cache, tokens[:, step : step + 1])
        keys, expected, coded = got[-1][0], exact[-1][0], quantized[-1][0]
        held = min(3, keys.shape[2])
        assert keys.shape == expected.shape
        assert torch.equal(keys[:, :, -held:], expected[:, :, -held:])
        assert torch.equal(keys[:, :, :-held], coded[:, :, :-held])


def test_calibration_ignores_the_window(llama: PreTrainedModel) -> None:
    """Every token is quantized in the end, so every token is observed, window or not."""
    tokens = _tokens(2, 12, seed=3)
    config = KVQuantConfig(**INT4, center=True)
    plain = calibrate(llama, tokens, quant_config=config, progress=False).new_cache()
    windowed = calibrate(llama, tokens, quant_config=replace(config, residual_window=4), progress=False).new_cache()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(windowed.state_dict()[name], tensor), name


@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_storage_generates_what_fake_storage_generates(
    request: pytest.FixtureRequest, arch: str, mode: dict[str, Any]
) -> None:
    config = KVQuantConfig(
        **INT4, center=True, method="mse", rotation="hadamard", sink_tokens=1, pre_rope_keys=True, residual_window=3
    )
    model = request.getfixturevalue(arch)
    assert_packed_generates_like_fake(model, config, _tokens(2, 16, seed=1), _tokens(1, 6, seed=4), mode)


def test_generation_with_a_window_differs_from_generation_without(llama: PreTrainedModel) -> None:
    """The window is read: a wide window over a short generation reproduces the unquantized logits."""
    prompt = _tokens(1, 6, seed=5)
    settings = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    config = KVQuantConfig(dtype="int2", scope="per_token", dynamic=True, symmetric=False, residual_window=64)
    exact = llama.generate(prompt, **settings, pad_token_id=0)
    windowed = llama.generate(
        prompt, **settings, pad_token_id=0, **{CACHE_KEYWORD: QuantizedCalibratingCache(llama, config).freeze()}
    )
    quantized = llama.generate(
        prompt,
        **settings,
        pad_token_id=0,
        **{CACHE_KEYWORD: QuantizedCalibratingCache(llama, replace(config, residual_window=0)).freeze()},
    )
    assert all(torch.equal(a, b) for a, b in zip(windowed.logits, exact.logits, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(quantized.logits, exact.logits, strict=True))


def test_batch_operations_carry_the_window_along(llama: PreTrainedModel) -> None:
    """Packed storage keeps the pending tokens' states apart (fake storage holds them in place of their states)."""
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(**INT4, residual_window=3), storage="packed").freeze()
    _run(llama, cache, _tokens(2, 6, seed=6))
    layer = cache.layers[0]
    first = layer._recent[0].clone()
    assert first.shape[2] == 3
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer._recent[0], first.flip(0))
    layer.batch_repeat_interleave(2)
    assert layer._recent[0].shape[0] == 4 and torch.equal(layer._recent[1][0], layer._recent[1][1])
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer._recent[0], first.flip(0)[[0, 1]])
    layer.crop(-2)
    assert layer._recent[0].shape[2] == 1 and layer.get_seq_length() == 4
    assert torch.equal(layer._recent[0], first.flip(0)[[0, 1]][:, :, :1])
    assert layer.recent_bytes() == 2 * layer._recent[0].numel() * 4
    layer.reset()
    assert layer._recent is None and layer.recent_bytes() == 0 and layer._pending == 0


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_after_a_crop_the_window_refills_with_new_tokens_only(llama: PreTrainedModel, storage: str) -> None:
    """Tokens before a shortened window were stored quantized and stay so; the window grows back from new ones."""
    config = KVQuantConfig(**INT4)
    tokens = _tokens(1, 8, seed=7)
    plain = QuantizedCalibratingCache(llama, config, storage=storage).freeze()
    windowed = QuantizedCalibratingCache(llama, replace(config, residual_window=3), storage=storage).freeze()
    reference = DynamicCache(config=llama.config)
    exact, quantized, got = _returns(reference, 0), _returns(plain, 0), _returns(windowed, 0)
    for cache in (reference, plain, windowed):
        _run(llama, cache, tokens[:, :6])
        cache.crop(-2)  # drops positions 4 and 5: position 3 alone stays in the window
        _run(llama, cache, tokens[:, 6:7])
    keys = got[-1][0]
    assert torch.equal(keys[:, :, 3:], exact[-1][0][:, :, 3:])
    assert torch.equal(keys[:, :, :3], quantized[-1][0][:, :, :3])


# (model, window): a window shorter than every layer's history, and one as long as Gemma 3's sliding window,
# which its sliding layers hold only in part (they keep sliding_window - 1 tokens).
@pytest.mark.parametrize(("arch", "window"), [("llama", 5), ("gemma3", 5), ("gemma3", SLIDING_WINDOW)])
def test_effective_bits_count_the_window_a_packed_cache_holds(
    request: pytest.FixtureRequest, arch: str, window: int
) -> None:
    """The honest count: the window's copies are full_precision bytes in memory_report, and effective bits agree."""
    model = request.getfixturevalue(arch)
    config = KVQuantConfig(**INT4, sink_tokens=1, residual_window=window)
    without = QuantizedCalibratingCache(model, replace(config, residual_window=0), storage="packed")
    cache = QuantizedCalibratingCache(model, config, storage="packed").freeze()
    held = cache.held_tokens(40)
    copies = [min(window, tokens) for tokens in held]
    assert cache.full_precision_held(40) == [s + c for s, c in zip(cache.sinks_held(40), copies, strict=True)]
    assert cache.full_precision_held(3) == [3] * len(held)  # the sink is still in the window: one copy
    added = cache.effective_bits(40, unquantized_bits=32) - without.effective_bits(40, unquantized_bits=32)
    assert added == pytest.approx(2 * 32 * sum(copies) / (2 * sum(held)))
    _run(model, cache, _tokens(1, 40, seed=8))
    report = cache.memory_report()
    assert all(entry["full_precision"] > 0 for entry in report)
    elements = sum(entry["dynamic_cache"] for entry in report) // 4
    counted = sum(entry["total"] - entry["reserved"] - entry["encoder"] for entry in report) * 8 / elements
    assert counted == pytest.approx(cache.effective_bits(40, unquantized_bits=32), rel=1e-12)


# ---------------------------------------------------------------------------- tokens leaving the window in blocks
@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8", 4097])
def test_the_block_must_be_a_whole_number_of_tokens_from_one(bad: Any) -> None:
    with pytest.raises(ConfigError, match="residual_block: "):
        KVQuantConfig(residual_block=bad)


def test_the_block_survives_the_yaml_round_trip_is_named_and_is_not_exported() -> None:
    config = KVQuantConfig(**INT4, residual_window=4, residual_block=8)
    assert config.to_dict()["residual_block"] == 8 and "residual_block" not in KVQuantConfig().to_dict()
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert "residual_block 8" in config_text(config) and "residual_block" not in config_text(KVQuantConfig())
    assert any("residual_block" in problem for problem in KVQuantConfig(residual_block=2).export_problems())


def _pending_after(chunks: tuple[int, ...], window: int, block: int) -> list[int]:
    """The tokens read in full precision after each chunk: pending ones leave, all but ``window``, at ``window +
    block``."""
    pending, counts = 0, []
    for size in chunks:
        pending += size
        pending = window if pending >= window + block else pending
        counts.append(pending)
    return counts


# (chunks, window, block): one at a time over two blocks, no window (a block alone), a prefill longer than a block
_BLOCKS = [((5, 1, 1, 1, 1, 1, 1, 1), 2, 3), ((9, 1, 1, 1, 1), 0, 4), ((2, 1, 1, 12, 1), 3, 2)]


@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize(("chunks", "window", "block"), _BLOCKS)
def test_tokens_leave_the_window_a_block_at_a_time(
    llama: PreTrainedModel, storage: str, chunks: tuple[int, ...], window: int, block: int
) -> None:
    """The newest ``window`` to ``window + block - 1`` positions are exact, every older one its codes."""
    config = KVQuantConfig(**INT4, sink_tokens=1)
    tokens = _tokens(2, sum(chunks), seed=1)
    reference = DynamicCache(config=llama.config)
    plain = QuantizedCalibratingCache(llama, config, storage=storage).freeze()
    blocked = replace(config, residual_window=window, residual_block=block)
    windowed = QuantizedCalibratingCache(llama, blocked, storage=storage).freeze()
    exact, quantized, got = _returns(reference, 0), _returns(plain, 0), _returns(windowed, 0)
    start = 0
    for size, held in zip(chunks, _pending_after(chunks, window, block), strict=True):
        for cache in (reference, plain, windowed):
            _run(llama, cache, tokens[:, start : start + size])
        start += size
        assert windowed.layers[0]._pending == held
        for stream in (0, 1):
            assert torch.equal(got[-1][stream][:, :, start - held :], exact[-1][stream][:, :, start - held :])
            assert torch.equal(got[-1][stream][:, :, : start - held], quantized[-1][stream][:, :, : start - held])
            left = slice(1, start - held)  # past the sink, what left the window changed
            if start - held > 1:
                assert not torch.equal(got[-1][stream][:, :, left], exact[-1][stream][:, :, left])


@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_storage_generates_what_fake_storage_generates_with_blocks(
    request: pytest.FixtureRequest, arch: str, mode: dict[str, Any]
) -> None:
    """The int4 preset with tokens leaving its window four at a time: rotated, rounded, centred around RoPE."""
    config = KVQuantConfig.preset("int4", residual_window=2, residual_block=4)
    model = request.getfixturevalue(arch)
    assert_packed_generates_like_fake(model, config, _tokens(2, 16, seed=1), _tokens(1, 6, seed=4), mode)


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_a_crop_takes_pending_tokens_first(llama: PreTrainedModel, storage: str) -> None:
    """Cropped pending tokens are gone; the block refills from new ones, and what was quantized stays so."""
    config = KVQuantConfig(**INT4, residual_window=1, residual_block=3)
    cache = QuantizedCalibratingCache(llama, config, storage=storage).freeze()
    _run(llama, cache, _tokens(1, 6, seed=7))  # 6 >= 4: five leave, one pending
    layer = cache.layers[0]
    assert layer._pending == 1
    _run(llama, cache, _tokens(1, 2, seed=8))
    assert layer._pending == 3
    cache.crop(-2)
    assert layer._pending == 1 and layer.get_seq_length() == 6
    _run(llama, cache, _tokens(1, 3, seed=9))  # 1 + 3 = 4 pending: three leave
    assert layer._pending == 1 and layer.get_seq_length() == 9
    if storage == "packed":
        assert layer._recent is not None and layer._recent[0].shape[2] == 1


def test_effective_bits_count_the_window_at_its_largest(llama: PreTrainedModel) -> None:
    """A packed cache brought to ``window + block - 1`` pending tokens holds the bits effective_bits counts."""
    config = KVQuantConfig(**INT4, sink_tokens=1, residual_window=3, residual_block=4)
    cache = QuantizedCalibratingCache(llama, config, storage="packed").freeze()
    assert cache.full_precision_held(40) == [1 + 6] * len(cache.layers)
    assert cache.full_precision_held(5) == [5] * len(cache.layers)  # none has left: the sink is pending too
    _run(llama, cache, _tokens(1, 37, seed=8))  # 34 leave, three pending
    for step in range(3):  # 4, 5, 6 pending
        _run(llama, cache, _tokens(1, 1, seed=20 + step))
    assert cache.layers[0]._pending == 6 and cache.get_seq_length() == 40
    report = cache.memory_report()
    elements = sum(entry["dynamic_cache"] for entry in report) // 4
    counted = sum(entry["total"] - entry["reserved"] - entry["encoder"] for entry in report) * 8 / elements
    assert counted == pytest.approx(cache.effective_bits(40, unquantized_bits=32), rel=1e-12)


def test_an_unquantized_layer_keeps_no_window(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(**INT4, residual_window=2, exclude=("model.layers.0.self_attn",))
    cache = QuantizedCalibratingCache(llama, config, storage="packed").freeze()
    _run(llama, cache, _tokens(1, 5, seed=9))
    assert cache.layers[0]._recent is None and cache.layers[1]._recent is not None


def test_a_state_with_a_window_is_not_exported(llama: PreTrainedModel, tmp_path: Path) -> None:
    """Engines read every old token from its codes at once: the window would be silently dropped."""
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(residual_window=8))
    _run(llama, cache, _tokens(1, 12, seed=10))
    cache.freeze()
    with pytest.raises(QuantStateError, match=r"newest 8 tokens back in full precision.*without residual_window"):
        export_checkpoint(cache, tmp_path / "out", format="vllm", scales_only=True)
    assert not (tmp_path / "out").exists()
