"""Appending into reserved room (``quantcache.cache.growing_storage.GrowingStorage``) instead of re-concatenating
the history.

What must hold: the states a layer returns are exactly what ``DynamicCache`` returns, in
every mode and through every cache operation; a tensor returned earlier never changes;
the room stays bounded; a decode step does not copy the history.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS
from transformers import DynamicCache, PreTrainedModel

from quantcache import QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.storage_layers import MIN_ROOM_TOKENS, ROOM_FRACTION, GrowingStorage
from quantcache.calibration.calibrate import calibrate


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _states(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["calibrate", "fake", "packed"])
def make_cache(request: pytest.FixtureRequest, llama: PreTrainedModel):  # type: ignore[no-untyped-def]
    """A factory of empty caches of one mode on the tiny Llama."""
    frozen = calibrate(llama, _tokens(2, 16, seed=0), progress=False).new_cache()
    if request.param == "calibrate":
        return lambda: QuantizedCalibratingCache(llama)
    storage = "fake" if request.param == "fake" else "packed"
    state = frozen.state_dict()

    def build() -> QuantizedCalibratingCache:
        cache = QuantizedCalibratingCache(llama, frozen.quant_config, storage=storage)
        cache.load_state_dict(state)
        return cache

    return build


# ================================================================================ GrowingStorage itself
def test_appends_are_views_of_one_buffer_with_bounded_room() -> None:
    storage = GrowingStorage()
    history = storage.append(torch.tensor([]), _states(1, 100, seed=1))
    buffer = storage.buffer
    assert buffer is not None and buffer.shape[-2] == 100 + MIN_ROOM_TOKENS
    expected = [history.clone()]
    for step in range(MIN_ROOM_TOKENS):
        new = _states(1, 1, seed=10 + step)
        history = storage.append(history, new)
        expected.append(new)
        assert history.data_ptr() == buffer.data_ptr()  # no copy of the history
    assert torch.equal(history, torch.cat(expected, dim=-2))
    assert storage.reserved_bytes(history) == 0
    history = storage.append(history, _states(1, 1, seed=99))  # full: a new buffer with new room
    assert storage.buffer is not buffer and storage.buffer is not None
    assert storage.buffer.shape[-2] == 117 + max(MIN_ROOM_TOKENS, 117 // ROOM_FRACTION)
    assert storage.reserved_bytes(history) == (storage.buffer.shape[-2] - 117) * KV_HEADS * HEAD_DIM * 4


def test_room_grows_with_the_history() -> None:
    storage = GrowingStorage()
    storage.append(torch.tensor([]), _states(1, 4096, seed=2))
    assert storage.buffer is not None and storage.buffer.shape[-2] == 4096 + 4096 // ROOM_FRACTION


def test_a_returned_tensor_never_changes_after_a_crop() -> None:
    """After a crop the next append goes to a new buffer, so the longer view returned before stays intact."""
    storage = GrowingStorage()
    before = storage.append(torch.tensor([]), _states(1, 8, seed=3))
    snapshot = before.clone()
    cropped = before[:, :, :5]
    after = storage.append(cropped, _states(1, 2, seed=4))
    assert torch.equal(before, snapshot)
    assert torch.equal(after[:, :, :5], snapshot[:, :, :5]) and after.shape[-2] == 7


@pytest.mark.parametrize(
    "replace",
    [
        lambda t: t.clone(),  # a reorder / batch select / offload made a new tensor
        lambda t: t.to(torch.float64).to(torch.float32),
        lambda t: t[:1],  # batch changed
    ],
)
def test_a_history_that_is_not_the_buffers_view_moves_to_a_new_buffer(replace) -> None:  # type: ignore[no-untyped-def]
    storage = GrowingStorage()
    history = storage.append(torch.tensor([]), _states(2, 6, seed=5))
    old = storage.buffer
    other = replace(history)
    new = _states(other.shape[0], 1, seed=6)
    result = storage.append(other, new)
    assert storage.buffer is not old
    assert torch.equal(result, torch.cat([other, new], dim=-2))


def test_a_buffer_made_in_inference_mode_is_not_written_outside_it() -> None:
    storage = GrowingStorage()
    with torch.inference_mode():
        history = storage.append(torch.tensor([]), _states(1, 4, seed=7))
    new = _states(1, 1, seed=8)
    result = storage.append(history, new)  # an in-place write to an inference tensor would raise here
    assert torch.equal(result, torch.cat([history, new], dim=-2)) and not result.is_inference()


# ================================================================================ in the cache
def _run(model: PreTrainedModel, cache: DynamicCache, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    logits = []
    with torch.no_grad():
        out = model(prompt, **{CACHE_KEYWORD: cache})
        logits.append(out.logits)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, **{CACHE_KEYWORD: cache})
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
    return logits


def test_decoding_past_the_room_equals_concatenation(llama: PreTrainedModel, make_cache) -> None:  # type: ignore[no-untyped-def]
    """Enough decode steps to fill the room twice: same logits and states as the same cache concatenating."""
    growing, concatenating = make_cache(), make_cache()
    for layer in concatenating.layers:  # the base DynamicLayer behaviour: torch.cat at every update
        layer.update = _concatenating_update(layer)
    prompt = _tokens(2, 5, seed=9)
    steps = 2 * MIN_ROOM_TOKENS + 3
    reference = _run(llama, concatenating, prompt, steps)
    for mine, theirs in zip(_run(llama, growing, prompt, steps), reference, strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(growing.layers, concatenating.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert all(entry["reserved"] > 0 for entry in growing.memory_report())


def _concatenating_update(layer):  # type: ignore[no-untyped-def]
    """``layer.update`` with the growing storage swapped for concatenation (the reference)."""
    original = layer.update

    def update(key_states, value_states, *args, **kwargs):  # type: ignore[no-untyped-def]
        layer.release_storage()
        result = original(key_states, value_states, *args, **kwargs)
        keys, values = layer.keys.clone(), layer.values.clone()  # a fresh tensor every step, like torch.cat
        layer.release_storage()
        layer.keys, layer.values = keys, values
        return result

    return update


def test_cache_operations_between_appends(llama: PreTrainedModel, make_cache) -> None:  # type: ignore[no-untyped-def]
    """Crop, beam reorder, batch repeat/select and deepcopy between decode steps: the stored tensors (states
    or packed rows) are what the same operations give on plain tensors, and earlier returned tensors are
    left untouched."""
    cache = make_cache()
    _run(llama, cache, _tokens(2, 6, seed=11), 2)
    returned = [(layer.keys.clone(), layer.keys) for layer in cache.layers]
    reference = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    cache.crop(-3)
    reference = [(k[..., :-3, :], v[..., :-3, :]) for k, v in reference]
    cache.reorder_cache(torch.tensor([1, 0]))
    reference = [(k[[1, 0]], v[[1, 0]]) for k, v in reference]
    cache.batch_repeat_interleave(2)
    reference = [(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)) for k, v in reference]
    cache.batch_select_indices(torch.tensor([0, 3]))
    reference = [(k[[0, 3]], v[[0, 3]]) for k, v in reference]
    twin = copy.deepcopy(cache)
    for layer, (keys, values) in zip(cache.layers, reference, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert layer._key_storage.buffer is None  # the operations dropped the buffers they no longer view
    _run(llama, cache, _tokens(2, 1, seed=12), 3)
    _run(llama, twin, _tokens(2, 1, seed=12), 3)
    for mine, theirs in zip(cache.layers, twin.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and mine.keys.data_ptr() != theirs.keys.data_ptr()
    for snapshot, tensor in returned:
        assert torch.equal(snapshot, tensor)


@pytest.mark.parametrize(
    "operation",
    [
        lambda cache: cache.reorder_cache(torch.tensor([1, 0])),
        lambda cache: cache.batch_repeat_interleave(2),
        lambda cache: cache.batch_select_indices(torch.tensor([1])),
    ],
    ids=["reorder", "repeat", "select"],
)
def test_operations_that_replace_the_states_release_the_old_buffers(  # type: ignore[no-untyped-def]
    llama: PreTrainedModel, make_cache, operation
) -> None:
    """Otherwise the old buffer stays alive next to the new tensor: twice the memory until the next append."""
    cache = make_cache()
    _run(llama, cache, _tokens(2, 4, seed=16), 1)
    assert all(layer._key_storage.buffer is not None for layer in cache.layers)
    operation(cache)
    assert all(layer._key_storage.buffer is None and layer._value_storage.buffer is None for layer in cache.layers)


def test_reset_and_offload_release_the_buffers(llama: PreTrainedModel, make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache()
    _run(llama, cache, _tokens(1, 4, seed=13), 1)
    layer = cache.layers[0]
    assert layer._key_storage is not None and layer._key_storage.buffer is not None
    layer.offload()
    assert layer._key_storage.buffer is None and layer.keys.shape[-2] == 5
    plain = DynamicCache(config=llama.config)
    _run(llama, plain, _tokens(1, 4, seed=13), 1)
    cache.reset()
    plain.reset()
    assert all(layer._key_storage is None or layer._key_storage.buffer is None for layer in cache.layers)
    assert cache.get_seq_length() == plain.get_seq_length()  # 0 from transformers 5 on; 4.x zeroes in place


def test_states_that_require_grad_are_concatenated(llama: PreTrainedModel) -> None:
    """Autograd through the cache: no in-place writes into a buffer; gradients reach the first states."""
    cache = QuantizedCalibratingCache(llama)
    first = _states(1, 3, seed=14).requires_grad_()
    second = _states(1, 1, seed=15).requires_grad_()
    cache.update(first, first * 2, 0)
    keys, values = cache.update(second, second, 0)
    (keys.sum() + values.sum()).backward()
    assert first.grad is not None and torch.equal(first.grad, torch.full_like(first, 3.0))
    assert cache.layers[0].reserved_bytes() == 0
