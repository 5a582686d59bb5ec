"""Observers behind the registry, and the quantizer's evaluation hook.

An observer owns a stream's statistics: the registry must build the one the config's
``method`` names, ``merge`` must be the statistics of the union of observations (it is
also the all-reduce of distributed calibration), ``load`` must refuse fields it does not
own, and copies (``KVQuantizer.copy`` deep-copies quantizers, multiprocessing pickles them) must
work without sharing the lock or the tensors. A cache's ``on_quantize`` hook is how
``evaluate`` measures error: it must be called exactly once per quantization with what the
cache keeps, follow the cache's ``empty_copy``, and hear no other cache of the same quantizer.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.cache import QuantizationEvent
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.stream import StreamQuantizer
from quantcache.ops.granularity import Granularity
from quantcache.ops.observers import OBSERVERS, MinMaxObserver, Observer, make_observer, register_observer
from quantcache.ops.quantize import fake_quantize
from quantcache.scheme.args import QuantArgs, QuantMethod, QuantScope

KV_HEADS, HEAD_DIM = 2, 16  # conftest.py's tiny models
STATIC_ARGS = [
    QuantArgs(),
    QuantArgs(scope="per_tensor"),
    QuantArgs(scope="per_head", symmetric=False),
    QuantArgs(scope="group", group_size=4),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _states(seed: int, batch: int = 1, seq: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=generator)


def _observed(args: QuantArgs, *chunks: torch.Tensor) -> Observer:
    observer = make_observer(args)
    for chunk in chunks:
        observer.merge(observer.measure(chunk))
    return observer


# ================================================================================ registry
def test_every_method_the_config_accepts_builds_an_observer() -> None:
    """A ``method`` that validates but has no observer would fail only at the first update."""
    assert set(OBSERVERS) == set(QuantMethod)
    observer = make_observer(QuantArgs())
    assert type(observer) is MinMaxObserver and observer.fields == ("min", "max")
    assert not observer.observed and observer.granularity == Granularity()


def test_a_registered_observer_is_what_the_quantizer_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new observer is one decorated class: the stream quantizer reaches it through the registry only."""
    monkeypatch.setitem(OBSERVERS, QuantMethod.MINMAX, OBSERVERS[QuantMethod.MINMAX])  # restored afterwards

    @register_observer(QuantMethod.MINMAX)
    class Widened(MinMaxObserver):
        def range(self) -> tuple[torch.Tensor, torch.Tensor]:
            low, high = super().range()
            return low * 2, high * 2

    assert OBSERVERS[QuantMethod.MINMAX] is Widened
    stream = StreamQuantizer("layer 0 (test) keys", QuantArgs(), (KV_HEADS, HEAD_DIM))
    assert type(stream.observer) is Widened
    x = _states(0)
    stream.observe(x)
    stream.freeze()
    assert stream.params is not None
    assert torch.allclose(stream.params.scale, x.abs().amax(dim=(0, 2)) * 2 / 127)


def test_an_option_the_observer_does_not_know_is_a_config_error() -> None:
    """README: unknown keys are errors that name the key. ``minmax`` takes no option, so a typo'd or foreign
    option (``percentile: 99.9``) is silently saved in the state and ignored."""
    with pytest.raises(ConfigError, match="percentile"):
        make_observer(QuantArgs(observer_options={"percentile": 99.9}))


# ================================================================================ merge, range, load
@settings(max_examples=80, deadline=None)
@given(
    args=st.sampled_from(STATIC_ARGS),
    seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=5),
    seqs=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    split=st.integers(1, 4),
)
def test_merging_two_observers_equals_observing_the_union(
    args: QuantArgs, seeds: list[int], seqs: list[int], split: int
) -> None:
    """What distributed calibration relies on: observe parts apart, merge (in either order), get exactly the
    statistics of observing everything in one observer."""
    chunks = [_states(seed, batch=1 + seed % 2, seq=seq) for seed, seq in zip(seeds, seqs, strict=False)]
    split = min(split, len(chunks) - 1)
    whole = _observed(args, *chunks)
    for first, second in ((chunks[:split], chunks[split:]), (chunks[split:], chunks[:split])):
        mine, theirs = _observed(args, *first), _observed(args, *second)
        before = {name: tensor.clone() for name, tensor in theirs.statistics.items()}
        mine.merge(theirs.statistics)
        assert mine.statistics.keys() == whole.statistics.keys()
        for name in whole.fields:
            assert torch.equal(mine.statistics[name], whole.statistics[name])
        assert all(torch.equal(before[name], theirs.statistics[name]) for name in before)  # read, not changed
    low, high = whole.range()
    assert torch.equal(low, whole.statistics["min"]) and torch.equal(high, whole.statistics["max"])


