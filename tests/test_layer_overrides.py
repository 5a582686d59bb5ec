"""Per-layer overrides (``KVQuantConfig.layers``): mixed precision by attention-module pattern.

An override names patterns and the arguments it changes; what it does not name keeps the
config's own stream arguments. A module takes the first override that matches it; exclude
still wins. The overrides travel through YAML, the state file and its validator, reach
each layer's quantizer, and count in the effective bits.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.length_check import ContextLengthWarning
from quantcache.ops.bits import stream_bits
from quantcache.scheme.args import LayerOverride, QuantArgs, QuantDtype, QuantScope
from quantcache.state.file import read_state_file, validate_state

LAYER0, LAYER1 = "model.layers.0.self_attn", "model.layers.1.self_attn"

MIXED_YAML = """
- type: dynamic_cache
  qconfig: {dtype: int4, scope: per_token, dynamic: true, symmetric: false}
  include: ["*"]
  layers:
    - include: ["model.layers.0.self_attn"]
      qconfig:
        dtype: int8
        scope: per_channel
        dynamic: false
        symmetric: true
        value: {dtype: int4, scope: per_head, symmetric: false}
    - include: ["model.layers.{0,1}.self_attn"]
      qconfig: {dtype: int2}
"""


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# ================================================================================ config
def test_an_override_changes_only_what_it_names_and_the_first_match_wins() -> None:
    config = KVQuantConfig.from_yaml(MIXED_YAML)
    top = QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False)
    assert config.stream_args("key") == config.stream_args("value") == top
    # layer 0: the first override (flat keys for both streams, the value's own mapping on top)
    assert config.stream_args("key", LAYER0) == QuantArgs(dtype="int8", scope="per_channel")
    assert config.stream_args("value", LAYER0) == QuantArgs(dtype="int4", scope="per_head", symmetric=False)
    # layer 1: the second override; everything it does not name comes from the config's own streams
    int2 = QuantArgs(dtype="int2", scope="per_token", dynamic=True, symmetric=False)
    assert config.stream_args("key", LAYER1) == config.stream_args("value", LAYER1) == int2
    assert config.stream_args("key", "model.layers.2.self_attn") == top


def test_overrides_round_trip_through_dict_json_and_yaml() -> None:
    config = KVQuantConfig.from_yaml(MIXED_YAML)
    assert KVQuantConfig.from_dict(config.to_dict()) == config
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert all(isinstance(override, LayerOverride) for override in config.layers)
    # resolved when read: changing the config's own arguments later leaves the overrides as they were
    again = config.with_stream_args(dtype="int8", scope="per_channel", dynamic=False)
    assert again.stream_args("key") == QuantArgs(dtype="int8", symmetric=False)
    assert again.stream_args("key", LAYER1) == config.stream_args("key", LAYER1)


def _fields(config: KVQuantConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("model.layers.0.self_attn", r"layers: expected a list"),
        ([["model.layers.0.self_attn"]], r"layers\[0\]: expected a mapping with 'include' and 'qconfig'"),
        ([{"include": ["x"]}], r"layers\[0\]: needs both 'include'"),
        ([{"include": ["x"], "qconfig": {}, "dtype": "int4"}], r"unknown key 'layers\[0\]\.dtype'"),
        ([{"include": ["x"], "qconfig": {"bits": 4}}], r"unknown key 'layers\[0\]\.qconfig\.bits'"),
        ([{"include": ["x"], "qconfig": {"dtype": "int5"}}], r"dtype.*int5"),
        ([{"include": ["x"], "qconfig": {"key": 4}}], r"layers\[0\]\.qconfig\.key: expected a mapping"),
        ([{"include": ["x"], "qconfig": {"scope": "group"}}], r"layers\[0\]\.qconfig\.key.*group_size|group_size"),
        ([{"include": ["model.layers.{0"], "qconfig": {}}], r"unbalanced braces"),
        ([{"include": [""], "qconfig": {}}], r"layers\[0\]\.include: every pattern must be a non-empty string"),
    ],
)
def test_bad_overrides_are_errors_naming_where(layers: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVQuantConfig(layers=layers)  # type: ignore[arg-type]


def test_an_override_pattern_that_matches_no_module_warns(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(layers=[{"include": ["model.layer.0.self_attn"], "qconfig": {"dtype": "int4"}}])
    with pytest.warns(UserWarning, match=r"layers pattern 'model\.layer\.0\.self_attn' matches no attention module"):
        QuantizedCalibratingCache(llama, config)


def test_a_calibrated_group_size_in_an_override_must_divide_head_dim(llama: PreTrainedModel) -> None:
    qconfig = {"scope": "group", "group_size": 5, "dtype": "int4"}
    config = KVQuantConfig(layers=[{"include": [LAYER1], "qconfig": qconfig}])
    with pytest.raises(ConfigError, match=rf"group_size 5 does not divide this model's head_dim {HEAD_DIM}"):
        QuantizedCalibratingCache(llama, config)


def test_a_dynamic_group_size_in_an_override_need_not_divide_head_dim(llama: PreTrainedModel) -> None:
    qconfig = {"scope": "group", "group_size": 5, "dtype": "int4", "dynamic": True}
    config = KVQuantConfig(layers=[{"include": [LAYER1], "qconfig": qconfig}])
    cache = QuantizedCalibratingCache(llama, config, storage="packed")
    assert cache.layers[1].quantizer.key.granularity.groups(HEAD_DIM) == -(-HEAD_DIM // 5)


# ================================================================================ in the cache
def test_each_layer_gets_its_own_scheme_and_exclude_still_wins(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(
        dtype="int4",
        symmetric=False,
        layers=[{"include": [LAYER1], "qconfig": {"dtype": "int8", "symmetric": True}}],
    )
    cache = QuantizedCalibratingCache(llama, config)
    assert cache.quantizers[0].key.args.dtype is QuantDtype.INT4
    assert cache.quantizers[1].key.args == QuantArgs()
    excluded = QuantizedCalibratingCache(llama, KVQuantConfig(**{**_fields(config), "exclude": (LAYER1,)}))
    assert excluded.quantized_layers == [0]


@pytest.fixture(scope="module")
def mixed(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    """Layer 0 static int8 keys / per-head int4 values, layer 1 dynamic int2, both packed."""
    config = KVQuantConfig.from_yaml(MIXED_YAML)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern matches a layer ...
        warnings.simplefilter("ignore", ContextLengthWarning)  # ... and layer 0's static keys end at 16 tokens
        return calibrate(llama, _tokens(2, 16, seed=0), quant_config=config, progress=False).new_cache()


def test_a_mixed_state_saves_validates_and_reloads_exactly(
    llama: PreTrainedModel, mixed: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    path = mixed.save(tmp_path / "mixed.safetensors")
    stored = read_state_file(path)
    assert validate_state(stored) == []
    # layer 0 saves its static parameters; layer 1 is dynamic and saves nothing
    assert {name.split(".")[1] for name in stored.tensors} == {"0"}
    assert stored.tensors["layers.0.value.scale"].shape == (KV_HEADS,)
    reloaded = QuantizedCalibratingCache.from_file(path, llama)
    assert reloaded.quant_config == mixed.quant_config
    for name, tensor in mixed.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)


def test_a_state_whose_tensors_do_not_fit_its_layer_override_is_refused(
    mixed: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    """The validator reads each layer's own scheme: per-head value scales given per-channel shape are wrong."""
    state = mixed.state_dict()
    state["layers.0.value.scale"] = torch.ones(KV_HEADS, HEAD_DIM)
    cache = copy.deepcopy(mixed)
    with pytest.raises(QuantStateError, match=r"layers\.0\.value tensors have shapes"):
        cache.load_state_dict(state)


