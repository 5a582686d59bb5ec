"""Keys quantized before RoPE: ``pre_rope_keys`` turns keys back by their positions.

The frequencies must be the model's own (checked against the modules Transformers
builds, and against a layer's actual pre-RoPE projection), the positions must be each
token's own in full and sliding-window layers, fake and packed storage alike, and a
key that is constant before RoPE (the offset centring is meant to remove) must come
back exactly after centring there.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import (
    GENERATION_MODES,
    assert_packed_generates_like_fake,
    build_model,
    gemma3_config,
    llama_config,
    qwen3_config,
)
from conftest import random_tokens as _tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter
from transformers import DynamicCache, GPT2Config, LlamaConfig, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.analysis.state_report import config_text
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.queries import observe_queries
from quantcache.ops.rope import RopeTable, rope_frequencies

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INT4 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "symmetric": False, "center": True}


def _model_inv_freq(model: PreTrainedModel, layer_type: str | None) -> torch.Tensor:
    """The inverse frequencies the model's own rotary module holds for ``layer_type``."""
    inner = model.model
    if layer_type == "sliding_attention" and hasattr(inner, "rotary_emb_local"):  # Gemma 3, transformers 4
        return inner.rotary_emb_local.inv_freq  # type: ignore[no-any-return]
    rotary = inner.rotary_emb
    per_type = getattr(rotary, f"{layer_type}_inv_freq", None)
    return per_type if per_type is not None else rotary.inv_freq  # type: ignore[no-any-return]


SCALINGS: list[dict[str, Any] | None] = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "default" if s is None else s["rope_type"])
def test_the_frequencies_are_the_models_own_for_every_fixed_rope_type(scaling: dict[str, Any] | None) -> None:
    overrides: dict[str, Any] = {"rope_theta": 5000.0}
    if scaling is not None:
        overrides["rope_scaling"] = {**scaling, "rope_theta": 5000.0}
    model = build_model("llama", **overrides)
    ours = rope_frequencies(model.config)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, _model_inv_freq(model, None).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_the_frequencies_follow_each_layer_type(arch: str, make_model: Any) -> None:
    model = make_model(arch)
    for layer_type in sorted(set(getattr(model.config, "layer_types", None) or [None])):
        torch.testing.assert_close(
            rope_frequencies(model.config, layer_type), _model_inv_freq(model, layer_type).float(), rtol=1e-6, atol=0
        )
    if arch == "gemma3":  # sliding and full attention turn at different rates
        assert not torch.equal(rope_frequencies(model.config, "sliding_attention"), rope_frequencies(model.config))


def test_partial_rope_turns_only_its_channels() -> None:
    config = LlamaConfig(**{**llama_config().to_dict(), "partial_rotary_factor": 0.5})
    inv_freq = rope_frequencies(config)
    assert inv_freq.numel() * 2 == config.head_dim // 2
    table = RopeTable(inv_freq)
    keys = torch.randn(1, 2, 5, config.head_dim)
    turned = table.rotate(keys, 3)
    assert torch.equal(turned[..., inv_freq.numel() * 2 :], keys[..., inv_freq.numel() * 2 :])
    assert not torch.allclose(turned, keys)