def test_merge_into_an_empty_observer_and_of_nothing() -> None:
    """An empty observer adopts the statistics; later merges must not write through into the source."""
    source = _observed(QuantArgs(), _states(1))
    snapshot = {name: tensor.clone() for name, tensor in source.statistics.items()}
    target = make_observer(QuantArgs())
    target.merge(source.statistics)
    target.merge(target.measure(_states(2) * 10))
    assert all(torch.equal(snapshot[name], source.statistics[name]) for name in snapshot)
    target.merge({})
    assert target.observed
    target.reset()
    assert not target.observed and target.statistics == {}


@pytest.mark.parametrize(
    "fields",
    [{"min": None}, {"min": None, "max": None, "scale": None}, {"minimum": None, "max": None}, {}],
    ids=["missing-max", "extra-scale", "misspelt", "empty"],
)
def test_load_refuses_fields_the_observer_does_not_own(fields: dict[str, None]) -> None:
    """A saved state of another observer (or a damaged one) must not half-load."""
    observer = _observed(QuantArgs(), _states(3))
    before = {name: tensor.clone() for name, tensor in observer.statistics.items()}
    with pytest.raises(ValueError, match=r"expected statistics \['max', 'min'\]"):
        observer.load({name: torch.zeros(KV_HEADS, HEAD_DIM) for name in fields})
    assert all(torch.equal(before[name], observer.statistics[name]) for name in before)


def test_load_copies_into_float32() -> None:
    """Loaded statistics are the observer's own float32 tensors: changing the source afterwards changes nothing."""
    low, high = -torch.ones(KV_HEADS, HEAD_DIM, dtype=torch.float16), torch.ones(KV_HEADS, HEAD_DIM)
    observer = make_observer(QuantArgs())
    observer.load({"min": low, "max": high})
    high += 5
    assert observer.statistics["min"].dtype == torch.float32
    assert torch.equal(observer.statistics["max"], torch.ones(KV_HEADS, HEAD_DIM))


# ================================================================================ copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_an_observer_copies_without_its_lock_or_tensors(how: str) -> None:
    """``empty_copy`` deep-copies quantizers and multiprocessing pickles them; a lock cannot be either, and
    a copy taken while another thread holds the lock must come with a free lock of its own."""
    observer = _observed(QuantArgs(scope="group", group_size=4), _states(4), _states(5))
    with observer._lock:  # held, as during a concurrent merge
        clone = copy.deepcopy(observer) if how == "deepcopy" else pickle.loads(pickle.dumps(observer))
    assert type(clone) is type(observer) and clone.args == observer.args
    assert clone._lock is not observer._lock and not clone._lock.locked()
    for name in observer.fields:
        assert torch.equal(clone.statistics[name], observer.statistics[name])
        assert clone.statistics[name].data_ptr() != observer.statistics[name].data_ptr()
    clone.merge(clone.measure(_states(6) * 100))
    assert not torch.equal(clone.statistics["max"], observer.statistics["max"])


def test_a_stream_quantizer_copy_has_its_own_observer_and_parameters() -> None:
    stream = StreamQuantizer("layer 0 (test) keys", QuantArgs(), (KV_HEADS, HEAD_DIM))
    stream.observe(_states(7))
    stream.freeze()
    clone = copy.deepcopy(stream)
    assert clone.observer is not stream.observer and clone.observer._lock is not stream.observer._lock
    assert clone.params is not None and stream.params is not None
    assert clone.params.scale.data_ptr() != stream.params.scale.data_ptr()
    pickled = pickle.loads(pickle.dumps(StreamQuantizer("layer 0 (test) values", QuantArgs())))
    assert not pickled.observer._lock.locked()


# ================================================================================ 8. the evaluation hook
class Recorder:
    """A stateful hook (as ``evaluate`` uses): a copied hook would record into a copy that nobody reads."""

    def __init__(self) -> None:
        self.calls: list[QuantizationEvent] = []

    def __call__(self, event: QuantizationEvent) -> None:
        self.calls.append(event._replace(states=event.states.clone(), quantized=event.quantized.clone()))


def _frozen(model: PreTrainedModel, config: KVQuantConfig | None = None) -> QuantizedCalibratingCache:
    cache = QuantizedCalibratingCache(model, config)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model(ids, **{CACHE_KEYWORD: cache})
    return cache.freeze().empty_copy()


def _hook_everything(cache: QuantizedCalibratingCache, recorder: Recorder) -> None:
    cache.on_quantize = recorder


