"""Padding-aware calibration and the averaged-range observers, through the cache.

Real calibration data comes from a tokenizer as padded batches. ``update()`` sees no attention mask, so
without help the pad positions' keys and values would enter the statistics and move the calibrated
ranges. The cache therefore takes the mask (``set_attention_mask``, which ``calibrate`` calls for
``{"input_ids", "attention_mask"}`` batches); padding a batch, on either side, must then give the
parameters of the unpadded rows, for every observer. The percentile and MSE observers are checked
through the same path: their ranges clip inside min/max, their options are honoured, and their state
(``low``/``high``/``weight``) reloads bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS
from conftest import random_tokens as _tokens
from transformers import PreTrainedModel

from quantcache import CalibrationError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate

ARCHS = ("llama", "gemma3")
PAD = 0  # the tiny models' pad_token_id
METHODS: dict[str, dict[str, Any]] = {
    "minmax": {"method": "minmax"},
    "percentile": {"method": "percentile", "observer_options": {"percentile": 99.0}},
    "mse": {"method": "mse"},
}
# Batched matmuls of a padded batch differ from the unpadded ones in the last bits.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")






def _padded(rows: list[torch.Tensor], width: int, side: str) -> dict[str, torch.Tensor]:
    """A tokenizer-style batch: ``rows`` (1-D) padded with ``PAD`` on ``side`` to ``width``, and its mask."""
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[index, span] = row
        attention_mask[index, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _calibrated(model: PreTrainedModel, data: Any, **config: Any) -> QuantizedCalibratingCache:
    return calibrate(model, data, quant_config=KVQuantConfig(**config), progress=False).new_cache()


def _ranges(cache: QuantizedCalibratingCache) -> dict[str, torch.Tensor]:
    """Every stream's observer range and frozen scale, by name."""
    out: dict[str, torch.Tensor] = {}
    for quantizer in cache.quantizers:
        for stream_name, stream in quantizer.streams:
            low, high = stream.observer.range()
            prefix = f"{quantizer.index}.{stream_name}"
            out[f"{prefix}.low"], out[f"{prefix}.high"] = low, high
            assert stream.params is not None
            out[f"{prefix}.scale"] = stream.params.scale
    return out


def _all_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.allclose(a[name], b[name], **TOLERANCE) for name in a)


# ================================================================================ padding
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_padded_batch_with_its_mask_calibrates_like_the_unpadded_rows(
    models: dict[str, PreTrainedModel], arch: str, side: str, method: str
) -> None:
    """Two 9-token rows padded by 3 on ``side``: with the mask, the ranges and scales are the unpadded batch's
    (and the averaged observers count 18 tokens, not 24); without it, the pad positions change them."""
    model = models[arch]
    rows = _tokens(2, 9, seed=1)
    batch = _padded(list(rows), 12, side)
    expected = _calibrated(model, [rows], **METHODS[method])
    got = _calibrated(model, [batch], **METHODS[method])
    assert _all_close(_ranges(got), _ranges(expected))
    assert got.state_dict().keys() == expected.state_dict().keys()
    if method != "minmax":
        weights = [tensor for name, tensor in got.state_dict().items() if name.endswith(".weight")]
        assert weights and all(bool((weight == 18).all()) for weight in weights)
    unmasked = _calibrated(model, [{"input_ids": batch["input_ids"]}], **METHODS[method])
    assert not _all_close(_ranges(unmasked), _ranges(expected))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_different_lengths_padded_together_give_the_rows_statistics(
    models: dict[str, PreTrainedModel], arch: str, side: str
) -> None:
    """A 9-token and a 4-token row in one padded batch give the min/max of the two rows calibrated apart, whether
    the tokenizer's output is passed in a list of batches or as the data itself."""
    model = models[arch]
    long_row, short_row = _tokens(1, 9, seed=2)[0], _tokens(1, 4, seed=3)[0]
    expected = _calibrated(model, [long_row[None], short_row[None]])
    batch = _padded([long_row, short_row], 9, side)
    assert _all_close(_ranges(_calibrated(model, [batch])), _ranges(expected))
    assert _all_close(_ranges(_calibrated(model, batch)), _ranges(expected))


