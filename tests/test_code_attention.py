"""Attention read from packed codes (``attn_implementation="quantcache"``, ``read_codes=True``).

The promise: the same attention as over the decoded states, up to float rounding. Checked for every
number format x scope x symmetry x rotation of the packed matrix at the layer (against ``sdpa`` over
the rows decoded), for every preset and a post-RoPE centred, query-aware scheme through whole models
with full and sliding-window layers (prefill, chunks, single steps), through generation with padding,
beams and assisted decoding, with NaN states, without a host synchronisation; and the refusals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS, build_model, generate_greedy
from conftest import random_tokens as _tokens
from test_host_sync import HostSyncTrap
from test_packed import MATRIX, _scheme_id
from transformers import DynamicCache, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache, calibrate, use_code_attention
from quantcache.cache import attention
from quantcache.cache.attention import ATTENTION_NAME, MAX_QUERIES_FROM_CODES, CodeReader, code_attention
from quantcache.cache.compiled_kernels import compiled_copy
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.scheme.args import QuantArgs
from quantcache.scheme.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = 4  # query heads over KV_HEADS = 2: two query heads read each kv head
# Post-RoPE keys, centred and query-aware: every fold (center, channel scale, rotation, per-row scale) on keys.
POST_ROPE_CENTRED: dict[str, Any] = {
    "dtype": "int4",
    "scope": "per_token",
    "dynamic": True,
    "center": True,
    "rotation": "hadamard",
    "key": {
        "dtype": "int4",
        "scope": "per_token",
        "dynamic": True,
        "center": True,
        "rotation": "hadamard",
        "query_aware": True,
        "symmetric": False,
    },
    "sink_tokens": 1,
    "residual_window": 3,
}
SCHEMES: dict[str, dict[str, Any]] = {name: {"preset": name} for name in PRESETS} | {
    "post-rope-centred": POST_ROPE_CENTRED,
    # static rows beside full-precision ones: the scores of both must be on one scale
    "seed-sinks-window": {"preset": "seed", "sink_tokens": 2, "residual_window": 3},
    # tokens leaving the window two at a time: rows pending beside rows with codes
    "int4-block": {"preset": "int4", "residual_window": 1, "residual_block": 2},
    # keys quantized before RoPE (the presets before rope_center): decoded and turned, values read from codes
    **{f"{name}-pre-rope": {"preset": name, "pre_rope_keys": True, "rope_center": False} for name in ("int8", "int4")},
}


def _config(scheme: dict[str, Any]) -> KVQuantConfig:
    if "preset" not in scheme:
        return KVQuantConfig(**scheme)
    settings = {name: value for name, value in scheme.items() if name != "preset"}
    return KVQuantConfig.preset(scheme["preset"], **settings)


@pytest.fixture(scope="module")
def models() -> dict[str, PreTrainedModel]:
    """float64 Llama and Gemma 3 set to the quantcache attention (their own: session models stay on sdpa)."""
    return {arch: use_code_attention(build_model(arch).to(torch.float64)) for arch in ("llama", "gemma3")}


def _pair(model: PreTrainedModel, scheme: dict[str, Any]) -> tuple[QuantizedCalibratingCache, ...]:
    quantizer = calibrate(model, _tokens(2, 24, seed=3).long(), quant_config=_config(scheme), progress=False)
    return quantizer.new_cache(storage="packed"), quantizer.new_cache(storage="packed", read_codes=True)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


# ---------------------------------------------------------------------------- one layer, every packed scheme
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("args", MATRIX, ids=_scheme_id)
def test_a_layer_attends_from_codes_as_sdpa_over_its_decoded_rows(args: QuantArgs, traced: bool) -> None:
    """Prefill of 7 tokens then one step, GQA, batch 2: the outputs of both attentions agree to float32 rounding.

    The decoded rows are float32 (what decoding computes), the attention from codes float64: what is left
    is the decode's own rounding, far below any mistake in a fold (a wrong sign, scale or offset moves
    outputs by 1e-2 or more). ``traced``: the attention as a compiled graph computes it (the products with
    the codes written as sums that the generated kernel reads from the bytes), traced by Dynamo as one graph.
    """
    # a code object per scheme: Dynamo's recompile limit counts the graphs of one
    attend = code_attention
    if traced:
        attend = compiled_copy(code_attention, _scheme_id(args), backend="eager", fullgraph=True)
    model = build_model("llama")
    config = KVQuantConfig(key=args, value=args)
    cache = QuantizedCalibratingCache(model, config, storage="packed")
    with torch.no_grad():
        model(_tokens(2, 16, seed=1), **{CACHE_KEYWORD: cache})
    state = cache.freeze().state_dict()
    reading = QuantizedCalibratingCache(model, config, storage="packed", read_codes=True)
    reading.load_state_dict(state)
    if not reading.is_frozen:
        reading.freeze()
    generator = torch.Generator().manual_seed(5)
    for tokens in (7, 1):
        keys = torch.randn(2, KV_HEADS, tokens, HEAD_DIM, generator=generator, dtype=torch.float64)
        values = torch.randn(2, KV_HEADS, tokens, HEAD_DIM, generator=generator, dtype=torch.float64)
        key_rows, value_rows = reading.update(keys, values, 0)
        reader: CodeReader = key_rows.quantcache_reader  # type: ignore[attr-defined]
        query = torch.randn(2, HEADS, tokens, HEAD_DIM, generator=generator, dtype=torch.float64)
        got, _ = attend(model.model.layers[0].self_attn, query, key_rows, value_rows, None, scaling=0.3)
        decoded_keys = reader.quantizer.key.decode(reader.key_rows, torch.float64)
        decoded_values = reader.quantizer.value.decode(reader.value_rows, torch.float64)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, decoded_keys, decoded_values, is_causal=tokens > 1, scale=0.3, enable_gqa=True
        ).transpose(1, 2)
        assert got.shape == expected.shape == (2, tokens, HEADS, HEAD_DIM) and got.dtype == torch.float64
        assert _relative(got, expected) < 1e-5


# ---------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("block_rows", [None, 3], ids=["one-block", "blocks-of-3"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_layer_of_a_model_attends_from_codes_as_sdpa_over_the_decoded_states(
    models: dict[str, PreTrainedModel], arch: str, name: str, block_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20-token prefill, an 8-token chunk and single steps past int4's 24-token window and Gemma 3's
    8-token sliding window, with sink tokens and residual windows as each scheme has them: at every layer
    and step, with the model's own queries and masks, the attention from codes equals ``sdpa`` over the
    states the same rows decode to (:meth:`CodeReader.states`, what ``update()`` returns without
    ``read_codes``), and those states equal what a twin cache that decodes returns (the same rows, while
    no code differs between the two; a code may round the other way once the outputs part by float
    rounding, so later steps compare within each cache alone). ``blocks-of-3``: the rows read from codes
    taken 3 at a time (a long history's blocks, :data:`~quantcache.cache.attention.CODE_BLOCK_BYTES`), the
    last block shorter, each with its own rows' scales, poison and center."""
    if block_rows is not None:
        monkeypatch.setattr(attention, "CODE_BLOCK_BYTES", 1)
        monkeypatch.setattr(attention, "MIN_BLOCK_ROWS", block_rows)
    model = models[arch]
    decoded, reading = _pair(model, SCHEMES[name])
    ids = _tokens(2, 34, seed=4)
    seen: list[float] = []
    blocks: list[int] = []
    original = attention.code_attention

    def checking(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any):
        got, weights = original(module, query, key, value, mask, **kwargs)
        reader: CodeReader | None = getattr(key, "quantcache_reader", None)
        if reader is None:  # the twin cache's states, through sdpa
            return got, weights
        keys, values = reader.states(query.dtype)
        causal = mask is None and query.shape[2] > 1
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=causal, scale=kwargs.get("scaling"), enable_gqa=True
        ).transpose(1, 2)
        seen.append(_relative(got, expected))
        blocks.append(len(reader._blocks(int(query.shape[0] * key.shape[1] * query.shape[-1]))))
        return got, weights

    try:
        with patch.object(attention, "code_attention", checking), torch.inference_mode():
            attention.register_code_attention()
            for start, end in ((0, 20), (20, 28), *((t, t + 1) for t in range(28, 34))):
                model(ids[:, start:end], use_cache=True, **{CACHE_KEYWORD: reading})
                if start == 0:
                    model(ids[:, start:end], use_cache=True, **{CACHE_KEYWORD: decoded})
                    for twin, layer in zip(decoded.layers, reading.layers, strict=True):
                        assert torch.equal(twin.keys, layer.keys) and torch.equal(twin.values, layer.values)
    finally:
        attention.register_code_attention()
    assert len(seen) == 8 * len(model.model.layers) and max(seen) < 1e-6
    assert (max(blocks) > 2) == (block_rows is not None)  # a long history is read in several blocks, or in one