def test_packed_mixed_equals_fake_mixed_and_counts_its_bits(
    llama: PreTrainedModel, mixed: QuantizedCalibratingCache
) -> None:
    fake = mixed.empty_copy()
    packed = QuantizedCalibratingCache(llama, mixed.quant_config, storage="packed")
    packed.load_state_dict(mixed.state_dict())
    prompt = _tokens(1, 24, seed=1)
    with torch.no_grad():
        logits = [llama(prompt, **{CACHE_KEYWORD: cache}).logits for cache in (fake, packed)]
    assert torch.equal(logits[0], logits[1])
    per_head_int4 = QuantArgs(dtype="int4", scope="per_head", symmetric=False)
    int2 = QuantArgs(dtype="int2", scope="per_token", dynamic=True, symmetric=False)
    layer0 = (stream_bits(QuantArgs(), KV_HEADS, HEAD_DIM, 24), stream_bits(per_head_int4, KV_HEADS, HEAD_DIM, 24))
    layer1 = stream_bits(int2, KV_HEADS, HEAD_DIM, 24)
    assert packed.effective_bits(24) == pytest.approx((sum(layer0) + 2 * layer1) / 4)
    report = packed.memory_report()
    held = sum(entry["total"] - entry["reserved"] - entry["encoder"] for entry in report) * 8
    assert held / (len(report) * 2 * KV_HEADS * HEAD_DIM * 24) == pytest.approx(packed.effective_bits(24), rel=1e-12)


def test_export_refuses_a_non_seed_override(llama: PreTrainedModel, tmp_path: Path) -> None:
    from quantcache.export.common import KVState

    config = KVQuantConfig(layers=[{"include": [LAYER1], "qconfig": {"dtype": "int4"}}])
    cache = calibrate(llama, _tokens(1, 16, seed=2), quant_config=config, progress=False).new_cache()
    with pytest.raises(QuantStateError, match=r"cannot be exported"):
        KVState.from_tensors(
            cache.state_dict(),
            config=config,
            layer_names=cache.layer_names,
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            model_type="llama",
            source="test",
        )


def test_scope_enum_is_what_the_override_reads() -> None:
    override = KVQuantConfig(layers=[{"include": ["*"], "qconfig": {"scope": "per_head"}}]).layers[0]
    assert override.key.scope is QuantScope.PER_HEAD and override.value.scope is QuantScope.PER_HEAD
