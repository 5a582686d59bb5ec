"""Keys centred before RoPE but stored after it: ``rope_center``.

What is stored is ``k - R_t m``: the key after RoPE less its calibrated pre-RoPE mean turned to
the key's position. Checked: that residual against an independent float64 turn; a key constant
before RoPE comes back exactly at every position (all center) in fake and packed storage, on
full and sliding-window layers; packed equals fake bit for bit; the query-aware pieces take a
turned key's view (pair-mean scales, query-position weights); the turned center's scores equal
``q . R_t m``; the config's rules and round trips; a saved state reloads to the same logits.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import build_model
from conftest import random_tokens as _tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, KVQuantizer, QuantizedCalibratingCache, calibrate
from quantcache.analysis.state_report import config_text
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.ops.code_attention import turned_center_scores
from quantcache.ops.rope import BlockAngles, CenterPairs, RopeTable
from quantcache.ops.rounding import rope_averaged_moment
from quantcache.ops.stream_space import StreamSpace
from quantcache.scheme.presets import preset_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INT4 = {"dtype": "int4", "scope": "per_token", "dynamic": True, "symmetric": False, "center": True}


def _turned(rows: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(..., seq, head_dim)`` rows turned by RoPE at ``positions`` (float64, from the angles directly)."""
    half = inv_freq.numel()
    angle = positions.double()[:, None] * inv_freq.double()[None]
    cos, sin = angle.cos(), angle.sin()
    rows = rows.double()
    first, second = rows[..., :half], rows[..., half : 2 * half]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rows[..., 2 * half :]], dim=-1)


def _rope_center(name: str) -> KVQuantConfig:
    """Preset ``name`` with its keys centred before RoPE and stored after it."""
    return KVQuantConfig(**{**preset_settings(name), "pre_rope_keys": False, "rope_center": True})