def test_a_fully_padded_row_in_a_batch_adds_nothing(llama: PreTrainedModel) -> None:
    """A row that is all padding (its attention has nothing to attend to) contributes no statistics."""
    row = _tokens(1, 8, seed=4)[0]
    batch = _padded([row, torch.tensor([], dtype=torch.long)], 8, "left")
    for config in METHODS.values():
        expected = _ranges(_calibrated(llama, [row[None]], **config))
        assert _all_close(_ranges(_calibrated(llama, [batch], **config)), expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_fully_padded_update_adds_nothing(llama: PreTrainedModel, method: str) -> None:
    """An update whose every position is padding leaves the statistics as they were; as the first update it
    leaves the layer unobserved, so freezing refuses instead of inventing a range."""
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(**METHODS[method]))
    states = torch.randn(2, KV_HEADS, 5, HEAD_DIM, generator=torch.Generator().manual_seed(5))
    cache.set_attention_mask(torch.zeros(2, 5))
    cache.update(states, states, 0)
    assert not cache.quantizers[0].observed
    with pytest.raises(CalibrationError, match="before any calibration data"):
        cache.freeze()
    cache.set_attention_mask(torch.ones(2, 5))
    cache.update(states, states, 0)
    before = {name: tensor.clone() for name, tensor in cache.state_dict().items()}
    cache.set_attention_mask(torch.zeros(2, 7))  # covers the 5 cached tokens and 2 new ones, all padding
    cache.update(states[:, :, :2] * 100, states[:, :, :2] * 100, 0)
    after = cache.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    cache.set_attention_mask(torch.tensor([[0] * 6 + [1], [0] * 7]))  # one real token of 4 new: it counts
    cache.update(states[:, :, :1] * 100, states[:, :, :1] * 100, 0)
    assert any(not torch.equal(before[name], tensor) for name, tensor in cache.state_dict().items())


def test_set_attention_mask_refuses_a_mask_that_does_not_fit(llama: PreTrainedModel) -> None:
    """A mask that is not ``(batch, seq)`` is refused when set; one whose batch differs from the states', or
    that has fewer columns than the update has new tokens, is refused by the update, naming the layer and
    both shapes, and that update changes nothing."""
    cache = QuantizedCalibratingCache(llama)
    for bad in (torch.ones(5), torch.ones(1, 2, 5)):
        with pytest.raises(ValueError, match=r"\(batch, seq\)"):
            cache.set_attention_mask(bad)
    assert cache.set_attention_mask(torch.ones(2, 5)) is cache
    states = torch.randn(2, KV_HEADS, 5, HEAD_DIM, generator=torch.Generator().manual_seed(6))
    cache.update(states, states, 0)
    before = {name: tensor.clone() for name, tensor in cache.state_dict().items()}
    for mask, new in ((torch.ones(3, 6), 1), (torch.ones(2, 3), 4)):
        cache.set_attention_mask(mask)
        with pytest.raises(CalibrationError, match=r"layer 0 .*set_attention_mask.*" + str(tuple(mask.shape))):
            cache.update(states[:, :, :new], states[:, :, :new], 0)
    assert all(torch.equal(before[name], tensor) for name, tensor in cache.state_dict().items())
    cache.set_attention_mask(None)  # cleared: every token counts again, whatever the batch
    cache.update(torch.full((3, KV_HEADS, 1, HEAD_DIM), 50.0), torch.zeros(3, KV_HEADS, 1, HEAD_DIM), 1)
    assert bool((cache.quantizers[1].key.max == 50.0).all())


# ================================================================================ percentile and MSE observers
@pytest.fixture(scope="module")
def observed(llama: PreTrainedModel) -> dict[str, QuantizedCalibratingCache]:
    """The same three batches calibrated with min/max, percentile 99, percentile 100 and MSE, in INT4 (at INT8
    the MSE-optimal range of 32 tokens per batch is the full one: clipping never pays)."""
    data = [_tokens(2, 16, seed=seed) for seed in (7, 8, 9)]
    configs = {**METHODS, "percentile100": {"method": "percentile", "observer_options": {"percentile": 100.0}}}
    return {name: _calibrated(llama, data, dtype="int4", **config) for name, config in configs.items()}


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_averaged_ranges_lie_inside_min_max_and_clip_somewhere(
    observed: dict[str, QuantizedCalibratingCache], method: str
) -> None:
    """Both observers clip each batch's range to at most its extremes and average over batches with the same
    token weights as percentile 100 (the mean of the batches' extremes), so they lie inside that, which lies
    inside min/max over all batches. On this data they clip somewhere: a method that kept every batch's full
    range would equal percentile 100 everywhere."""
    ranges, extremes, minmax = (_ranges(observed[name]) for name in (method, "percentile100", "minmax"))
    clipped = 0
    for name, tensor in ranges.items():
        if name.endswith(".low"):
            assert bool((tensor >= extremes[name] - 1e-6).all()), name
            assert bool((extremes[name] >= minmax[name] - 1e-6).all()), name
            clipped += int((tensor > extremes[name] + 1e-6).sum())
        elif name.endswith(".high"):
            assert bool((tensor <= extremes[name] + 1e-6).all()), name
            assert bool((extremes[name] <= minmax[name] + 1e-6).all()), name
            clipped += int((tensor < extremes[name] - 1e-6).sum())
        else:
            assert bool((tensor <= minmax[name] * (1 + 1e-6)).all()), name
    assert clipped > 0


