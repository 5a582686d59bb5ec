"""quantcache.calibration.calibrate on tiny random models (conftest.py).

The statistics ``calibrate`` collects must equal those of the hand-written loop it
replaces (one forward per sample into a fresh empty copy, then freeze), whatever form
the data comes in; the returned cache must be empty and frozen; bad data must fail
with a ``ValueError`` that names the problem before the model runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import VOCAB
from transformers import PreTrainedModel

from quantcache import CacheMode, CalibrationError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.models.data import DataError


def _ids(seed: int, samples: int = 4, length: int = 20) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, length), generator=generator)


def _manual(model: PreTrainedModel, batches: list[torch.Tensor], config: KVQuantConfig) -> QuantizedCalibratingCache:
    """The loop calibrate().new_cache() replaces, written out as the cache's docstring shows it."""
    cache = QuantizedCalibratingCache(model, config)
    with torch.no_grad():
        for batch in batches:
            model(batch, **{CACHE_KEYWORD: cache}, use_cache=True)
            cache = cache.empty_copy()
    return cache.freeze()


def _assert_same_state(first: QuantizedCalibratingCache, second: QuantizedCalibratingCache, *, exact: bool) -> None:
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys() and one
    for name in one:
        if exact:
            assert torch.equal(one[name], two[name]), name
        else:
            torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("symmetric", [True, False])
def test_calibrate_equals_the_manual_loop(llama: PreTrainedModel, symmetric: bool) -> None:
    data = _ids(0)
    config = KVQuantConfig(symmetric=symmetric)
    cache = calibrate(llama, data, quant_config=config, progress=False).new_cache()
    _assert_same_state(cache, _manual(llama, list(data.split(1)), config), exact=True)
    assert cache.is_frozen and cache.quant_config == config


def test_statistics_span_every_sample(llama: PreTrainedModel) -> None:
    """More samples can only widen the ranges; each single sample's range lies inside."""
    data = _ids(1)
    everything = calibrate(llama, data, freeze=False, progress=False).new_cache()
    for row in data:
        alone = calibrate(llama, row.unsqueeze(0), freeze=False, progress=False).new_cache()
        for mine, theirs in zip(everything.quantizers, alone.quantizers, strict=True):
            for (_, wide), (_, narrow) in zip(mine.streams, theirs.streams, strict=True):
                assert wide.min is not None and wide.max is not None
                assert narrow.min is not None and narrow.max is not None
                assert bool((wide.min <= narrow.min).all()) and bool((wide.max >= narrow.max).all())


def test_batches_as_iterable_or_tensor_give_the_same_statistics(llama: PreTrainedModel) -> None:
    data = _ids(2)
    from_tensor = calibrate(llama, data, batch_size=2, progress=False).new_cache()
    from_list = calibrate(llama, [data[:2], data[2:]], progress=False).new_cache()

    def generate() -> Iterator[torch.Tensor]:
        yield data[:2]
        yield data[2:]

    from_generator = calibrate(llama, generate(), progress=False).new_cache()
    _assert_same_state(from_tensor, from_list, exact=True)
    _assert_same_state(from_tensor, from_generator, exact=True)
    # Batching changes only the float rounding of the forward pass, not which states are seen.
    _assert_same_state(from_tensor, calibrate(llama, data, batch_size=1, progress=False).new_cache(), exact=False)


def test_result_is_empty_frozen_and_editable(llama: PreTrainedModel) -> None:
    cache = calibrate(llama, _ids(3), progress=False).new_cache()
    assert cache.get_seq_length() == 0
    assert cache.mode is CacheMode.FROZEN
    for quantizer in cache.quantizers:
        for _, stream in quantizer.streams:
            assert stream.min is not None and not stream.min.is_inference()
            stream.min.mul_(1.0)  # statistics are ordinary tensors outside inference mode


def test_unfrozen_result_and_continuing_from_a_cache(llama: PreTrainedModel) -> None:
    data = _ids(4)
    first = calibrate(llama, data[:2], freeze=False, progress=False).new_cache()
    assert first.mode is CacheMode.CALIBRATE
    before = first.state_dict()
    continued = calibrate(llama, data[2:], cache=first, progress=False).new_cache()
    assert continued is not first
    after = first.state_dict()  # the cache passed in is left as it was
    assert all(torch.equal(before[name], after[name]) for name in before)
    _assert_same_state(continued, calibrate(llama, data, progress=False).new_cache(), exact=True)


def test_excluded_layers_collect_nothing(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(exclude=("model.layers.0.self_attn",))
    cache = calibrate(llama, _ids(5), quant_config=config, progress=False).new_cache()
    assert cache.quantized_layers == [1]
    assert {name.split(".")[1] for name in cache.state_dict()} == {"1"}


def test_progress_goes_to_stderr(llama: PreTrainedModel, capsys: pytest.CaptureFixture[str]) -> None:
    calibrate(llama, _ids(6), progress=True).new_cache()
    shown = capsys.readouterr()
    assert "tok" in shown.err and shown.out == ""
    calibrate(llama, _ids(6), progress=False).new_cache()
    assert capsys.readouterr().err == ""


BAD_DATA = {
    "float": (torch.rand(2, 8), "integer"),
    "one-dimensional": (torch.arange(3, 11), "unsqueeze"),
    "three-dimensional": (torch.ones(1, 2, 8, dtype=torch.int64), "shape"),
    "no samples": (torch.ones(0, 8, dtype=torch.int64), "empty"),
    "no tokens": (torch.ones(2, 0, dtype=torch.int64), "empty"),
    "empty list": ([], "no batches"),
    "list of floats": ([torch.rand(1, 8)], "integer"),
    "list of non-tensors": ([[1, 2, 3]], "torch.Tensor"),
    "string": ("some text", "iterable"),
    "id beyond the vocabulary": (torch.full((1, 8), VOCAB), "tokenizer"),
    "negative id": (torch.full((1, 8), -1), "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_a_value_error(llama: PreTrainedModel, case: str) -> None:
    data, message = BAD_DATA[case]
    with pytest.raises(ValueError, match=message) as raised:
        calibrate(llama, data, progress=False).new_cache()  # type: ignore[arg-type]
    assert isinstance(raised.value, DataError)


def test_bad_arguments(llama: PreTrainedModel) -> None:
    data = _ids(7)
    with pytest.raises(ValueError, match="batch_size"):
        calibrate(llama, data, batch_size=0, progress=False).new_cache()
    frozen = calibrate(llama, data, progress=False).new_cache()
    with pytest.raises(ValueError, match="frozen"):
        calibrate(llama, data, cache=frozen, progress=False).new_cache()
    with pytest.raises(ValueError, match="differ"):
        calibrate(llama, data, cache=frozen.unfreeze(), quant_config=KVQuantConfig(symmetric=False), progress=False)
    with pytest.raises(CalibrationError, match="no layer is selected"):
        calibrate(llama, data, quant_config=KVQuantConfig(exclude=("*",)), progress=False).new_cache()