@pytest.mark.parametrize(
    "config",
    [
        KVQuantConfig(),
        KVQuantConfig(symmetric=False, exclude=["model.layers.0.self_attn"]),
        KVQuantConfig(value=QuantArgs(scope="per_token", dynamic=True)),
        KVQuantConfig(),
    ],
    ids=["seed", "asymmetric-layer-0-excluded", "dynamic-values", "packed"],
)
def test_on_quantize_is_called_once_per_quantization_with_what_the_cache_keeps(
    llama: PreTrainedModel, config: KVQuantConfig, request: pytest.FixtureRequest
) -> None:
    """A prefill and two decode steps: one call per stream, layer and step, in layer order, with the incoming
    states, exactly what the cache then holds for those tokens, and the elements that clipped."""
    storage = "packed" if request.node.callspec.id == "packed" else "fake"
    cache = _frozen(llama, config).quantizer.new_cache(storage=storage)
    recorder = Recorder()
    _hook_everything(cache, recorder)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(9))
    steps = [ids[:, :5], ids[:, 5:6], ids[:, 6:7]]
    with torch.no_grad():
        for step in steps:
            llama(step, **{CACHE_KEYWORD: cache})
    layers = cache.quantized_layers
    assert len(recorder.calls) == len(steps) * len(layers) * 2
    position = 0
    calls = iter(recorder.calls)
    for step in steps:
        for index in layers:
            quantizer = cache.quantizers[index]
            for name, stream in quantizer.streams:
                call = next(calls)
                assert (call.layer_idx, call.stream) == (index, name)
                assert call.states.shape == (1, KV_HEADS, step.shape[1], HEAD_DIM)
                assert call.quantized.shape == call.states.shape and call.quantized.dtype == call.states.dtype
                params = stream.params_for(call.states)
                if stream.dynamic:
                    assert params.scale.shape == (1, KV_HEADS, step.shape[1], 1)
                else:
                    assert stream.params is not None and torch.equal(params.scale, stream.params.scale)
                expected = fake_quantize(call.states, params, stream.granularity, stream.format)
                assert torch.equal(call.quantized, expected)
                assert torch.equal(call.clipped, stream.saturated(call.states, params))
                kept = cache.layers[index].keys if name == "key" else cache.layers[index].values
                if storage == "fake":
                    assert torch.equal(kept[:, :, position : position + step.shape[1]], call.quantized)
        position += step.shape[1]


def test_on_quantize_follows_empty_copy_and_no_other_cache(llama: PreTrainedModel) -> None:
    """``evaluate`` sets the hook once and runs many conversations through empty copies: every copy must report
    to the same recorder, and a cache of the same quantizer that did not ask must not."""
    cache = _frozen(llama)
    recorder = Recorder()
    _hook_everything(cache, recorder)
    cache.quantizer.new_cache().update(_states(8), _states(9), 1)
    assert recorder.calls == []
    for clone in (cache.empty_copy(), cache.empty_copy().empty_copy()):
        assert clone.on_quantize is recorder
        before = len(recorder.calls)
        keys, values = _states(10), _states(11)
        clone.update(keys, values, 1)
        assert len(recorder.calls) == before + 2
        assert torch.equal(recorder.calls[-2].states, keys) and torch.equal(recorder.calls[-1].states, values)
        assert [(call.layer_idx, call.stream) for call in recorder.calls[-2:]] == [(1, "key"), (1, "value")]


def test_on_quantize_is_not_called_while_calibrating_or_for_excluded_layers(llama: PreTrainedModel) -> None:
    """Nothing is quantized then, so an evaluation must see no call."""
    recorder = Recorder()
    calibrating = QuantizedCalibratingCache(llama, KVQuantConfig(exclude=["model.layers.1.self_attn"]))
    _hook_everything(calibrating, recorder)
    calibrating.update(_states(12), _states(13), 0)
    calibrating.update(_states(14), _states(15), 1)
    assert recorder.calls == []
    frozen = calibrating.freeze().empty_copy()
    assert frozen.on_quantize is recorder
    frozen.update(_states(16), _states(17), 1)
    assert recorder.calls == []
    frozen.update(_states(18), _states(19), 0)
    assert [(call.layer_idx, call.stream) for call in recorder.calls] == [(0, "key"), (0, "value")]


def test_granularity_of_an_observer_follows_its_arguments() -> None:
    """The observer reduces with the stream's granularity: group statistics have one value per group."""
    observer = _observed(QuantArgs(scope="group", group_size=4), _states(20))
    assert observer.statistics["min"].shape == (KV_HEADS, HEAD_DIM // 4)
    assert observer.granularity == Granularity(QuantScope.GROUP, False, 4)