def test_percentile_option_is_honoured(observed: dict[str, QuantizedCalibratingCache]) -> None:
    """Percentile 100 is the mean of the batches' extremes: not min/max over all batches, but never outside it,
    and wider than percentile 99 everywhere it differs."""
    full, clipped, minmax = (_ranges(observed[name]) for name in ("percentile100", "percentile", "minmax"))
    assert not _all_close(full, clipped)
    for name, tensor in full.items():
        if name.endswith(".low"):
            assert bool((tensor <= clipped[name] + 1e-6).all()) and bool((tensor >= minmax[name] - 1e-6).all())
        elif name.endswith(".high"):
            assert bool((tensor >= clipped[name] - 1e-6).all()) and bool((tensor <= minmax[name] + 1e-6).all())


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_averaged_observer_state_is_low_high_weight_and_reloads_bit_for_bit(
    llama: PreTrainedModel, observed: dict[str, QuantizedCalibratingCache], method: str, tmp_path: Path
) -> None:
    """Each stream saves ``low``, ``high`` (token-weighted sums) and ``weight`` (tokens seen: 3 batches of
    32) beside its parameters; the file reloads exactly, frozen, and quantizes exactly as the original."""
    cache = observed[method]
    state = cache.state_dict()
    fields = {name.rsplit(".", 1)[1] for name in state}
    assert fields == {"low", "high", "weight", "scale", "zero_point"}
    for name, tensor in state.items():
        assert tensor.shape == (KV_HEADS, HEAD_DIM), name
        if name.endswith(".weight"):
            assert bool((tensor == 3 * 32).all()), name
    path = cache.save(tmp_path / f"{method}.safetensors")
    reloaded = QuantizedCalibratingCache.from_file(path, llama)
    assert reloaded.is_frozen and reloaded.quant_config == cache.quant_config
    again = reloaded.state_dict()
    assert again.keys() == state.keys()
    assert all(again[name].dtype == tensor.dtype and torch.equal(again[name], tensor) for name, tensor in state.items())
    prompt = _tokens(1, 10, seed=10)
    with torch.no_grad():
        expected = llama(prompt, **{CACHE_KEYWORD: cache.empty_copy()}).logits
        assert torch.equal(llama(prompt, **{CACHE_KEYWORD: reloaded}).logits, expected)
    # Unfrozen, the reloaded statistics keep accumulating where the original's left off.
    more = [_tokens(2, 16, seed=11)]
    continued = calibrate(llama, more, cache=reloaded.unfreeze(), progress=False).new_cache()
    assert bool((continued.state_dict()["layers.0.key.weight"] == 4 * 32).all())


# ================================================================================ positions of padded rows
@pytest.mark.parametrize("preset", ["int4", "int8"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_rows_calibrate_pre_rope_presets_at_the_positions_the_model_gave_them(
    models: dict[str, PreTrainedModel], arch: str, side: str, preset: str
) -> None:
    """Rows of 9, 6 and 4 tokens padded together calibrate a one-sink preset whose keys are centred before RoPE
    (``rope_center``, and ``pre_rope_keys`` alike) as the rows alone do:
    keys are turned back by each row's own positions (``cumsum(mask) - 1``) and each row's first token is its
    sink, whatever stands before it. (Turned back by column, left-padded rows' channel scales moved by up to
    60 % on SmolLM2.)"""
    model = models[arch]
    rows = [_tokens(1, length, seed=60 + length)[0] for length in (9, 6, 4)]
    config = KVQuantConfig.preset(preset)
    assert config.rope_center and config.sink_tokens == 1
    alone = calibrate(model, [row[None] for row in rows], quant_config=config, progress=False)
    padded = calibrate(model, [_padded(rows, 9, side)], quant_config=config, progress=False)
    expected, got = alone.state_dict(), padded.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:  # batched matmuls of other shapes round differently: tolerances scale with the tensor
        scale = max(1.0, float(expected[name].abs().max()))
        torch.testing.assert_close(got[name], expected[name], rtol=2e-5, atol=2e-5 * scale, msg=name)