def test_a_model_reading_codes_gives_the_logits_of_decoded_states(models: dict[str, PreTrainedModel]) -> None:
    """End to end on a prefill and three steps: the logits agree to float rounding."""
    model = models["llama"]
    decoded, reading = _pair(model, {"preset": "int4"})
    ids = _tokens(2, 23, seed=4)
    with torch.inference_mode():
        for start, end in ((0, 20), (20, 21), (21, 22), (22, 23)):
            expected = model(ids[:, start:end], use_cache=True, **{CACHE_KEYWORD: decoded}).logits
            got = model(ids[:, start:end], use_cache=True, **{CACHE_KEYWORD: reading}).logits
            assert _relative(got, expected) < 1e-6, (start, end)


def test_the_center_arranged_for_reading_codes_is_counted_once_made(models: dict[str, PreTrainedModel]) -> None:
    """``rope_center`` keys read from codes: each layer's center by RoPE pairs (``(kv_heads, 2, 2, r)`` float32)
    is made on the first call that reads codes (a short prompt does), and ``memory_report()`` counts it with
    the derived tensors of a cache that reads codes; one that decodes its rows neither makes nor counts it."""
    model = models["llama"]
    decoded, reading = _pair(model, {"preset": "int8"})
    ids = _tokens(1, 12, seed=5)
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    arranged = kv_heads * 2 * 2 * (head_dim // 2) * 4
    with torch.inference_mode():
        for cache, made in ((decoded, 0), (reading, arranged)):
            for start, end in ((0, 11), (11, 12)):
                model(ids[:, start:end], use_cache=True, **{CACHE_KEYWORD: cache})
                assert [entry["encoder"] for entry in cache.memory_report()] == [made] * len(cache.layers)
    assert [entry["encoder"] for entry in decoded.memory_report()] == [0] * len(decoded.layers)  # made, not read


def test_keys_quantized_before_rope_are_decoded_and_values_read_from_codes(models: dict[str, PreTrainedModel]) -> None:
    """Keys quantized before RoPE: the reader holds them decoded; the seed's and the presets' (rope_center)
    are read from codes."""
    model = models["llama"]
    for name, decodes_keys in (("int4-pre-rope", True), ("seed", False), ("int4", False)):
        _, reading = _pair(model, SCHEMES[name])
        states = torch.randn(1, KV_HEADS, 5, HEAD_DIM, dtype=torch.float64)
        key_rows, _ = reading.update(states, states, 0)
        reader: CodeReader = key_rows.quantcache_reader  # type: ignore[attr-defined]
        assert (reader.keys is not None) == decodes_keys
        assert key_rows.dtype == torch.uint8 and key_rows.data_ptr() == reading.layers[0].keys.data_ptr()


MODES = {"greedy": {}, "beams": {"num_beams": 2}, "assisted": {"assistant_model": "self"}}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("name", ["seed", "int4", "int4-pre-rope"])
def test_generation_reading_codes_equals_generation_over_decoded_states(
    models: dict[str, PreTrainedModel], name: str, mode: dict[str, Any]
) -> None:
    """A left-padded batch of two prompts (one prompt for assisted decoding, which takes no batch): the same
    tokens, and logits to float rounding, through beams and crops."""
    model = models["llama"]
    decoded, reading = _pair(model, SCHEMES[name])
    prompt = _tokens(2, 9, seed=6)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    settings = {**mode, "assistant_model": model} if "assistant_model" in mode else mode
    if "assistant_model" in mode:
        prompt, mask = prompt[:1], mask[:1]
    expected = generate_greedy(model, decoded, prompt, attention_mask=mask, **settings)
    got = generate_greedy(model, reading, prompt, attention_mask=mask, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for got_logits, expected_logits in zip(got.logits, expected.logits, strict=True):
        finite = torch.isfinite(expected_logits)
        assert torch.equal(finite, torch.isfinite(got_logits))
        assert _relative(got_logits[finite], expected_logits[finite]) < 1e-6


@pytest.mark.parametrize("block_rows", [None, 2], ids=["one-block", "blocks-of-2"])
@pytest.mark.parametrize("name", ["seed", "int8", "int4", "int4-pre-rope"])
def test_a_nan_state_poisons_the_queries_that_read_it(
    models: dict[str, PreTrainedModel], name: str, block_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN key or value in a row read from codes (past the sink, before int4's residual window): every
    query of that batch row and kv head reads it and gives NaN, as over decoded states; the other batch row
    stays finite and equal. ``blocks-of-2``: the row is in the third block of rows read from codes."""
    if block_rows is not None:
        monkeypatch.setattr(attention, "CODE_BLOCK_BYTES", 1)
        monkeypatch.setattr(attention, "MIN_BLOCK_ROWS", block_rows)
    model = models["llama"]
    decoded, reading = _pair(model, SCHEMES[name])
    module = model.model.layers[0].self_attn
    for stream in ("key", "value"):
        decoded_copy, reading_copy = decoded.empty_copy(), reading.empty_copy()
        states = torch.randn(2, KV_HEADS, 30, HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        dirty = states.clone()
        dirty[1, 0, 4, 3] = float("nan")
        keys, values = (dirty, states) if stream == "key" else (states, dirty)
        expected_keys, expected_values = decoded_copy.update(keys, values, 0)
        key_rows, value_rows = reading_copy.update(keys, values, 0)
        query = torch.randn(2, HEADS, 1, HEAD_DIM, dtype=torch.float64)
        got, _ = code_attention(module, query, key_rows, value_rows, None, scaling=0.25)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, expected_keys, expected_values, scale=0.25, enable_gqa=True
        ).transpose(1, 2)
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), stream
        assert torch.isnan(got[1, :, :2]).all() and torch.isfinite(got[0]).all()
        assert _relative(got[0], expected[0]) < 1e-6


@pytest.mark.parametrize("name", ["seed", "int8", "int4", "int4-pre-rope"])
def test_attention_from_codes_makes_no_host_synchronisation(models: dict[str, PreTrainedModel], name: str) -> None:
    model = models["llama"]
    _, reading = _pair(model, SCHEMES[name])
    ids = _tokens(1, 30, seed=9)
    with torch.inference_mode():
        model(ids[:, :29], use_cache=True, **{CACHE_KEYWORD: reading})
        with HostSyncTrap():
            model(ids[:, 29:], use_cache=True, **{CACHE_KEYWORD: reading})


# ---------------------------------------------------------------------------- any other cache, and refusals
def test_other_caches_get_sdpa_exactly(models: dict[str, PreTrainedModel]) -> None:
    """A model set to the quantcache attention gives sdpa's logits bit for bit with a DynamicCache."""
    model = models["llama"]
    ids = _tokens(1, 12, seed=10)
    with torch.inference_mode():
        got = model(ids, use_cache=True, **{CACHE_KEYWORD: DynamicCache()}).logits
        model.config._attn_implementation = "sdpa"
        try:
            expected = model(ids, use_cache=True, **{CACHE_KEYWORD: DynamicCache()}).logits
        finally:
            use_code_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert torch.equal(got, expected)


def test_read_codes_needs_packed_storage(llama: PreTrainedModel) -> None:
    quantizer = calibrate(llama, _tokens(1, 16, seed=2), progress=False)
    with pytest.raises(ConfigError, match="storage='packed'"):
        quantizer.new_cache(read_codes=True)
    assert quantizer.new_cache(storage="packed", read_codes=True).empty_copy().read_codes


def test_unmarked_rows_and_unsupported_attention_are_refused(models: dict[str, PreTrainedModel]) -> None:
    model = models["llama"]
    module = model.model.layers[0].self_attn
    rows = torch.zeros(1, KV_HEADS, 3, HEAD_DIM + 1, dtype=torch.uint8)
    query = torch.zeros(1, HEADS, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="read_codes=True"):
        code_attention(module, query, rows, rows, None)
    _, reading = _pair(model, {"preset": "seed"})
    states = torch.zeros(1, KV_HEADS, 2, HEAD_DIM, dtype=torch.float64)
    key_rows, value_rows = reading.update(states, states, 0)
    for refused in ({"softcap": 30.0}, {"s_aux": torch.zeros(HEADS)}, {"dropout": 0.1}):
        with pytest.raises(ValueError, match="soft-caps"):
            code_attention(module, query.double(), key_rows, value_rows, None, **refused)


def _decode_step(model: PreTrainedModel) -> Callable[[QuantizedCalibratingCache, torch.Tensor], torch.Tensor]:
    """One decode forward of ``model`` into a cache, its logits: what the compile tests trace."""

    def step(cache: QuantizedCalibratingCache, token: torch.Tensor) -> torch.Tensor:
        return model(token, use_cache=True, **{CACHE_KEYWORD: cache}).logits

    return step


def _prefilled_twins(
    model: PreTrainedModel, name: str, prompt: torch.Tensor
) -> tuple[QuantizedCalibratingCache, QuantizedCalibratingCache]:
    """Two caches of ``SCHEMES[name]`` reading codes (one to compile, one eager), both after ``prompt`` under
    ``torch.inference_mode``."""
    _, compiled_cache = _pair(model, SCHEMES[name])
    eager_cache = compiled_cache.empty_copy()
    with torch.inference_mode():
        for cache in (compiled_cache, eager_cache):
            model(prompt, use_cache=True, **{CACHE_KEYWORD: cache})
    return compiled_cache, eager_cache


@pytest.mark.parametrize(
    "name", ["seed", "int4", "int4-block", pytest.param("int4-pre-rope", marks=pytest.mark.slow)]
)
def test_a_decode_forward_reading_codes_compiles_as_one_graph_with_eager_logits(
    models: dict[str, PreTrainedModel], name: str
) -> None:
    """The whole decode forward (every layer's ``update`` returning marked rows, and the attention from codes)
    traces with ``fullgraph=True``, and two compiled steps give the logits of two eager steps on a twin cache
    (``int4-block``: the second step's tokens leave the window, the first's do not), to float rounding: in a graph
    the products of a few rows are sums in another order (``few_rows_matmul``), and keys quantized before RoPE
    are rotated in float32."""
    model = models["llama"]
    ids = _tokens(1, 31, seed=12)
    step = _decode_step(model)
    compiled_cache, eager_cache = _prefilled_twins(model, name, ids[:, :29])
    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    try:
        with torch.inference_mode():
            for position in (29, 30):
                got = compiled(compiled_cache, ids[:, position : position + 1])
                want = step(eager_cache, ids[:, position : position + 1])
                torch.testing.assert_close(got, want, rtol=0, atol=1e-8, msg=f"position {position}")
    finally:
        torch.compiler.reset()


def test_a_decode_forward_compiles_through_functionalization_after_an_inference_mode_prefill(
    models: dict[str, PreTrainedModel],
) -> None:
    """What inductor compiles is the functionalized graph (``aot_eager`` stops there). Compiled steps concatenate
    the history (appending into a buffer the layer holds a view of cannot be functionalized once the length is
    dynamic, nor at all where the prefill ran under ``torch.inference_mode``); the logits are those of eager
    steps on a twin cache, and an eager step after them appends into a buffer again."""
    model = models["llama"]
    ids = _tokens(1, 33, seed=14)
    step = _decode_step(model)
    compiled_cache, eager_cache = _prefilled_twins(model, "int8", ids[:, :28])

    def buffers() -> list[torch.Tensor | None]:
        return [layer._key_storage.buffer for layer in compiled_cache.layers]

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    try:
        assert all(buffer is not None for buffer in buffers())
        with torch.no_grad():
            for position in (28, 29, 30, 31):
                token = ids[:, position : position + 1]
                got, expected = compiled(compiled_cache, token), step(eager_cache, token)
                assert _relative(got, expected) < 1e-12, position
            assert buffers() == [None] * len(compiled_cache.layers)
            token = ids[:, 32:33]
            assert torch.equal(step(compiled_cache, token), step(eager_cache, token))
        assert all(buffer is not None for buffer in buffers())
        assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 33
    finally:
        torch.compiler.reset()


@pytest.mark.parametrize("name", ["seed", "int4", "int4-pre-rope"])
def test_a_prefill_longer_than_the_codes_path_attends_over_decoded_states_exactly(
    models: dict[str, PreTrainedModel], name: str
) -> None:
    """Past MAX_QUERIES_FROM_CODES queries the rows are decoded once and sdpa runs: the logits of a cache that
    decodes, bit for bit; the next step reads codes again (float rounding apart)."""
    model = models["llama"]
    decoded, reading = _pair(model, SCHEMES[name])
    ids = _tokens(2, MAX_QUERIES_FROM_CODES + 8, seed=13)
    prompt = ids[:, : MAX_QUERIES_FROM_CODES + 1]
    with torch.inference_mode():
        expected = model(prompt, use_cache=True, **{CACHE_KEYWORD: decoded}).logits
        assert torch.equal(model(prompt, use_cache=True, **{CACHE_KEYWORD: reading}).logits, expected)
        step = ids[:, MAX_QUERIES_FROM_CODES + 1 : MAX_QUERIES_FROM_CODES + 2]
        expected = model(step, use_cache=True, **{CACHE_KEYWORD: decoded}).logits
        got = model(step, use_cache=True, **{CACHE_KEYWORD: reading}).logits
        assert not torch.equal(got, expected) and _relative(got, expected) < 1e-6
