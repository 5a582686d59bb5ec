"""Compiled kernels (``new_cache(storage="packed", compiled=True)``): the per-token work through ``torch.compile``.

The promises: what a compiled cache stores and what its attention returns are what an eager cache's are
(up to float rounding; on these inputs, the same rows), every layer and step of one scheme shares a couple
of graphs (no recompilation per layer, per step or because a derived tensor was made late), calls that are
not decode-sized, or that a hook listens to, stay eager, and the float16 scales of a compiled cache are
the ones its rows store.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS, build_model
from conftest import random_tokens as _tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache, calibrate, use_code_attention
from quantcache.cache import attention, compiled_kernels
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.ops.quantize import _float16_nearest, stored_scale
from quantcache.scheme.number_formats import ScaleFormat

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, STEPS = 70, 5  # a prompt past MAX_QUERIES_FROM_CODES and COMPILED_TOKENS: all eager


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    """A float32 tiny Llama set to the quantcache attention (its own: session models stay on sdpa)."""
    return use_code_attention(build_model("llama"))


@pytest.fixture(scope="module")
def quantizers(model: PreTrainedModel) -> dict[str, KVQuantizer]:
    calibration = _tokens(2, 32, seed=3).long()
    return {
        name: calibrate(model, calibration, quant_config=KVQuantConfig.preset(name), progress=False)
        for name in ("int8", "int4")
    }


@pytest.fixture
def counted_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Kernels made with Dynamo's eager backend, one entry per graph compiled."""
    graphs: list[int] = []

    def counting(graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(1)
        return graph.forward

    monkeypatch.setattr(compiled_kernels, "BACKEND", counting)
    compiled_kernels.reset()
    torch.compiler.reset()
    try:
        yield graphs
    finally:
        compiled_kernels.reset()
        torch.compiler.reset()


def _graphs_per_kernel() -> dict[str, int]:
    """The graphs Dynamo holds for each kernel made (by the kernel function's name, per scheme)."""
    return {
        kernel.function.__name__: kernel.graphs()
        for kernels in compiled_kernels._KERNELS.values()
        for kernel in kernels
    }


@pytest.fixture
def inductor() -> Iterator[None]:
    """Kernels compiled by inductor, which builds C++ on a CPU: skipped where no C++ compiler is found."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        pytest.skip(f"inductor needs a C++ compiler on a CPU; {compiler} not found (set CXX)")
    compiled_kernels.reset()
    torch.compiler.reset()
    try:
        yield
    finally:
        compiled_kernels.reset()
        torch.compiler.reset()


def _step(model: PreTrainedModel, cache: QuantizedCalibratingCache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=True, **{CACHE_KEYWORD: cache}).logits


def _decode_twins(
    model: PreTrainedModel, quantizer: KVQuantizer, *, read_codes: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], QuantizedCalibratingCache, QuantizedCalibratingCache]:
    """The logits of a prompt and :data:`STEPS` single-token steps through an eager cache and a compiled one."""
    ids = _tokens(1, PROMPT + STEPS, seed=21).long()
    eager = quantizer.new_cache(storage="packed", read_codes=read_codes)
    compiled = quantizer.new_cache(storage="packed", read_codes=read_codes, compiled=True)
    got, want = [], []
    for cache, logits in ((eager, want), (compiled, got)):
        logits.append(_step(model, cache, ids[:, :PROMPT]))
        for position in range(PROMPT, PROMPT + STEPS):
            logits.append(_step(model, cache, ids[:, position : position + 1]))
    return got, want, eager, compiled


def _stored(cache: QuantizedCalibratingCache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


@pytest.mark.parametrize(
    ("name", "read_codes"), [("int4", True), pytest.param("int8", True, marks=pytest.mark.slow), ("int8", False)]
)
def test_a_compiled_cache_stores_and_attends_as_an_eager_one(
    model: PreTrainedModel, quantizers: dict[str, KVQuantizer], inductor: None, name: str, read_codes: bool
) -> None:
    """Through inductor: a prompt (eager: sinks, more than COMPILED_TOKENS tokens) and single-token steps (compiled)
    store the same rows as an eager twin's, and the logits agree to float32 rounding (the attention's sums run in
    another order). ``int4`` pushes a token out of its residual window at every step."""
    got, want, eager, compiled = _decode_twins(model, quantizers[name], read_codes=read_codes)
    assert compiled_kernels.kernels_made() == 1
    assert all(torch.equal(a, b) for a, b in zip(_stored(compiled), _stored(eager), strict=True))
    assert torch.equal(got[0], want[0])  # the prompt ran eagerly
    for step, (a, b) in enumerate(zip(got[1:], want[1:], strict=True)):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max(), step
        if not read_codes:
            assert torch.equal(a, b), step  # decoded states are bit for bit: only the encoding was compiled


def test_every_layer_and_step_of_a_scheme_shares_two_graphs_per_kernel(
    model: PreTrainedModel, quantizers: dict[str, KVQuantizer], counted_backend: list[int]
) -> None:
    """Two graphs per kernel whatever the layers and steps: the first call's (every size and position fixed) and
    the next one's (the position and length dynamic). A tensor derived on first use inside a kernel (the space's
    center, the feedback matrix, the center by RoPE pairs, the log8 table), or a guard on which layer called,
    would compile again; the logits are the eager twin's."""
    got, want, _, _ = _decode_twins(model, quantizers["int4"], read_codes=True)
    assert _graphs_per_kernel() == {"_encode_rows_scheme0": 2, "_attend_scheme0": 2} and len(counted_backend) == 4
    assert model.config.num_hidden_layers > 1 and STEPS > 2
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_each_scheme_has_kernels_of_its_own(
    model: PreTrainedModel, quantizers: dict[str, KVQuantizer], counted_backend: list[int]
) -> None:
    """A second scheme makes its own kernels (its own code objects, so its graphs never count against the first
    scheme's recompile limit); a second cache of the first scheme compiles nothing new."""
    _decode_twins(model, quantizers["int4"], read_codes=True)
    first = len(counted_backend)
    _decode_twins(model, quantizers["int4"], read_codes=True)
    assert len(counted_backend) == first and compiled_kernels.kernels_made() == 1
    _decode_twins(model, quantizers["int8"], read_codes=True)
    assert compiled_kernels.kernels_made() == 2 and len(counted_backend) == 2 * first


