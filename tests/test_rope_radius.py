"""Key ranges from RoPE pairs' radii (``rope_radius``, the ``c8`` preset): static INT8 that holds at any length.

RoPE turns each key channel pair ``(i, i + rotary/2)`` by an angle that grows with the position and keeps
its radius, so ``+-max radius`` is a range no position can leave, while a plain per-channel ``[min, max]``
holds only for the angles the calibration positions reached. The scheme keeps the seed's format (the state's
tensors, the engines' checkpoints); these tests pin the ranges to an independent computation, show that
rotated keys never clip where plain ranges do, and pin every refusal and the calibration length warning.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, KVQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.length_check import ContextLengthWarning, length_warning
from quantcache.export import export_checkpoint
from quantcache.export.api import LENGTH_UNSAFE_NOTE
from quantcache.ops.observers import MinMaxObserver, RopeRadiusObserver, make_observer
from quantcache.ops.rope import rope_pairs
from quantcache.scheme.args import QuantArgs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KV_HEADS, HEAD_DIM = 2, 16  # conftest.py's tiny models
C8_KEYS = QuantArgs(rope_radius=True)


def _reference_ranges(states: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (kv_head, channel) ranges computed element by element in float64 with ``math.hypot``."""
    _, heads, _, dim = states.shape
    low = torch.empty(heads, dim, dtype=torch.float64)
    high = torch.empty(heads, dim, dtype=torch.float64)
    x = states.double()
    for head in range(heads):
        for channel in range(dim):
            if channel < 2 * pairs:
                first = channel % pairs
                radii = [
                    math.hypot(a, b)
                    for a, b in zip(
                        x[:, head, :, first].flatten().tolist(),
                        x[:, head, :, first + pairs].flatten().tolist(),
                        strict=True,
                    )
                ]
                low[head, channel], high[head, channel] = -max(radii), max(radii)
            else:
                values = x[:, head, :, channel].flatten()
                low[head, channel], high[head, channel] = values.min(), values.max()
    return low, high