# ---------------------------------------------------------------------------- the config
def test_rope_center_round_trips_and_is_named() -> None:
    config = KVQuantConfig(**INT4, rope_center=True, key={"query_aware": True, "rounding": "query_aware"})
    assert config.to_dict()["rope_center"] is True and "rope_center" not in KVQuantConfig().to_dict()
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert config.length_safe and config.export_problems()
    assert "keys after RoPE around a turned center" in config_text(config)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({**INT4, "rope_center": True, "pre_rope_keys": True}, "rope_center and pre_rope_keys .* choose one"),
        ({"rope_center": True}, "rope_center turns each key stream's calibrated center"),
        (
            {**INT4, "rope_center": True, "layers": [{"include": ["*0*"], "qconfig": {"center": False}}]},
            "every layers override",
        ),
        ({**INT4, "rope_center": "yes"}, "rope_center: expected true or false, got 'yes'"),
        ({**INT4, "key": {"query_aware": True, "rounding": "query_aware"}}, "set rope_center: true"),
    ],
    ids=["both", "static-keys", "override", "not-bool", "rounding-without"],
)
def test_rope_center_refuses_what_it_cannot_do(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVQuantConfig(**settings)


# ---------------------------------------------------------------------------- what is stored
def _frozen(model: PreTrainedModel, config: KVQuantConfig, storage: str = "fake") -> QuantizedCalibratingCache:
    quantizer = calibrate(model, _tokens(2, 24, seed=3), quant_config=config, progress=False)
    return quantizer.new_cache(storage=storage)


def test_what_is_quantized_is_the_key_less_its_turned_center() -> None:
    model = build_model("llama")
    cache = _frozen(model, KVQuantConfig(**INT4, rope_center=True))
    layer = cache.quantizers[0]
    assert layer.rope_center and layer.key_rope is not None and layer.key.center is not None
    keys = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(1))
    residual = layer.keys_to_quantize(keys, 37)
    turned = _turned(
        layer.key.center[None, :, None, :].expand(1, -1, 5, -1), layer.key_rope.inv_freq, torch.arange(37, 42)
    )
    torch.testing.assert_close(residual.double(), keys.double() - turned, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.keys_to_read(residual, 37, torch.float32), keys, rtol=0, atol=1e-5)
    assert layer.key.space.applied_center is None and layer.key.space.center_turns  # the layer turns it


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_a_key_constant_before_rope_comes_back_exactly_at_every_position(arch: str, storage: str) -> None:
    """Centred before RoPE, a constant key is all center, wherever it sits: a residual of zeros, stored exactly.
    Keys after RoPE without the turn are not (the control)."""
    model = build_model(arch)
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    offset = torch.randn(kv_heads, head_dim, generator=torch.Generator().manual_seed(0)) * 5 + 3
    cache = QuantizedCalibratingCache(model, KVQuantConfig(**INT4, rope_center=True), storage=storage)
    tables = [layer.key_rope for layer in cache.quantizers]
    assert all(table is not None for table in tables)

    def constant(index: int, start: int, length: int) -> torch.Tensor:
        table = tables[index]
        assert table is not None
        return table.rotate(offset[None, :, None, :].expand(1, -1, length, -1).contiguous(), start)

    values = torch.randn(1, kv_heads, 24, head_dim)
    for index in range(len(tables)):
        cache.update(constant(index, 0, 24), values, index)
    frozen = cache.freeze().empty_copy()
    start = 0
    for length in (7, 1, 1, 13, 1):  # prefill, steps, a chunk: past gemma3's sliding window of 8
        for index in range(len(tables)):
            returned, _ = frozen.update(
                constant(index, start, length), torch.randn(1, kv_heads, length, head_dim), index
            )
            held = returned.shape[2]
            torch.testing.assert_close(returned, constant(index, start + length - held, held), rtol=1e-4, atol=1e-4)
        start += length
    plain = QuantizedCalibratingCache(model, KVQuantConfig(**INT4), storage=storage)
    for index in range(len(tables)):
        plain.update(constant(index, 0, 24), values, index)
    returned, _ = plain.freeze().empty_copy().update(constant(0, 0, 7), values[:, :, :7], 0)
    assert (returned - constant(0, 0, 7)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
def test_packed_storage_returns_exactly_what_fake_storage_does(arch: str, name: str) -> None:
    model = build_model(arch)
    quantizer = calibrate(model, _tokens(2, 24, seed=3), quant_config=_rope_center(name), progress=False)
    fake, packed = quantizer.new_cache(), quantizer.new_cache(storage="packed")
    tokens = _tokens(2, 34, seed=5)
    with torch.inference_mode():
        for start, end in ((0, 12), (12, 13), (13, 14), (14, 34)):
            expected = model(tokens[:, start:end], use_cache=True, **{CACHE_KEYWORD: fake}).logits
            assert torch.equal(model(tokens[:, start:end], use_cache=True, **{CACHE_KEYWORD: packed}).logits, expected)


# ---------------------------------------------------------------------------- the query-aware pieces
def test_query_aware_channel_scales_are_one_per_rope_pair_so_they_commute_with_the_turn() -> None:
    """A turned residual is scaled after RoPE: the scale must not tell a pair's two channels apart."""
    model = build_model("llama")
    quantizer = calibrate(model, _tokens(2, 24, seed=3), quant_config=_rope_center("int4"), progress=False)
    layer = quantizer.quantizers[0]
    scale, table = layer.key.channel_scale, layer.key_rope
    assert scale is not None and table is not None
    pairs = table.inv_freq.numel()
    assert torch.equal(scale[:, :pairs], scale[:, pairs : 2 * pairs])
    residual = torch.randn(1, scale.shape[0], 6, scale.shape[1], generator=torch.Generator().manual_seed(4))
    scaled_then_turned = table.rotate(residual * scale[None, :, None], 11)
    torch.testing.assert_close(scaled_then_turned, table.rotate(residual, 11) * scale[None, :, None])


def test_turned_keys_weigh_query_turns_by_query_position() -> None:
    """``turned``: ``sum_t (t + 1) R_t Q R_t^T / sum_t (t + 1)``, against a sum of explicit turns (float64)."""
    generator = torch.Generator().manual_seed(2)
    diag, factor = torch.rand(1, 6, generator=generator), torch.randn(1, 6, 1, generator=generator)
    inv_freq = torch.tensor([1.0, 0.3])
    moment = torch.diag_embed(diag.double()) + factor.double() @ factor.double().transpose(-1, -2)
    horizon = 9
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for t in range(horizon):
        turn = _turned(torch.eye(6, dtype=torch.float64), inv_freq, torch.full((6,), t)).T  # columns turned
        expected += (t + 1) * turn @ moment[0] @ turn.T
    expected /= sum(t + 1 for t in range(horizon))
    got = rope_averaged_moment(diag, factor, inv_freq, horizon, turned=True)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    distance = rope_averaged_moment(diag, factor, inv_freq, horizon)[0]
    assert (got - distance).abs().max() > 1e-3


@settings(max_examples=30, deadline=None)
@given(
    pairs=st.integers(1, 8),
    extra=st.integers(0, 4),
    start=st.integers(0, 5000),
    rows=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_turned_center_scores_are_the_query_times_the_turned_center(
    pairs: int, extra: int, start: int, rows: int, seed: int
) -> None:
    head_dim = 2 * pairs + extra
    generator = torch.Generator().manual_seed(seed)
    inv_freq = torch.rand(pairs, generator=generator, dtype=torch.float64) + 1e-3
    center = torch.randn(3, head_dim, generator=generator, dtype=torch.float64)
    query = torch.randn(2, 3, 4, head_dim, generator=generator, dtype=torch.float64)
    positions = torch.arange(start, start + rows)
    size = 16  # positions per block
    first, last = start // size, -(-(start + rows) // size)
    blocks = torch.arange(first, last, dtype=torch.float64)[:, None] * size * inv_freq[None]
    offsets = torch.arange(size, dtype=torch.float64)[:, None] * inv_freq[None]
    angles = BlockAngles.of(blocks.cos(), blocks.sin(), offsets.cos(), offsets.sin(), start - first * size, rows)
    got = turned_center_scores(query, CenterPairs.of(center, pairs), angles)
    turned = _turned(center[:, None].expand(-1, rows, -1), inv_freq, positions)  # (3, rows, head_dim)
    expected = query @ turned.transpose(-1, -2)[None]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * math.sqrt(head_dim))


def test_a_streams_center_pairs_follow_its_center_and_its_table_follows_the_blocks() -> None:
    """The pair arrangement is made once per device and remade when the center changes; a table's block angles
    are views of the stacked table grown on demand, each block's turn that of its own start."""
    space = StreamSpace(8)
    center = torch.arange(16.0).view(2, 8)
    space.set(center)
    first = space.center_pairs(3, torch.device("cpu"))
    assert space.center_pairs(3, torch.device("cpu")) is first
    assert first.halves.shape == (2, 2, 2, 3)
    along, across = [[8.0, 9.0, 10.0], [11.0, 12.0, 13.0]], [[-11.0, -12.0, -13.0], [8.0, 9.0, 10.0]]
    assert first.halves[1].tolist() == [along, across]
    assert first.rest is not None and first.rest.tolist() == [[6.0, 7.0], [14.0, 15.0]]
    space.set(-center)
    assert torch.equal(space.center_pairs(3, torch.device("cpu")).halves, -first.halves)
    inv_freq = torch.tensor([1.0, 0.1])
    table = RopeTable(inv_freq)
    size = RopeTable.BLOCK
    cpu = torch.device("cpu")
    short, long = table.block_angles(5, 70, cpu), table.block_angles(3 * size + 2, 40 * size, cpu)
    assert (short.skip, short.positions, long.skip, long.positions) == (5, 65, 2, 37 * size - 2)
    assert short.block_turns.shape == (2, 2, 2, 2) and long.block_turns.shape == (37, 2, 2, 2)
    start = 3 * size * inv_freq.double()
    expected = torch.stack((start.cos(), start.sin(), -start.sin(), start.cos())).view(2, 2, 2).float()
    torch.testing.assert_close(long.block_turns[0], expected)


# ---------------------------------------------------------------------------- a saved state
def test_a_saved_rope_center_state_reloads_to_the_same_logits(tmp_path: Any) -> None:
    model = build_model("qwen3")
    quantizer = calibrate(model, _tokens(2, 24, seed=3), quant_config=_rope_center("int4"), progress=False)
    path = quantizer.save(tmp_path / "state.safetensors")
    loaded = KVQuantizer.load(path, model)
    assert loaded.quant_config.rope_center and loaded.quantizers[0].rope_center
    tokens = _tokens(1, 20, seed=8)
    with torch.inference_mode():
        logits = [
            model(tokens, use_cache=True, **{CACHE_KEYWORD: q.new_cache(storage="packed")}).logits
            for q in (quantizer, loaded)
        ]
    assert torch.equal(*logits)