def test_schemes_that_differ_only_in_their_values_have_kernels_of_their_own(
    model: PreTrainedModel, counted_backend: list[int]
) -> None:
    """The value stream's settings are part of what picks a scheme's kernels, not only the keys'."""
    keys = {"dtype": "int8", "scope": "per_token", "dynamic": True}
    calibration = _tokens(2, 32, seed=3).long()
    for values in ("int8", "int4"):
        config = KVQuantConfig(**{**keys, "dtype": values}, key=keys)
        quantizer = calibrate(model, calibration, quant_config=config, progress=False)
        cache = quantizer.new_cache(storage="packed", compiled=True)
        for position in range(3):
            cache.update(*_states(1, seed=position), 0)
    assert compiled_kernels.kernels_made() == 2


def _spy_on_encoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    compiled = compiled_kernels.encode_rows

    def spy(quantizer: Any, keys: torch.Tensor, values: torch.Tensor, start: int) -> Any:
        calls.append(int(keys.shape[2]))
        return compiled(quantizer, keys, values, start)

    monkeypatch.setattr(compiled_kernels, "encode_rows", spy)
    return calls


def _states(tokens: int, seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, generator=generator) for _ in range(2))  # type: ignore[return-value]


def test_only_decode_sized_calls_no_hook_hears_are_compiled(
    quantizers: dict[str, KVQuantizer], counted_backend: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call (the sink among its tokens) and calls of more than COMPILED_TOKENS tokens are encoded eagerly,
    up to COMPILED_TOKENS compiled; with a hook listening (evaluation's measuring cache), every call is eager."""
    calls = _spy_on_encoding(monkeypatch)
    quantizer = quantizers["int8"]  # no residual window: every token is encoded as it arrives
    cache = quantizer.new_cache(storage="packed", compiled=True)
    limit = compiled_kernels.COMPILED_TOKENS
    for tokens in (3, limit + 1, limit, 1):
        cache.update(*_states(tokens, seed=tokens), 0)
    assert calls == [limit, 1]
    heard = quantizer.new_cache(storage="packed", compiled=True)
    events: list[Any] = []
    heard.on_quantize = events.append
    calls.clear()
    for tokens in (3, 1):
        heard.update(*_states(tokens, seed=tokens), 0)
    assert calls == [] and len(events) == 4  # keys and values, twice


def test_attention_runs_compiled_over_a_history_of_many_blocks(
    quantizers: dict[str, KVQuantizer], counted_backend: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A history longer than one block of CODE_BLOCK_BYTES (read eagerly block by block) goes through the kernel
    too, which reads the codes from their bytes whatever the length, and gives the eager attention's output."""
    calls: list[int] = []
    compiled = compiled_kernels.attend

    def spy(reader: Any, *args: Any) -> torch.Tensor:
        calls.append(reader.codes)
        return compiled(reader, *args)

    monkeypatch.setattr(compiled_kernels, "attend", spy)
    monkeypatch.setattr(attention, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(attention, "CODE_BLOCK_BYTES", 16 * 4 * 2 * KV_HEADS * HEAD_DIM)  # 16 rows of 2 sequences
    cache = quantizers["int4"].new_cache(storage="packed", read_codes=True, compiled=True)
    keys, values = cache.update(*_states(70, seed=3, batch=2), 0)
    reader = keys.quantcache_reader  # type: ignore[attr-defined]
    assert reader.codes == 70 - 1 - 24  # the sink and the residual window are exact rows
    query = torch.randn(2, 2 * KV_HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    eager = reader.attend(query, None, HEAD_DIM**-0.5)
    output, _ = attention.code_attention(None, query, keys, values, None)  # type: ignore[arg-type]
    assert calls == [reader.codes]
    assert (output - eager).abs().max() <= 1e-6 * eager.abs().max()


def test_compiled_needs_packed_storage_and_copies_keep_it(quantizers: dict[str, KVQuantizer]) -> None:
    quantizer = quantizers["int4"]
    with pytest.raises(ConfigError, match="compiled=True compiles a packed cache's kernels: make the cache with "):
        quantizer.new_cache(storage="fake", compiled=True)
    cache = quantizer.new_cache(storage="packed", read_codes=True, compiled=True)
    copy = cache.empty_copy()
    assert copy.compiled and copy.read_codes and all(layer.compiled_kernels for layer in copy.layers)
    assert not any(layer.compiled_kernels for layer in quantizer.new_cache(storage="packed").layers)


def test_a_fresh_quantizers_first_compiled_call_derives_nothing_inside_the_graph(
    quantizers: dict[str, KVQuantizer], counted_backend: list[int]
) -> None:
    """Two caches of a quantizer nothing was derived for yet, each encoding its step at one position: one graph. A
    tensor made inside the first call's graph would leave it guarded on that tensor's absence, and the second
    call, which finds it, would compile again."""
    quantizer = quantizers["int4"].copy()
    layer = quantizer.quantizers[0]
    for _ in range(2):
        compiled_kernels.encode_rows(layer, *_states(1, seed=7), 100)
    assert _graphs_per_kernel()["_encode_rows_scheme0"] == 1 and len(counted_backend) == 1


def test_a_fresh_quantizers_first_compiled_attention_derives_nothing_inside_the_graph(
    quantizers: dict[str, KVQuantizer], counted_backend: list[int]
) -> None:
    """The same for attention from codes: the center by RoPE pairs, which only attention reads, is made before the
    first graph, not in it."""
    quantizer = quantizers["int4"].copy()
    query = torch.randn(1, 2 * KV_HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(8))
    for _ in range(2):
        cache = quantizer.new_cache(storage="packed", read_codes=True)
        keys, _ = cache.update(*_states(70, seed=9), 0)
        compiled_kernels.attend(keys.quantcache_reader, query, None, HEAD_DIM**-0.5)  # type: ignore[attr-defined]
    assert _graphs_per_kernel()["_attend_scheme0"] == 1 and len(counted_backend) == 1


def test_ready_on_makes_every_derived_tensor_before_the_first_call(quantizers: dict[str, KVQuantizer]) -> None:
    """After ``ready_on`` an update derives nothing more: the per-device tables a kernel reads already exist."""
    quantizer = quantizers["int4"].copy()
    device = torch.device("cpu")
    layer = quantizer.quantizers[0]
    layer.ready_on(device)

    def derived() -> list[int]:
        spaces = [layer.key.space, layer.value.space]
        tables = [space._by_device for space in spaces] + [space._feedback_by_device for space in spaces]
        return [len(table) for table in tables] + [len(layer.key.space._center_pairs_by_device)]

    made = derived()
    assert made == [1, 1, 1, 0, 1]  # values are not query-aware: no feedback matrix
    cache = quantizer.new_cache(storage="packed", read_codes=True)
    cache.update(*_states(30, seed=1), 0)
    cache.update(*_states(1, seed=2), 0)
    assert derived() == made


# ---------------------------------------------------------------------------- float16 scales
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


@given(st.lists(FLOATS, min_size=1, max_size=64))
@settings(max_examples=300, deadline=None)
def test_float16_rounding_by_arithmetic_is_the_conversion(values: list[float]) -> None:
    """Nearest float16 (ties to even) for any float32: normal, subnormal, past the largest float16, NaN; and where
    it rounded a positive value down, the next float16 up."""
    tensor = torch.tensor(values, dtype=torch.float32)
    nearest, above = _float16_nearest(tensor)
    want = tensor.half().float()
    assert torch.equal(nearest.isnan(), want.isnan())
    assert torch.equal(nearest[~want.isnan()], want[~want.isnan()])
    down = (nearest < tensor) & (tensor > 0)
    up = (want[down].half().view(torch.int16) + 1).view(torch.float16).float()
    assert torch.equal(above[down], up)


def test_float16_edges_of_the_arithmetic_rounding() -> None:
    edges = torch.tensor([65504.0, 65519.0, 65520.0, 1e5, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 0.0, -0.0])
    nearest, above = _float16_nearest(edges)
    assert torch.equal(nearest, edges.half().float())
    assert nearest[2] == torch.inf and nearest[5] == 0.0 and nearest[6] == 2.0**-24
    assert above[1] == torch.inf and above[4] == 2.0**-23 and above[7] == 2.0**-14 + 2.0**-24
    # a scale above the largest float16 once nudged is stored as infinity, as the conversion makes it
    assert torch.equal(
        stored_scale(torch.tensor([65500.0, 65450.0]), ScaleFormat.FLOAT16), torch.tensor([torch.inf, 65504.0])
    )


def test_compiled_float16_scales_are_those_the_rows_store(inductor: None) -> None:
    """Inductor drops a float32 -> float16 -> float32 pair of casts; the scales a compiled kernel computes with must
    still be float16 values, rounded up, exactly as eager ones."""
    generator = torch.Generator().manual_seed(5)
    scales = torch.rand(4096, generator=generator) * 10 ** torch.empty(4096).uniform_(-9, 4, generator=generator)
    eager = stored_scale(scales, ScaleFormat.FLOAT16)
    compiled = torch.compile(lambda s: stored_scale(s, ScaleFormat.FLOAT16))(scales)
    assert torch.equal(compiled, eager)
    assert torch.equal(eager.half().float(), eager) and bool((eager >= scales).all())


def test_the_attention_kernel_passes_only_the_inductor_settings_this_torch_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ATTEND_OPTIONS`` reach ``torch.compile`` as ``options`` for inductor; a setting an inductor lacks is left
    out (``torch.compile`` refuses unknown ones), and another backend gets none."""
    import torch._inductor.config as inductor_config

    known = "realize_reads_threshold"
    assert hasattr(inductor_config, known)
    assert compiled_kernels._inductor_options({known: 1, "no_such_setting": 2}) == {"options": {known: 1}}
    assert compiled_kernels._inductor_options({"no_such_setting": 2}) == {}
    monkeypatch.setattr(compiled_kernels, "BACKEND", "eager")
    assert compiled_kernels._inductor_options({known: 1}) == {}


def test_each_kernel_is_compiled_with_its_inductor_settings(
    quantizers: dict[str, KVQuantizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both kernels get a C++ wrapper (``KERNEL_OPTIONS``); the attention kernel also ``ATTEND_OPTIONS``' own
    setting. Another backend gets neither. Every backend gets the guard filter."""
    made: dict[str, dict[str, Any]] = {}

    def recording(function: Any, tag: str, **options: Any) -> Any:
        made[function.__name__] = options
        return function

    monkeypatch.setattr(compiled_kernels, "guarded_kernel", recording)
    layer = quantizers["int4"].quantizers[0]
    for backend, expected in (
        ("inductor", ({"cpp_wrapper": True}, {"cpp_wrapper": True, "realize_reads_threshold": 1})),
        ("eager", ({}, {})),
    ):
        monkeypatch.setattr(compiled_kernels, "BACKEND", backend)
        compiled_kernels.reset()
        compiled_kernels._kernels_for(layer)
        guards = {"guard_filter_fn": compiled_kernels.kernel_guards}
        assert made == {
            "_encode_rows": {"backend": backend, "options": {**expected[0], **guards}},
            "_attend": {"backend": backend, "options": {**expected[1], **guards}},
        }
    compiled_kernels.reset()


class _Guard(NamedTuple):
    """The two fields of Dynamo's ``GuardFilterEntry`` that :func:`compiled_kernels.kernel_guards` reads."""

    guard_type: str
    is_global: bool


@pytest.mark.parametrize(
    ("guard_type", "is_global", "kept"),
    [
        ("TENSOR_MATCH", False, True),
        ("TENSOR_MATCH", True, True),  # a table found through a module-level name: still its shape and dtype
        ("CONSTANT_MATCH", False, True),  # a flag, an int, a tensor that is None
        ("CONSTANT_MATCH", True, False),  # a module setting: fixed when the kernel is made
        ("TYPE_MATCH", False, True),
        ("SHAPE_ENV", False, True),
        ("GLOBAL_STATE", False, True),
        ("DUPLICATE_INPUT", False, True),
        ("A_KIND_THIS_VERSION_DOES_NOT_NAME", False, True),
        ("ID_MATCH", False, False),
        ("ID_MATCH", True, False),
        ("CLOSURE_MATCH", False, False),
        ("DICT_NOT_CONTAINS", False, False),
        ("NOT_PRESENT_IN_GENERIC_DICT", False, False),
        ("DIMENSION_DYNAMIC_MARKING_GUARD", False, False),
    ],
)
def test_the_kernels_keep_the_guards_that_tell_calls_apart(guard_type: str, is_global: bool, kept: bool) -> None:
    """What a kernel keeps: tensors' metadata wherever found, plain values on the call's objects, sizes, types and
    global state, and any kind of guard not known to be about quantcache's own code or scheme."""
    assert compiled_kernels.kernel_guards([_Guard(guard_type, is_global)]) == [kept]
    assert compiled_kernels.kernel_guards([]) == []


def test_a_kernel_is_compiled_with_the_guard_filter_and_keeps_a_fraction_of_the_guards(
    model: PreTrainedModel,
    quantizers: dict[str, KVQuantizer],
    monkeypatch: pytest.MonkeyPatch,
    counted_backend: list[int],
) -> None:
    """Dynamo hands each kernel's guards to :func:`compiled_kernels.kernel_guards`: among them, guards on
    quantcache's modules and enum members, which it leaves out, and the states' tensor guards, which it keeps."""
    offered: list[tuple[Any, bool]] = []
    keep = compiled_kernels.kernel_guards

    def recording(entries: Any) -> list[bool]:
        flags = keep(entries)
        offered.extend(zip(entries, flags, strict=True))
        return flags

    monkeypatch.setattr(compiled_kernels, "kernel_guards", recording)
    _decode_twins(model, quantizers["int8"], read_codes=True)
    assert counted_backend
    dropped = [entry for entry, flag in offered if not flag]
    assert any(entry.is_global for entry in dropped) and any(entry.guard_type == "ID_MATCH" for entry in dropped)
    assert {"TENSOR_MATCH", "CONSTANT_MATCH", "SHAPE_ENV"} <= {entry.guard_type for entry, flag in offered if flag}
    assert len(dropped) > len(offered) // 2


def _affine(states: torch.Tensor, scale: float) -> torch.Tensor:
    return states * scale + states.shape[-1]


@pytest.fixture
def affine_kernel() -> Iterator[tuple[compiled_kernels.GuardedKernel, list[int]]]:
    """``_affine`` as a :class:`compiled_kernels.GuardedKernel` (Dynamo's eager backend), and the calls that went
    through ``torch.compile`` (each entry the number of ``torch.compile`` calls so far)."""
    through: list[int] = []
    kernel = compiled_kernels.guarded_kernel(_affine, "affine_test", backend="eager", dynamic=False)
    compiled = kernel.compiled

    def counting(*args: Any) -> Any:
        through.append(len(through) + 1)
        return compiled(*args)

    kernel.compiled = counting
    try:
        yield kernel, through
    finally:
        torch.compiler.reset()


def test_a_guarded_kernel_runs_the_graph_whose_guards_pass_without_torch_compile(
    affine_kernel: tuple[compiled_kernels.GuardedKernel, list[int]],
) -> None:
    """The first call compiles through ``torch.compile``; the next ones with the same kinds of inputs run the graph
    directly (``torch.compile`` not called) and compute what the function does."""
    kernel, through = affine_kernel
    states = torch.arange(6.0).view(2, 3)
    assert torch.equal(kernel(states, 2.0), states * 2.0 + 3) and through == [1] and kernel.graphs() == 1
    for value in (5.0, -1.0):
        fresh = torch.full((2, 3), value)
        assert torch.equal(kernel(fresh, 2.0), fresh * 2.0 + 3)
    assert through == [1] and kernel.graphs() == 1


def test_a_call_no_graphs_guards_accept_compiles_through_torch_compile(
    affine_kernel: tuple[compiled_kernels.GuardedKernel, list[int]],
) -> None:
    """A new shape and a new constant each fail every held graph's guards: the call goes through ``torch.compile``
    (a graph more), and the result is the function's, not a held graph's (which would add 3, or scale by 2)."""
    kernel, through = affine_kernel
    kernel(torch.ones(2, 3), 2.0)
    assert torch.equal(kernel(torch.ones(2, 5), 2.0), torch.full((2, 5), 7.0)) and through == [1, 2]
    assert torch.equal(kernel(torch.ones(2, 3), 4.0), torch.full((2, 3), 7.0)) and through == [1, 2, 3]
    assert kernel.graphs() == 3
    assert torch.equal(kernel(torch.ones(2, 5), 2.0), torch.full((2, 5), 7.0)) and through == [1, 2, 3]


def test_a_guarded_kernel_leaves_a_stance_other_than_the_default_to_torch_compile(
    affine_kernel: tuple[compiled_kernels.GuardedKernel, list[int]],
) -> None:
    """Under ``torch.compiler.set_stance("force_eager")`` every call goes through ``torch.compile`` (which then runs
    the function eagerly), even where a held graph's guards pass; back at the default, held graphs run directly."""
    kernel, through = affine_kernel
    kernel(torch.ones(2, 3), 2.0)
    with torch.compiler.set_stance("force_eager"):
        assert torch.equal(kernel(torch.ones(2, 3), 2.0), torch.full((2, 3), 5.0))
    assert through == [1, 2]
    kernel(torch.ones(2, 3), 2.0)
    assert through == [1, 2]


def test_the_cache_kernels_run_their_graphs_directly_after_the_first_steps(
    model: PreTrainedModel, quantizers: dict[str, KVQuantizer], counted_backend: list[int]
) -> None:
    """Over a prompt and decode steps, each kernel goes through ``torch.compile`` only for the calls that compile
    (its two graphs); every other call runs a held graph directly."""
    through: list[str] = []
    _decode_twins(model, quantizers["int4"], read_codes=True)  # makes the kernels and their graphs
    for kernels in compiled_kernels._KERNELS.values():
        for kernel in kernels:
            compiled = kernel.compiled

            def counting(*args: Any, _compiled: Any = compiled, _name: str = kernel.function.__name__) -> Any:
                through.append(_name)
                return _compiled(*args)

            kernel.compiled = counting
    got, want, _, _ = _decode_twins(model, quantizers["int4"], read_codes=True)
    assert through == [] and len(counted_backend) == 4
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_a_guarded_kernel_whose_torch_keeps_graphs_otherwise_calls_through_torch_compile(
    affine_kernel: tuple[compiled_kernels.GuardedKernel, list[int]],
) -> None:
    """Where Dynamo's cache entries are not what :class:`GuardedKernel` reads (another torch), the call and every
    later one go through ``torch.compile``, with the function's result."""
    kernel, through = affine_kernel
    kernel(torch.ones(2, 3), 2.0)
    kernel._entries = lambda code: [object()]
    assert torch.equal(kernel(torch.ones(2, 3), 2.0), torch.full((2, 3), 5.0)) and through == [1, 2]
    assert kernel._entries is None and kernel.graphs() == 0
    kernel(torch.ones(2, 3), 2.0)
    assert through == [1, 2, 3]


def test_a_guarded_kernel_inside_a_compiled_function_goes_through_torch_compile(
    affine_kernel: tuple[compiled_kernels.GuardedKernel, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Dynamo evaluates frames (a ``torch.compile``d function's eager stretches), calls go through
    ``torch.compile`` even where a held graph's guards pass; outside, held graphs run directly."""
    kernel, through = affine_kernel
    kernel(torch.ones(2, 3), 2.0)
    monkeypatch.setattr(compiled_kernels, "_eval_frame_callback", lambda: object())
    assert torch.equal(kernel(torch.ones(2, 3), 2.0), torch.full((2, 3), 5.0)) and through == [1, 2]
    monkeypatch.undo()
    assert compiled_kernels._eval_frame_callback() is None
    kernel(torch.ones(2, 3), 2.0)
    assert through == [1, 2]