def _rope(states: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``states`` (``(batch, heads, seq, dim)``, float64) turned by RoPE at ``positions`` (rotate-half layout)."""
    pairs = inv_freq.numel()
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # (seq, pairs)
    cos, sin = angles.cos(), angles.sin()
    first, second, rest = states[..., :pairs], states[..., pairs : 2 * pairs], states[..., 2 * pairs :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def _observer(pairs: int) -> RopeRadiusObserver:
    observer = make_observer(C8_KEYS)
    assert isinstance(observer, RopeRadiusObserver)
    observer.set_rope_pairs(pairs)
    return observer


# ================================================================================ the ranges
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), pairs=st.sampled_from([8, 4, 1]), seq=st.integers(1, 6))
def test_each_pair_takes_plus_minus_its_largest_radius_and_other_channels_their_min_max(
    seed: int, pairs: int, seq: int
) -> None:
    states = torch.randn(2, KV_HEADS, seq, HEAD_DIM, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5
    measured = _observer(pairs).measure(states)
    low, high = _reference_ranges(states, pairs)
    torch.testing.assert_close(measured["min"].double(), low, rtol=1e-6, atol=0)
    torch.testing.assert_close(measured["max"].double(), high, rtol=1e-6, atol=0)


def test_padding_is_left_out_and_an_all_padding_batch_measures_nothing() -> None:
    states = torch.randn(2, KV_HEADS, 5, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])
    padded = states.clone()
    padded[~mask[:, None, :, None].expand_as(states)] = 1e4  # pads far out: they must not widen a range
    measured = _observer(8).measure(padded, mask)
    kept = torch.cat([states[0:1, :, :3], states[1:2, :, 1:]], dim=2)
    low, high = _reference_ranges(kept, 8)
    torch.testing.assert_close(measured["min"].double(), low, rtol=1e-6, atol=0)
    torch.testing.assert_close(measured["max"].double(), high, rtol=1e-6, atol=0)
    assert _observer(8).measure(padded, torch.zeros(2, 5, dtype=torch.bool)) == {}


def test_no_rope_position_leaves_the_ranges_while_plain_min_max_is_left() -> None:
    """Ranges calibrated on positions 0..63 hold at positions up to 100,000; per-channel min/max do not."""
    generator = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    raw = torch.randn(1, KV_HEADS, 64, HEAD_DIM, generator=generator, dtype=torch.float64) + 2.0  # offset channels
    calibration = _rope(raw, torch.arange(64), inv_freq).float()
    late = _rope(raw, torch.arange(64) * 1500 + 5000, inv_freq).float()  # the same keys much later
    radius = _observer(HEAD_DIM // 2).measure(calibration)
    plain = MinMaxObserver(QuantArgs()).measure(calibration)
    tolerance = 1e-5 * radius["max"].abs().amax()
    assert bool((late >= radius["min"][None, :, None, :] - tolerance).all())
    assert bool((late <= radius["max"][None, :, None, :] + tolerance).all())
    # The same keys at other positions give the same ranges (the radius does not turn) ...
    torch.testing.assert_close(_observer(HEAD_DIM // 2).measure(late)["max"], radius["max"], rtol=1e-5, atol=1e-6)
    # ... which per-channel min/max, the seed's, are not: late keys leave its ranges by a wide margin.
    outside = (late > plain["max"][None, :, None, :]) | (late < plain["min"][None, :, None, :])
    assert outside.float().mean() > 0.2


def test_the_observer_needs_its_pairs_and_they_must_fit() -> None:
    observer = make_observer(C8_KEYS)
    with pytest.raises(RuntimeError, match="RoPE pairs"):
        observer.measure(torch.zeros(1, KV_HEADS, 2, HEAD_DIM))
    with pytest.raises(ValueError, match="positive integer"):
        _observer(0)
    with pytest.raises(ValueError, match="do not fit head_dim"):
        _observer(9).measure(torch.zeros(1, KV_HEADS, 2, HEAD_DIM))


# ================================================================================ the setting
@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"value": {"rope_radius": True}}, "RoPE turns keys, not values"),
        ({"rope_radius": True}, "RoPE turns keys, not values"),
        ({"key": {"rope_radius": True}, "pre_rope_keys": True}, "drop one of the two"),
        ({"key": {"rope_radius": True, "symmetric": False}}, "set symmetric: true"),
        ({"key": {"rope_radius": True, "method": "percentile"}}, "set method: minmax"),
        (
            {"key": {"rope_radius": True, "dynamic": True, "scope": "per_token"}},
            "dynamic \\(set dynamic: false\\)",
        ),
        ({"key": {"rope_radius": True, "rotation": "hadamard"}}, "set rotation: none"),
    ],
)
def test_rope_radius_refuses_what_it_cannot_mean(settings_: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVQuantConfig(**settings_)  # type: ignore[arg-type]


def test_c8_is_the_seed_format_with_rope_radius_keys_and_survives_yaml() -> None:
    c8 = KVQuantConfig.preset("c8")
    seed = KVQuantConfig.preset("seed")
    assert c8.value == seed.value
    assert c8.key == QuantArgs(rope_radius=True)
    qconfig = c8.to_dict()["qconfig"]
    assert qconfig["rope_radius"] is True and qconfig["value"]["rope_radius"] is False
    assert KVQuantConfig.from_dict(c8.to_dict()) == c8
    assert c8.export_problems() == []


@pytest.mark.parametrize(
    ("config", "safe"),
    [
        (KVQuantConfig.preset("seed"), False),
        (KVQuantConfig.preset("c8"), True),
        (KVQuantConfig.preset("int8"), True),
        (KVQuantConfig.preset("fp8"), True),
        (KVQuantConfig.preset("int4"), True),
        (KVQuantConfig(pre_rope_keys=True, symmetric=False), True),
        # one layer's plain static keys make the whole cache unsafe
        (
            KVQuantConfig(
                key={"rope_radius": True},
                layers=[{"include": ["model.layers.1.self_attn"], "qconfig": {"key": {"rope_radius": False}}}],
            ),
            False,
        ),
    ],
)
def test_length_safe_says_whether_every_key_range_holds_at_any_length(config: KVQuantConfig, safe: bool) -> None:
    assert config.length_safe is safe


def test_rope_pairs_reads_the_rotary_dimension_whatever_the_frequencies() -> None:
    full = SimpleNamespace(model_type="llama", head_dim=16, rope_theta=1e4, rope_scaling=None)
    assert rope_pairs(full) == 8
    partial = SimpleNamespace(model_type="phi", head_dim=16, rope_theta=1e4, partial_rotary_factor=0.5)
    assert rope_pairs(partial) == 4
    longrope = SimpleNamespace(model_type="x", head_dim=16, rope_parameters={"rope_type": "longrope", "rope_theta": 1})
    assert rope_pairs(longrope) == 8  # frequencies that change with the length keep every radius too
    with pytest.raises(ConfigError, match=r"interleaved channel pairs.*without rope_radius"):
        rope_pairs(SimpleNamespace(model_type="gptj", head_dim=16, rope_theta=1e4))
    with pytest.raises(ConfigError, match=r"declares no rotary position embedding.*without rope_radius"):
        rope_pairs(SimpleNamespace(model_type="gpt2", head_dim=16))


def test_a_model_without_rope_refuses_c8_when_the_quantizer_is_made() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(ConfigError, match="rope_radius: the gpt2 config declares no rotary position embedding"):
        KVQuantizer(model, KVQuantConfig.preset("c8"))


# ================================================================================ on a model
def _post_rope_keys(model: PreTrainedModel, windows: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's keys as the model hands them to a cache, ``(rows, kv_heads, seq, head_dim)``."""
    keys = []
    with torch.inference_mode():
        for row in windows:
            cache = DynamicCache(config=model.config)
            model(row[None], use_cache=True, **{CACHE_KEYWORD: cache})
            keys.append([layer.keys for layer in cache.layers])
    return [torch.cat([row[index] for row in keys]) for index in range(len(keys[0]))]


def test_c8_calibration_gives_each_layer_the_radius_ranges_of_its_keys(llama: PreTrainedModel) -> None:
    windows = random_tokens(3, 12, seed=5)
    quantizer = calibrate(llama, windows, quant_config=KVQuantConfig.preset("c8"), progress=False)
    seed = calibrate(llama, windows, quant_config=KVQuantConfig.preset("seed"), progress=False)
    state, seed_state = quantizer.state_dict(), seed.state_dict()
    assert {name: (t.dtype, t.shape) for name, t in state.items()} == {
        name: (t.dtype, t.shape) for name, t in seed_state.items()
    }  # the seed's format, tensor for tensor
    for index, keys in enumerate(_post_rope_keys(llama, windows)):
        low, high = _reference_ranges(keys, HEAD_DIM // 2)
        prefix = f"layers.{index}"
        torch.testing.assert_close(state[f"{prefix}.key.max"].double(), high, rtol=1e-5, atol=0)
        torch.testing.assert_close(state[f"{prefix}.key.min"].double(), low, rtol=1e-5, atol=0)
        torch.testing.assert_close(state[f"{prefix}.value.max"], seed_state[f"{prefix}.value.max"], rtol=0, atol=0)
        # a pair's channels share one range, wider than what either channel reached alone
        assert torch.equal(high[:, :8], high[:, 8:])
        assert bool((state[f"{prefix}.key.max"] >= seed_state[f"{prefix}.key.max"]).all())


def _clipped_keys_at(model: PreTrainedModel, quantizer: KVQuantizer, window: torch.Tensor, start: int) -> float:
    """Share of key elements that clip when ``window`` (``(1, L)``) is run at positions ``start ..``."""
    cache = quantizer.new_cache()
    clipped: list[torch.Tensor] = []
    cache.on_quantize = lambda event: clipped.append(event.clipped) if event.stream == "key" else None
    positions = torch.arange(start, start + window.shape[1])[None]
    with torch.inference_mode():
        model(window, position_ids=positions, use_cache=True, **{CACHE_KEYWORD: cache})
    return float(torch.cat([mask.flatten() for mask in clipped]).float().mean())


def test_the_calibration_text_moved_to_later_positions_clips_under_the_seed_and_never_under_c8(
    llama: PreTrainedModel,
) -> None:
    """The same tokens at positions 150.. give the same keys before RoPE (attention sees relative positions
    only), turned by other angles: ranges that hold at any position clip none of them."""
    windows = random_tokens(4, 24, seed=1)
    for name, clips_late in (("seed", True), ("c8", False)):
        quantizer = calibrate(llama, windows, quant_config=KVQuantConfig.preset(name), progress=False)
        assert _clipped_keys_at(llama, quantizer, windows[:1], 0) == 0.0  # where it was calibrated
        late = max(_clipped_keys_at(llama, quantizer, windows[row : row + 1], 150) for row in range(4))
        assert (late > 0.005) if clips_late else (late == 0.0), (name, late)


def test_a_c8_state_saves_loads_and_exports_in_the_seed_s_format(llama: PreTrainedModel, tmp_path: Path) -> None:
    windows = random_tokens(2, 10, seed=3)
    quantizer = calibrate(llama, windows, quant_config=KVQuantConfig.preset("c8"), progress=False)
    seed = calibrate(llama, windows, quant_config=KVQuantConfig.preset("seed"), progress=False)
    loaded = KVQuantizer.load(quantizer.save(tmp_path / "c8.safetensors"), llama)
    assert loaded.quant_config == quantizer.quant_config
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    seed.save(tmp_path / "seed.safetensors")
    for fmt in ("ascend", "vllm"):
        for which in ("c8", "seed"):
            source, target = tmp_path / f"{which}.safetensors", tmp_path / f"{fmt}-{which}"
            result = export_checkpoint(source, target, format=fmt, scales_only=True)
            # the seed's export recommends c8; c8's says nothing of lengths
            assert (LENGTH_UNSAFE_NOTE in result.warnings) is (which == "seed")
        shards = {which: sorted((tmp_path / f"{fmt}-{which}").glob("*.safetensors")) for which in ("c8", "seed")}
        assert [path.name for path in shards["c8"]] == [path.name for path in shards["seed"]]
        for c8_shard, seed_shard in zip(shards["c8"], shards["seed"], strict=True):
            c8_tensors, seed_tensors = load_file(c8_shard), load_file(seed_shard)
            assert {n: (t.dtype, t.shape) for n, t in c8_tensors.items()} == {
                n: (t.dtype, t.shape) for n, t in seed_tensors.items()
            }


# ================================================================================ the length warning
class _Config(SimpleNamespace):
    def get_text_config(self, decoder: bool = False) -> _Config:
        return self


@pytest.mark.parametrize(
    ("preset", "windows", "max_positions", "context", "warns"),
    [
        ("seed", 512, 8192, None, True),
        ("seed", 2048, 8192, None, True),  # exactly a quarter
        ("seed", 2049, 8192, None, False),
        ("seed", 512, 8192, 1024, False),  # the user serves 1024 tokens
        ("seed", 512, 1024, 4096, True),  # ... or 4096, whatever the model could take
        ("seed", 512, None, None, False),  # nothing known about the serving length
        ("c8", 512, 131072, None, False),
        ("int4", 512, 131072, None, False),
    ],
)
def test_length_warning_names_the_fix_when_windows_are_a_quarter_of_the_serving_length_or_less(
    preset: str, windows: int, max_positions: int | None, context: int | None, warns: bool
) -> None:
    message = length_warning(
        KVQuantConfig.preset(preset), _Config(max_position_embeddings=max_positions), windows, context
    )
    if not warns:
        assert message is None
        return
    assert message is not None
    serving = context if context is not None else max_positions
    assert f"calibrated on {windows}-token windows" in message and f"is {serving} tokens" in message
    assert "--preset c8" in message


def test_calibrate_warns_once_for_a_length_unsafe_scheme(llama: PreTrainedModel) -> None:
    """The tiny model takes 256 positions: 16-token windows are far from them, 64-token ones are not."""
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        calibrate(llama, random_tokens(2, 16, seed=0), quant_config=KVQuantConfig.preset("seed"), progress=False)
        calibrate(llama, random_tokens(2, 16, seed=0), quant_config=KVQuantConfig.preset("c8"), progress=False)
        calibrate(llama, random_tokens(1, 65, seed=0), quant_config=KVQuantConfig.preset("seed"), progress=False)
    lengths = [w for w in heard if issubclass(w.category, ContextLengthWarning)]
    assert len(lengths) == 1
    assert "16-token windows" in str(lengths[0].message) and "max_position_embeddings is 256" in str(lengths[0].message)

