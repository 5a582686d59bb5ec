"""Trust outside the state file: faults are never masked, merges never lose data,
and hostile configs are refused fast.

* Non-finite states: a NaN or Inf element handed to a frozen cache (or to the math, for every
  granularity) comes back non-finite, exactly as it went in, while every finite element gets
  what the all-finite path gives it; one NaN input position poisons the same logit rows as with
  a plain ``DynamicCache``; ``strict_finite`` raises instead, naming the layer.
* Concurrency: eight threads observing one layer keep every minimum and maximum (the unlocked
  read-modify-write of the merge lost 445 of 2,400 minima in the issue's probe).
* Configs: alias floods, alias chains ("billion laughs") and absurd pattern lists are refused in
  well under a second with a short message.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.layer import LayerQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.stream import StreamQuantizer
from quantcache.errors import EXIT_INPUT, CalibrationError, NonFiniteStateError
from quantcache.ops.granularity import Granularity
from quantcache.ops.observers import OBSERVERS, MinMaxObserver
from quantcache.ops.quantize import QuantParams, compute_qparams, fake_quantize, stream_minmax
from quantcache.scheme.args import QuantArgs, QuantMethod, QuantScope
from quantcache.scheme.number_formats import FORMATS, FormatKind, NumberFormat, QuantDtype

KV_HEADS, HEAD_DIM = 2, 16  # conftest.py's tiny models
NON_FINITE = (math.nan, math.inf, -math.inf)

STATIC = [
    QuantArgs(scope=scope, symmetric=symmetric, group_size=4 if scope is QuantScope.GROUP else None)
    for scope in (QuantScope.PER_TENSOR, QuantScope.PER_HEAD, QuantScope.PER_CHANNEL, QuantScope.GROUP)
    for symmetric in (True, False)
]
DYNAMIC = [
    QuantArgs(scope=scope, symmetric=symmetric, dynamic=True, group_size=4 if scope is QuantScope.GROUP else None)
    for scope in (QuantScope.PER_TOKEN, QuantScope.GROUP)
    for symmetric in (True, False)
]
# Every other number format of the table (float formats are symmetric only), static and per token.
FORMAT_SCHEMES = [
    QuantArgs(dtype=dtype, scope=scope, dynamic=dynamic, symmetric=FORMATS[dtype].kind is FormatKind.FLOAT)
    for dtype in FORMATS
    if dtype is not QuantDtype.INT8
    for scope, dynamic in ((QuantScope.PER_CHANNEL, False), (QuantScope.PER_TOKEN, True))
]
# A rotation mixes every channel of a head into every coordinate (a NaN reaches the whole head vector).
ROTATED = [
    QuantArgs(rotation="hadamard", rotation_seed=3),
    QuantArgs(scope="per_token", dynamic=True, symmetric=False, rotation="hadamard"),
]
SCHEMES = STATIC + DYNAMIC + FORMAT_SCHEMES + ROTATED
MATH_SCHEMES = STATIC + DYNAMIC + FORMAT_SCHEMES  # the math functions know nothing of rotations


def _name(args: QuantArgs) -> str:
    rotated = "-rotated" if args.rotation.value != "none" else ""
    kind = f"{'dynamic-' if args.dynamic else ''}{args.scope.value}-{'sym' if args.symmetric else 'asym'}"
    return f"{args.dtype.value}-{kind}{rotated}"


# ================================================================================ helpers
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _states(seed: int, batch: int, seq: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=generator)).to(dtype)


def _poisoned(clean: torch.Tensor, bad: list[tuple[int, float]]) -> torch.Tensor:
    dirty = clean.clone()
    flat = dirty.view(-1)
    for index, value in bad:
        flat[index % flat.numel()] = value
    return dirty


def _assert_same_non_finite(out: torch.Tensor, dirty: torch.Tensor) -> None:
    """Every NaN/Inf element of ``dirty`` comes back as it went in (NaN stays NaN, +Inf stays +Inf ...)."""
    bad = ~torch.isfinite(dirty)
    assert bad.any()
    torch.testing.assert_close(out[bad], dirty[bad], rtol=0, atol=0, equal_nan=True)


def _affected_groups(args: QuantArgs, dirty: torch.Tensor) -> torch.Tensor:
    """Elements that share a dynamic parameter, or a rotated head vector, with a non-finite element
    (none, for static schemes without rotation)."""
    granularity = Granularity.of(args)
    bad = (~torch.isfinite(dirty)).float()
    if args.rotation.value != "none":
        return bad.amax(-1, keepdim=True).expand_as(bad).bool()
    if not granularity.dynamic:
        return torch.zeros_like(bad, dtype=torch.bool)
    view = granularity.grouped(bad)
    return granularity.ungrouped(granularity.reduce(bad, torch.amax).expand_as(view), bad.shape[-1]).bool()


def _params(args: QuantArgs, clean: torch.Tensor) -> QuantParams:
    granularity = Granularity.of(args)
    if args.dynamic:
        low = granularity.reduce(clean.float(), torch.amin)
        high = granularity.reduce(clean.float(), torch.amax)
    else:
        low, high = stream_minmax(clean, granularity)
    return compute_qparams(low, high, symmetric=args.symmetric, fmt=args.format)


bad_elements = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(NON_FINITE)), min_size=1, max_size=4)


# ================================================================================ 3. non-finite: the math
@settings(max_examples=150, deadline=None)
@given(
    args=st.sampled_from(MATH_SCHEMES),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    seq=st.integers(1, 4),
    bad=bad_elements,
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_fake_quantize_returns_non_finite_elements_unchanged_for_every_granularity(
    args: QuantArgs, seed: int, batch: int, seq: int, bad: list[tuple[int, float]], dtype: torch.dtype
) -> None:
    """With parameters from finite data (calibrated, or the per-token ones of the clean states), NaN and
    +-Inf come back as they went in, never as a finite code, and the finite elements are bit-identical to
    quantizing the all-finite states: the fix masks nothing and changes nothing else."""
    granularity = Granularity.of(args)
    clean = _states(seed, batch, seq, dtype)
    dirty = _poisoned(clean, bad)
    params = _params(args, clean)
    out = fake_quantize(dirty, params, granularity, args.format)
    reference = fake_quantize(clean, params, granularity, args.format)
    assert out.dtype == dtype and out.shape == dirty.shape
    _assert_same_non_finite(out, dirty)
    finite = torch.isfinite(dirty)
    assert torch.equal(out[finite], reference[finite])


FLOAT_FORMATS = [row for row in FORMATS.values() if row.kind is FormatKind.FLOAT]


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=[row.name for row in FLOAT_FORMATS])
def test_float8_formats_keep_non_finite_elements(fmt: NumberFormat) -> None:
    """A float8 code can hold NaN, and clamping turns Inf into the largest finite code: the float branch of the
    math must hand back the original NaN/Inf and leave every finite element as the all-finite path does."""
    clean = _states(0, 1, 4)
    dirty = _poisoned(clean, [(3, math.nan), (40, math.inf), (77, -math.inf)])
    low, high = stream_minmax(clean)
    params = compute_qparams(low, high, symmetric=True, fmt=fmt)
    out = fake_quantize(dirty, params, fmt=fmt)
    _assert_same_non_finite(out, dirty)
    finite = torch.isfinite(dirty)
    assert torch.equal(out[finite], fake_quantize(clean, params, fmt=fmt)[finite])


# ================================================================================ 3. non-finite: the frozen cache
@pytest.fixture(scope="module")
def frozen_caches(llama: PreTrainedModel) -> dict[str, QuantizedCalibratingCache]:
    """One frozen cache per scheme (keys and values both use it), calibrated by direct updates."""
    caches: dict[str, QuantizedCalibratingCache] = {}
    for args in SCHEMES:
        cache = QuantizedCalibratingCache(llama, KVQuantConfig(key=args, value=args))
        for layer in range(2):
            cache.update(_states(10 + layer, 2, 6), _states(20 + layer, 2, 6), layer)
        caches[_name(args)] = cache.freeze().empty_copy()
    return caches


@settings(max_examples=100, deadline=None)
@given(
    args=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**16),
    seq=st.integers(1, 4),
    layer=st.integers(0, 1),
    bad=bad_elements,
    stream=st.sampled_from(["key", "value"]),
)
def test_frozen_cache_update_keeps_non_finite_elements(
    frozen_caches: dict[str, QuantizedCalibratingCache],
    args: QuantArgs,
    seed: int,
    seq: int,
    layer: int,
    bad: list[tuple[int, float]],
    stream: str,
) -> None:
    """Faults are never masked, through the public path, for every format, granularity and the rotation: ``update`` of
    a frozen cache returns NaN/Inf where they came in (as a ``DynamicCache`` would) and, for every element
    that shares no per-token parameter or rotated vector with one, exactly what the all-finite states give."""
    frozen = frozen_caches[_name(args)]
    clean_key, clean_value = _states(seed, 1, seq), _states(seed + 1, 1, seq)
    dirty_key = _poisoned(clean_key, bad) if stream == "key" else clean_key
    dirty_value = _poisoned(clean_value, bad) if stream == "value" else clean_value
    keys, values = frozen.empty_copy().update(dirty_key, dirty_value, layer)
    reference_keys, reference_values = frozen.empty_copy().update(clean_key, clean_value, layer)
    dirty, out, reference = (
        (dirty_key, keys, reference_keys) if stream == "key" else (dirty_value, values, reference_values)
    )
    _assert_same_non_finite(out, dirty)
    unaffected = torch.isfinite(dirty) & ~_affected_groups(args, dirty)
    assert torch.equal(out[unaffected], reference[unaffected])
    other = (values, reference_values) if stream == "key" else (keys, reference_keys)
    assert torch.equal(*other)  # the clean stream of the same update is untouched


@pytest.fixture(scope="module")
def packed_caches(
    llama: PreTrainedModel, frozen_caches: dict[str, QuantizedCalibratingCache]
) -> dict[str, QuantizedCalibratingCache]:
    """The same frozen parameters with packed storage (codes kept instead of dequantized states)."""
    caches: dict[str, QuantizedCalibratingCache] = {}
    for args in SCHEMES:
        fake = frozen_caches[_name(args)]
        cache = QuantizedCalibratingCache(llama, KVQuantConfig(key=args, value=args), storage="packed")
        cache.load_state_dict(fake.state_dict())
        if not cache.is_frozen:  # all-dynamic schemes save no parameters: freezing needs no statistics
            cache.freeze()
        caches[_name(args)] = cache
    return caches


@settings(max_examples=60, deadline=None)
@given(
    args=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**16),
    seq=st.integers(1, 4),
    bad=bad_elements,
)
def test_packed_storage_keeps_non_finite_elements_non_finite(
    frozen_caches: dict[str, QuantizedCalibratingCache],
    packed_caches: dict[str, QuantizedCalibratingCache],
    args: QuantArgs,
    seed: int,
    seq: int,
    bad: list[tuple[int, float]],
) -> None:
    """Packed rows cannot hold NaN/Inf codes; a flagged row decodes to NaN. Whatever the storage, a
    non-finite element never comes back finite, and rows without one decode exactly as the fake path."""
    clean = _states(seed, 1, seq)
    dirty = _poisoned(clean, bad)
    keys, values = packed_caches[_name(args)].empty_copy().update(dirty, clean, 0)
    reference_keys, reference_values = frozen_caches[_name(args)].empty_copy().update(dirty, clean, 0)
    bad_mask = ~torch.isfinite(dirty)
    assert not torch.isfinite(keys[bad_mask]).any()
    clean_rows = ~bad_mask.any(-1, keepdim=True).expand_as(dirty)
    assert torch.equal(keys[clean_rows], reference_keys[clean_rows])
    assert torch.equal(values, reference_values)


@pytest.mark.parametrize("args", DYNAMIC, ids=[_name(args) for args in DYNAMIC])
def test_dynamic_schemes_keep_the_finite_neighbours_of_a_non_finite_element(args: QuantArgs) -> None:
    """A ``DynamicCache`` keeps the 15 finite channels of a token whose 16th overflowed; a per-token scale
    computed over the Inf is Inf and turns them all into NaN (``0 * inf``), spreading the fault instead of
    passing it through. The finite elements should be quantized with the range of the finite ones."""
    stream = StreamQuantizer("layer 0 (test) keys", args, (KV_HEADS, HEAD_DIM))
    stream.freeze()
    clean = _states(5, 1, 3)
    dirty = _poisoned(clean, [(3, math.inf), (HEAD_DIM * 1 + 7, math.nan)])  # token 0 and token 1 of head 0
    out = stream.fake_quantize(dirty)
    _assert_same_non_finite(out, dirty)
    finite = torch.isfinite(dirty)
    assert torch.isfinite(out[finite]).all()
    span = clean.abs().amax()
    assert ((out - dirty)[finite].abs() <= span / 127).all()  # within one step of the widest possible range


# ================================================================================ 3. non-finite: a real model
def _embeddings(model: PreTrainedModel, batch: int, length: int) -> torch.Tensor:
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        embeddings: torch.Tensor = model.get_input_embeddings()(ids)
    return embeddings.clone()


@pytest.fixture(scope="module")
def frozen_llama(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(symmetric=True))
    with torch.no_grad():
        llama(inputs_embeds=_embeddings(llama, 2, 12), **{CACHE_KEYWORD: cache})
    return cache.freeze().empty_copy()


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_one_non_finite_input_position_poisons_the_same_logits_as_a_dynamic_cache(
    llama: PreTrainedModel, frozen_llama: QuantizedCalibratingCache, value: float
) -> None:
    """The issue's probe: with one NaN input position a ``DynamicCache`` gave NaN in 10 of 10 rows and the
    frozen cache in 1 of 10. Prefill and two decode steps; the NaN rows must be the same (and the other
    sequences of the batch stay finite: nothing leaks across the batch)."""
    prompt = _embeddings(llama, 3, 10)
    prompt[1, 4] = value
    steps = _embeddings(llama, 3, 2)
    masks = []
    for cache in (DynamicCache(config=llama.config), frozen_llama.empty_copy()):
        with torch.no_grad():
            logits = [llama(inputs_embeds=prompt, **{CACHE_KEYWORD: cache}).logits]
            for step in range(2):
                logits.append(llama(inputs_embeds=steps[:, step : step + 1], **{CACHE_KEYWORD: cache}).logits)
        masks.append(torch.isnan(torch.cat(logits, dim=1)).any(-1))
    plain, quantized = masks
    assert plain[1].any() and plain[1, -2:].all()  # the decode steps attend to the poisoned position
    assert not plain[0].any() and not plain[2].any()
    assert torch.equal(quantized, plain)


def test_strict_finite_raises_naming_the_layer_and_stores_nothing(
    frozen_llama: QuantizedCalibratingCache,
) -> None:
    """Opt-in: refuse instead of passing NaN/Inf on, with the layer and stream in the message."""
    cache = frozen_llama.empty_copy()
    cache.quantizers[1].value.strict_finite = True
    dirty = _poisoned(_states(1, 1, 3), [(5, math.inf)])
    with pytest.raises(NonFiniteStateError, match=r"layer 1 \(model\.layers\.1\.self_attn\) values") as caught:
        cache.update(_states(2, 1, 3), dirty, 1)
    assert isinstance(caught.value, CalibrationError) and caught.value.exit_code == EXIT_INPUT
    assert cache.layers[1].keys is None or cache.layers[1].keys.numel() == 0  # neither stream was stored
    keys, _ = cache.update(dirty, dirty.clone(), 0)  # other layers and streams keep the default
    _assert_same_non_finite(keys, dirty)
    keys, values = cache.update(_states(3, 1, 3), _states(4, 1, 3), 1)  # finite states pass the strict stream
    assert torch.isfinite(values).all()
    assert cache.empty_copy().quantizers[1].value.strict_finite  # a new conversation keeps the setting


def test_strict_finite_through_a_model_forward(llama: PreTrainedModel, frozen_llama: QuantizedCalibratingCache) -> None:
    """The first layer that sees the poisoned states is the one named."""
    cache = frozen_llama.empty_copy()
    for quantizer in cache.quantizers:
        quantizer.key.strict_finite = quantizer.value.strict_finite = True
    prompt = _embeddings(llama, 1, 6)
    prompt[0, 2] = math.nan
    with torch.no_grad(), pytest.raises(NonFiniteStateError, match=r"layer 0 .* keys"):
        llama(inputs_embeds=prompt, **{CACHE_KEYWORD: cache})


# ================================================================================ 4. concurrency
THREADS, PER_THREAD, HEADS, DIM = 8, 64, 8, 64  # 512 batches, each the sole owner of one channel's extremes


def _disjoint_batches() -> list[list[torch.Tensor]]:
    """Per thread, batches in (-1, 1) where batch number c alone holds channel c's min (-10-c) and max (10+c):
    losing any single merge loses a known extreme."""
    generator = torch.Generator().manual_seed(0)
    batches: list[list[torch.Tensor]] = []
    for thread in range(THREADS):
        mine = []
        for number in range(PER_THREAD):
            batch = torch.rand(1, HEADS, 3, DIM, generator=generator) * 2 - 1
            channel = thread * PER_THREAD + number
            head, dim = divmod(channel, DIM)
            batch[0, head, 0, dim] = -10.0 - channel
            batch[0, head, 2, dim] = 10.0 + channel
            mine.append(batch)
        batches.append(mine)
    return batches


@pytest.fixture
def eager_switching() -> Iterator[None]:
    """Switch threads every microsecond instead of every 5 ms, so a race window of a few instructions opens
    thousands of times per test instead of by luck."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _run_threads(work: Callable[[int], None]) -> None:
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def run(thread: int) -> None:
        try:
            barrier.wait()
            work(thread)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=run, args=(thread,)) for thread in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors


class _YieldingMinMax(MinMaxObserver):
    """``minmax`` that yields the GIL inside the merge's read-modify-write, as a slow device or a big
    parameter tensor does: without the lock this loses about 440 of the 512 extremes every run (the
    issue's probe lost 445), with it none. The lock under test is the base class's, inherited as is."""

    def combine(self, mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        time.sleep(0)
        return super().combine(mine, theirs)


@pytest.fixture
def yielding_minmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build ``minmax`` observers from :class:`_YieldingMinMax` through the registry, for one test."""
    monkeypatch.setitem(OBSERVERS, QuantMethod.MINMAX, _YieldingMinMax)


def _expected() -> tuple[list[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    batches = _disjoint_batches()
    everything = torch.cat([batch for mine in batches for batch in mine], dim=2)
    return batches, everything.amin(dim=(0, 2)), everything.amax(dim=(0, 2))


@pytest.mark.usefixtures("yielding_minmax", "eager_switching")
def test_eight_threads_observing_one_stream_lose_no_update() -> None:
    """8 threads x 64 batches through ``StreamQuantizer.observe``: the result is the min/max of all data."""
    batches, expected_min, expected_max = _expected()
    stream = StreamQuantizer("layer 0 (test) keys", QuantArgs(), (HEADS, DIM))
    assert isinstance(stream.observer, _YieldingMinMax)

    def work(thread: int) -> None:
        for batch in batches[thread]:
            stream.observe(batch)

    _run_threads(work)
    assert stream.min is not None and stream.max is not None
    lost = int((stream.min != expected_min).sum() + (stream.max != expected_max).sum())
    assert lost == 0, f"{lost} of {2 * HEADS * DIM} channel extremes lost"


@pytest.mark.usefixtures("yielding_minmax", "eager_switching")
def test_eight_threads_observing_one_layer_lose_no_update() -> None:
    """The same through ``LayerQuantizer.observe`` (what the cache layers call), keys and values at once."""
    batches, expected_min, expected_max = _expected()
    layer = LayerQuantizer(0, "model.layers.0.self_attn", enabled=True, expected_shape=(HEADS, DIM))

    def work(thread: int) -> None:
        for batch in batches[thread]:
            layer.observe(batch, -batch)

    _run_threads(work)
    assert torch.equal(layer.key.min, expected_min) and torch.equal(layer.key.max, expected_max)
    assert torch.equal(layer.value.min, -expected_max) and torch.equal(layer.value.max, -expected_min)


@pytest.mark.usefixtures("eager_switching")
def test_eight_threads_with_the_plain_minmax_observer_lose_no_update() -> None:
    """The production observer, unmodified, five rounds (this alone catches a missing lock only sometimes
    on a small machine; the tests above catch it every time)."""
    batches, expected_min, expected_max = _expected()
    for _ in range(5):
        layer = LayerQuantizer(0, "model.layers.0.self_attn", enabled=True, expected_shape=(HEADS, DIM))

        def work(thread: int, layer: LayerQuantizer = layer) -> None:
            for batch in batches[thread]:
                layer.observe(batch, batch)

        _run_threads(work)
        for stream in (layer.key, layer.value):
            assert torch.equal(stream.min, expected_min) and torch.equal(stream.max, expected_max)


# ================================================================================ 7. hostile configs
def _alias_chain(depth: int, width: int = 9, key: str = "l") -> str:
    """The classic "billion laughs": level n is ``width`` aliases of level n-1 (``width**depth`` leaves)."""
    lines = [f"{key}0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"{key}{n}: &l{n} [{', '.join([f'*l{n - 1}'] * width)}]" for n in range(1, depth + 1)]
    return "\n".join(lines)


def _refused_fast(text: str) -> ConfigError:
    """Refused with a short message after bounded work: counted, not timed, so a busy machine cannot fail it.

    Every input here is a few kB that would expand to at least 12,000 YAML nodes: at most
    10,100 nodes may be composed (the loader's cap on alias uses, plus the document around
    them) and 2,000 objects built (the 1,500-pattern list is built, then refused by length).
    """
    counts = {"composed": 0, "built": 0}
    compose, construct = yaml.composer.Composer.compose_node, yaml.constructor.BaseConstructor.construct_object

    def composing(self: Any, *args: Any) -> Any:
        counts["composed"] += 1
        return compose(self, *args)

    def building(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["built"] += 1
        return construct(self, *args, **kwargs)

    with (
        mock.patch.object(yaml.composer.Composer, "compose_node", composing),
        mock.patch.object(yaml.constructor.BaseConstructor, "construct_object", building),
        pytest.raises(ConfigError) as caught,
    ):
        KVQuantConfig.from_yaml(text)
    assert counts["composed"] <= 10_100 and counts["built"] <= 2_000, counts
    assert len(str(caught.value)) < 300
    return caught.value


def test_an_alias_flood_is_refused_fast_with_a_short_message() -> None:
    """Twelve thousand alias uses of one anchor in ``include``: refused while parsing, not after expanding."""
    text = "anchor: &a model.layers.0.self_attn\n" + "include: [" + ", ".join(["*a"] * 12_000) + "]\n"
    assert "aliases" in str(_refused_fast(text))


def test_a_huge_pattern_list_is_refused_fast_with_a_short_message() -> None:
    """No aliases at all: a list of 1,500 patterns is not a config (the cap is 1,024)."""
    text = "include: [" + ", ".join(f"model.layers.{i}.self_attn" for i in range(1_500)) + "]\n"
    assert "1500 patterns" in str(_refused_fast(text))
    with pytest.raises(ConfigError, match="at most 512"):
        KVQuantConfig(exclude=["x" * 10_000])


def test_a_billion_laughs_under_an_unknown_key_is_refused_fast() -> None:
    """A depth-9 chain (387 million leaves if expanded) is refused by the loader before any key is read."""
    text = _alias_chain(9, key="x-lol") + "\ntype: dynamic_cache\n"
    assert "expands to more than" in str(_refused_fast(text))


class _Leaf:
    """A leaf that counts how often it is quoted: a bounded message quotes a few leaves, not all of them."""

    quoted = 0

    def __repr__(self) -> str:
        _Leaf.quoted += 1
        return "lol"


def _nested(depth: int, width: int = 9) -> list[object]:
    """``width**depth`` leaves from ``depth`` shared lists, as a YAML alias chain builds them."""
    node: list[object] = [_Leaf()] * width
    for _ in range(depth - 1):
        node = [node] * width
    return node


HUGE_VALUES: list[tuple[str, Callable[[object], object]]] = [
    ("scope", lambda huge: KVQuantConfig(scope=huge)),  # type: ignore[arg-type]
    ("symmetric", lambda huge: KVQuantConfig(symmetric=huge)),  # type: ignore[arg-type]
    ("group_size", lambda huge: KVQuantConfig(scope="group", group_size=huge)),  # type: ignore[arg-type]
    ("include", lambda huge: KVQuantConfig(include=[huge])),  # type: ignore[list-item]
    ("type", lambda huge: KVQuantConfig.from_dict({"type": huge})),
    ("spec.process type", lambda huge: KVQuantConfig.from_dict({"spec": {"process": [{"type": huge}]}})),
]


@pytest.mark.parametrize("build", [build for _, build in HUGE_VALUES], ids=[name for name, _ in HUGE_VALUES])
def test_error_messages_quote_a_bounded_part_of_a_huge_value(build: Callable[[object], object]) -> None:
    """A billion-laughs value that reaches a field is refused after quoting a bounded prefix: building the
    full ``repr`` first (531,441 leaves here, a billion in the issue's YAML) took 27 s and ended in a
    MemoryError. At most a tenth of the leaves may be quoted, and the message stays short."""
    huge = _nested(6)
    _Leaf.quoted = 0
    with pytest.raises(ConfigError) as caught:
        build(huge)
    assert len(str(caught.value)) < 300
    assert _Leaf.quoted < 9**6 // 10


def test_a_billion_laughs_yaml_is_refused_by_the_loader() -> None:
    """The classic chain uses only 81 aliases, far below the alias-use cap, yet expands to 387 million nodes;
    the loader should refuse any document that expands past a bound, wherever the chain sits (here in a
    section that is otherwise left to other tools), before any field or message touches it."""
    chain = "\n".join("    " + line for line in _alias_chain(9).splitlines())
    text = f"spec:\n  anchors:\n{chain}\n  process:\n    - type: dynamic_cache\n"
    _refused_fast(text)