def test_undoing_gives_the_layers_own_projection_before_rope(llama: PreTrainedModel) -> None:
    """The keys a layer hands the cache, turned back, are its ``k_proj`` output: the positions are right."""
    tokens = _tokens(2, 9, seed=3)
    cache = DynamicCache()
    with torch.no_grad():
        llama(tokens[:, :4], use_cache=True, **{CACHE_KEYWORD: cache})
        llama(tokens[:, 4:], use_cache=True, **{CACHE_KEYWORD: cache})
        attention = llama.model.layers[0].self_attn
        hidden = llama.model.layers[0].input_layernorm(llama.model.embed_tokens(tokens))
        projected = attention.k_proj(hidden).view(2, 9, -1, attention.head_dim).transpose(1, 2)
    table = RopeTable(rope_frequencies(llama.config))
    torch.testing.assert_close(table.rotate(cache.layers[0].keys, 0, undo=True), projected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, 5000),
    seq=st.integers(1, 9),
    half=st.sampled_from([1, 4, 16]),
    extra=st.sampled_from([0, 6]),
    theta=st.sampled_from([10.0, 1e4, 1e6]),
)
def test_rotating_back_inverts_rotating_and_keeps_each_pairs_norm(
    start: int, seq: int, half: int, extra: int, theta: float
) -> None:
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    table = RopeTable(inv_freq)
    keys = torch.randn(2, 3, seq, 2 * half + extra, generator=torch.Generator().manual_seed(start))
    turned = table.rotate(keys, start)
    pair_norm = lambda k: k[..., :half] ** 2 + k[..., half : 2 * half] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(turned), pair_norm(keys), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(table.rotate(turned, start, undo=True), keys, rtol=1e-4, atol=1e-4)
    # A table grown by a later, longer call gives the same angles as a fresh one.
    assert torch.equal(RopeTable(inv_freq).rotate(keys, start), turned)


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 100_000), length=st.integers(1, 300))
def test_the_angles_are_position_times_frequency_for_any_range(start: int, length: int) -> None:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(32, dtype=torch.float64) / 32)
    table = RopeTable(inv_freq.float())
    cos, sin = table._angles(start, start + length, torch.device("cpu"))
    angles = torch.arange(start, start + length, dtype=torch.float64)[:, None] * inv_freq.float().double()[None]
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2e-6)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2e-6)
    # What it keeps grows with the number of blocks, not of positions.
    assert table._block[0].shape[0] <= max(16, 2 * (-(-(start + length) // RopeTable.BLOCK)))


def test_compiled_turns_need_no_new_graph_as_the_context_outgrows_the_block_table() -> None:
    """Compiled, a turn and the block angles at positions far past the table (16 blocks) reuse the first graph
    with dynamic positions, and give the eager table's angles to float rounding."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(8, dtype=torch.float32) / 8)
    eager, compiled_table = RopeTable(inv_freq), RopeTable(inv_freq)
    counter = CompileCounter()

    def turned(keys: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = compiled_table.block_angles(start, start + keys.shape[-2], keys.device)
        return compiled_table.rotate(keys, start), angles.block_turns

    compiled = torch.compile(turned, backend=counter, dynamic=True)
    keys = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(0))
    torch.compiler.reset()
    try:
        for start in (5, 700, 3000, 40_000):
            rotated, turns = compiled(keys, start)
            expected = eager.block_angles(start, start + 3, keys.device).block_turns
            torch.testing.assert_close(rotated, eager.rotate(keys, start), rtol=0, atol=1e-6)
            torch.testing.assert_close(turns, expected, rtol=0, atol=1e-7)
    finally:
        torch.compiler.reset()
    assert counter.frame_count == 1


def test_keys_that_carry_gradients_turn_the_same(llama: PreTrainedModel) -> None:
    """A model run without ``torch.no_grad()`` hands the cache keys that require grad."""
    table = RopeTable(rope_frequencies(llama.config))
    keys = torch.randn(1, 2, 5, 16, requires_grad=True)
    turned = table.rotate(keys, 7, undo=True)
    assert turned.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(turned, table.rotate(keys, 7, undo=True))
    cache = QuantizedCalibratingCache(llama, KVQuantConfig.preset("int4"))
    outputs = llama(_tokens(1, 6, seed=9), output_hidden_states=True, **{CACHE_KEYWORD: cache})  # gradients on
    observe_queries(cache, llama, outputs.hidden_states)  # its query-aware keys' queries carry gradients too
    llama(_tokens(1, 6, seed=9), **{CACHE_KEYWORD: cache.freeze().empty_copy()})


def test_rotation_keeps_the_states_dtype_and_refuses_too_few_channels() -> None:
    table = RopeTable(torch.tensor([1.0, 0.1]))
    keys = torch.randn(1, 1, 3, 4, dtype=torch.bfloat16)
    assert table.rotate(keys, 0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head_dim 2, fewer than the 4 rotary channels"):
        table.rotate(torch.randn(1, 1, 3, 2), 0)
    with pytest.raises(ValueError, match="non-empty vector"):
        RopeTable(torch.tensor([]))


def test_pre_rope_keys_round_trips_through_yaml_and_is_named() -> None:
    config = KVQuantConfig(**INT4, pre_rope_keys=True)
    assert config.to_dict()["pre_rope_keys"] is True and "pre_rope_keys" not in KVQuantConfig().to_dict()
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert "keys before RoPE" in config_text(config) and "RoPE" not in config_text(KVQuantConfig())
    with pytest.raises(ConfigError, match="pre_rope_keys: expected true or false, got 'yes'"):
        KVQuantConfig(pre_rope_keys="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GPT2Config(n_layer=1, n_head=2, n_embd=16), "gpt2 config declares no rotary position embedding"),
        (
            LlamaConfig(**{**llama_config().to_dict(), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
            "RoPE type 'dynamic' is not supported",
        ),
    ],
    ids=["no-rope", "dynamic-rope"],
)
def test_a_model_whose_keys_cannot_be_turned_back_is_a_config_error(config: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message + ".*set pre_rope_keys: false"):
        QuantizedCalibratingCache(config, KVQuantConfig(**INT4, pre_rope_keys=True))
    QuantizedCalibratingCache(config, KVQuantConfig(**INT4))  # without it, the same model is fine


def _constant_before_rope(table: RopeTable, offset: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Keys ``(1, kv_heads, length, head_dim)`` equal to ``offset`` before RoPE, at positions ``start..``."""
    return table.rotate(offset[None, :, None, :].expand(1, -1, length, -1).contiguous(), start)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_a_key_constant_before_rope_comes_back_exactly_at_every_position(
    arch: str, storage: str, make_model: Any
) -> None:
    """Centred before RoPE, a constant key is all center: exact, however many tokens and whatever the window."""
    model = make_model(arch)
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    offset = torch.randn(kv_heads, head_dim, generator=torch.Generator().manual_seed(0)) * 5 + 3
    cache = QuantizedCalibratingCache(model, KVQuantConfig(**INT4, pre_rope_keys=True), storage=storage)
    last = len(cache.quantizers) - 1  # gemma3's layer 0 slides; its last full-attention layer is checked too
    checked = sorted({0, last})
    tables = {index: cache.quantizers[index].key_rope for index in checked}
    values = torch.randn(1, kv_heads, 24, head_dim)
    for index in range(len(cache.quantizers)):
        table = cache.quantizers[index].key_rope
        assert table is not None
        cache.update(_constant_before_rope(table, offset, 0, 24), values, index)
    frozen = cache.freeze().empty_copy()
    start = 0
    for length in (7, 1, 1, 13, 1):  # prefill, decode steps, a chunk: past gemma3's sliding window of 8
        for index in range(len(frozen.quantizers)):
            table = tables.get(index) or frozen.quantizers[index].key_rope
            assert table is not None
            keys = _constant_before_rope(table, offset, start, length)
            returned, _ = frozen.update(keys, torch.randn(1, kv_heads, length, head_dim), index)
            if index in checked:
                held = returned.shape[2]
                expected = _constant_before_rope(table, offset, start + length - held, held)
                torch.testing.assert_close(returned, expected, rtol=1e-4, atol=1e-4)
        start += length
    only_first = {"include": ["model.layers.0.self_attn"]}
    without = QuantizedCalibratingCache(model, KVQuantConfig(**INT4, **only_first), storage=storage)
    table = tables[0]
    assert table is not None
    without.update(_constant_before_rope(table, offset, 0, 24), values, 0)
    without.freeze()
    returned, _ = without.empty_copy().update(_constant_before_rope(table, offset, 0, 7), values[:, :, :7], 0)
    assert (returned - _constant_before_rope(table, offset, 0, 7)).abs().max() > 1e-2  # after RoPE it is not


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_packed_storage_returns_what_fake_storage_does(arch: str, make_model: Any) -> None:
    model = make_model(arch)
    calibration = _tokens(2, 16, seed=4)
    tokens = _tokens(2, 30, seed=5)
    outputs = {}
    for storage in ("fake", "packed"):
        cache = QuantizedCalibratingCache(model, KVQuantConfig.preset("int4"), storage=storage)
        frozen = calibrate(model, calibration, cache=cache, progress=False).new_cache().empty_copy()
        logits = []
        with torch.no_grad():
            for chunk in (tokens[:, :12], tokens[:, 12:13], tokens[:, 13:14], tokens[:, 14:]):
                logits.append(model(chunk, use_cache=True, **{CACHE_KEYWORD: frozen}).logits)
        outputs[storage] = torch.cat(logits, dim=1)
    torch.testing.assert_close(outputs["packed"], outputs["fake"], rtol=1e-4, atol=1e-4)


def test_pre_rope_keys_lower_the_key_error_of_a_real_layer(llama: PreTrainedModel) -> None:
    """On a model's own keys, quantizing before RoPE is no worse than after (it is why the presets do it)."""
    calibration, tokens = _tokens(4, 32, seed=6), _tokens(2, 32, seed=7)
    errors = {}
    for pre_rope in (False, True):
        config = KVQuantConfig(**{**INT4, "dtype": "int2"}, pre_rope_keys=pre_rope)
        cache = calibrate(
            llama, calibration, cache=QuantizedCalibratingCache(llama, config), progress=False
        ).new_cache()
        reference, frozen = DynamicCache(), cache.empty_copy()
        with torch.no_grad():
            llama(tokens, use_cache=True, **{CACHE_KEYWORD: reference})
            llama(tokens, use_cache=True, **{CACHE_KEYWORD: frozen})
        errors[pre_rope] = sum(
            float((frozen.layers[i].keys - reference.layers[i].keys).pow(2).mean()) for i in range(len(frozen.layers))
        )
    assert errors[True] < errors[False]


def test_a_state_quantized_before_rope_is_not_exported(llama: PreTrainedModel, tmp_path: Any) -> None:
    """Engines quantize keys after RoPE: static ranges of keys before it would serve something else."""
    from quantcache.export import export_checkpoint

    cache = QuantizedCalibratingCache(llama, KVQuantConfig(pre_rope_keys=True))
    with torch.no_grad():
        llama(_tokens(1, 12, seed=8), **{CACHE_KEYWORD: cache})
    cache.freeze()
    with pytest.raises(QuantStateError, match=r"quantizes keys before RoPE.*calibrate without pre_rope_keys"):
        export_checkpoint(cache, tmp_path / "out", format="vllm", scales_only=True)
    assert not (tmp_path / "out").exists()


def test_qwen3_config_helper_is_rope_default() -> None:
    assert rope_frequencies(qwen3_config()).numel() * 2 == qwen3_config().head_dim
    assert rope_frequencies(gemma3_config(), "full_attention").numel() * 2 == gemma3_config().head_dim


@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_storage_generates_exactly_what_fake_storage_generates(
    request: pytest.FixtureRequest, arch: str, mode: dict[str, Any]
) -> None:
    """Beam reordering and assisted decoding's crops move tokens; their positions must follow, bit for bit."""
    model = request.getfixturevalue(arch)
    config = KVQuantConfig.preset("int4")
    assert_packed_generates_like_fake(model, config, _tokens(2, 16, seed=10), _tokens(1, 6, seed=11), mode)
