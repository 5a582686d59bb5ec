"""KVQuantConfig: defaults, validation, msModelSlim YAML shapes, round trips and layer selection."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from quantcache import ConfigError, KVQuantConfig, QuantDtype, QuantMethod, QuantScope
from quantcache.scheme.config import expand_braces, match_module_names

NAMES = [f"model.layers.{i}.self_attn" for i in range(4)]

SINGLE_ITEM = """\
type: "dynamic_cache"
qconfig:
  scope: "per_channel"
  dtype: "int8"
  symmetric: False
  method: "minmax"
include: ["*"]
exclude: ["model.layers.0.self_attn"]
"""

FULL_DOCUMENT = """\
apiversion: modelslim_v1
metadata:
  config_id: w8a8_kv8
  score: 90
  label:
    w_bit: 8
    a_bit: 8
    kv_cache: 8
spec:
  process:
    - type: "linear_quant"
      qconfig:
        act:
          scope: "per_tensor"
          dtype: "int8"
          symmetric: False
          method: "minmax"
        weight:
          scope: "per_channel"
          dtype: "int8"
          symmetric: True
          method: "minmax"
      include: ["*"]
      exclude: ["*down_proj*"]
    - type: "dynamic_cache"
      qconfig:
        scope: "per_channel"
        dtype: "int8"
        symmetric: True
        method: "minmax"
      include: ["*"]
      exclude: ["model.layers.{1,3}.self_attn"]
  save:
    - type: "ascendv1_saver"
      part_file_size: 4
"""


# ------------------------------------------------------------------------------ defaults & enums
def test_defaults() -> None:
    config = KVQuantConfig()
    assert config.dtype is QuantDtype.INT8
    assert config.scope is QuantScope.PER_CHANNEL
    assert config.method is QuantMethod.MINMAX
    assert config.symmetric is True
    assert config.include == ("*",)
    assert config.exclude == ()
    assert all(config.select(NAMES))


def test_enum_values_accept_strings_case_insensitively() -> None:
    config = KVQuantConfig(dtype="INT8", scope="Per_Channel", method="minmax")  # type: ignore[arg-type]
    assert config.dtype is QuantDtype.INT8
    assert config.scope is QuantScope.PER_CHANNEL
    assert config == KVQuantConfig()


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("dtype", "int5", "'int8', 'int4', 'int3', 'int2', 'fp8_e4m3', 'fp8_e5m2'"),
        ("scope", "per_row", "'per_tensor', 'per_head', 'per_channel', 'per_token', 'group'"),
        ("method", "histogram", "'minmax', 'percentile', 'mse'"),
        ("dtype", 8, "'int8'"),
    ],
)
def test_unsupported_enum_value_names_key_and_allowed_values(key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError, match=rf"qconfig\.{key}") as info:
        KVQuantConfig(**{key: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(value) in message
    assert f"allowed: {allowed}" in message


@pytest.mark.parametrize("value", ["true", 1, None])
def test_symmetric_must_be_a_bool(value: object) -> None:
    with pytest.raises(ConfigError, match=r"qconfig\.symmetric"):
        KVQuantConfig(symmetric=value)  # type: ignore[arg-type]


def test_unsupported_value_from_yaml_names_key() -> None:
    text = SINGLE_ITEM.replace('dtype: "int8"', 'dtype: "fp8"')
    with pytest.raises(ConfigError, match=r"qconfig\.dtype.*'fp8'.*allowed: 'int8'"):
        KVQuantConfig.from_yaml(text)


@pytest.mark.parametrize("bad", [[""], [3], {"a": 1}, 5])
def test_patterns_must_be_non_empty_strings(bad: object) -> None:
    with pytest.raises(ConfigError, match="include"):
        KVQuantConfig(include=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="exclude"):
        KVQuantConfig(exclude=bad)  # type: ignore[arg-type]


def test_single_string_pattern_becomes_a_tuple() -> None:
    config = KVQuantConfig(include="model.layers.0.self_attn", exclude=["a", "b"])  # type: ignore[arg-type]
    assert config.include == ("model.layers.0.self_attn",)
    assert config.exclude == ("a", "b")


def test_config_is_immutable_and_hashable() -> None:
    config = KVQuantConfig()
    with pytest.raises(AttributeError):
        config.symmetric = False  # type: ignore[misc]
    assert hash(config) == hash(KVQuantConfig())


# ------------------------------------------------------------------------------ YAML shapes
def test_yaml_single_processor_item() -> None:
    config = KVQuantConfig.from_yaml(SINGLE_ITEM)
    assert config == KVQuantConfig(symmetric=False, include=("*",), exclude=("model.layers.0.self_attn",))
    assert config.select(NAMES) == [False, True, True, True]


def test_yaml_one_item_list() -> None:
    text = "- " + SINGLE_ITEM.replace("\n", "\n  ").rstrip() + "\n"
    assert yaml.safe_load(text)[0]["type"] == "dynamic_cache"
    assert KVQuantConfig.from_yaml(text) == KVQuantConfig.from_yaml(SINGLE_ITEM)


def test_yaml_list_with_two_dynamic_cache_items_is_rejected() -> None:
    item = yaml.safe_load(SINGLE_ITEM)
    with pytest.raises(ConfigError, match=r"exactly one 'dynamic_cache'.*found 2"):
        KVQuantConfig.from_yaml(yaml.safe_dump([item, item]))


def test_yaml_list_without_dynamic_cache_item_is_rejected() -> None:
    with pytest.raises(ConfigError, match="found 0"):
        KVQuantConfig.from_yaml(yaml.safe_dump([{"type": "linear_quant"}]))


def test_full_msmodelslim_document_takes_the_dynamic_cache_item() -> None:
    config = KVQuantConfig.from_yaml(FULL_DOCUMENT)
    assert config.symmetric is True  # the linear_quant item's symmetric: False is not picked up
    assert config.include == ("*",)
    assert config.exclude == ("model.layers.{1,3}.self_attn",)
    assert config.select(NAMES) == [True, False, True, False]


def test_full_document_without_dynamic_cache_item() -> None:
    document = yaml.safe_load(FULL_DOCUMENT)
    document["spec"]["process"] = document["spec"]["process"][:1]
    with pytest.raises(ConfigError, match=r"no 'dynamic_cache' item.*linear_quant"):
        KVQuantConfig.from_dict(document)


def test_full_document_with_two_dynamic_cache_items() -> None:
    document = yaml.safe_load(FULL_DOCUMENT)
    document["spec"]["process"].append(document["spec"]["process"][1])
    with pytest.raises(ConfigError, match="2 'dynamic_cache' items"):
        KVQuantConfig.from_dict(document)


@pytest.mark.parametrize("spec", [{"save": []}, {"process": {"type": "dynamic_cache"}}, ["process"]])
def test_full_document_with_malformed_spec(spec: object) -> None:
    with pytest.raises(ConfigError, match="spec"):
        KVQuantConfig.from_dict({"apiversion": "modelslim_v1", "spec": spec})


def test_unknown_key_in_the_dynamic_cache_item_of_a_document() -> None:
    document = yaml.safe_load(FULL_DOCUMENT)
    document["spec"]["process"][1]["granularity"] = "fine"
    with pytest.raises(ConfigError, match="'granularity'"):
        KVQuantConfig.from_dict(document)


@pytest.mark.parametrize("spelling", ["True", "true", "TRUE", "yes"])
def test_symmetric_yaml_booleans(spelling: str) -> None:
    text = SINGLE_ITEM.replace("symmetric: False", f"symmetric: {spelling}")
    assert KVQuantConfig.from_yaml(text).symmetric is True


def test_quoted_symmetric_is_not_a_bool() -> None:
    text = SINGLE_ITEM.replace("symmetric: False", 'symmetric: "True"')
    with pytest.raises(ConfigError, match=r"qconfig\.symmetric"):
        KVQuantConfig.from_yaml(text)


def test_unknown_top_level_key_of_an_item() -> None:
    with pytest.raises(ConfigError) as info:
        KVQuantConfig.from_yaml(SINGLE_ITEM + "granularity: fine\n")
    message = str(info.value)
    assert "'granularity'" in message
    for allowed in ("type", "qconfig", "include", "exclude"):
        assert allowed in message


def test_unknown_qconfig_key() -> None:
    text = SINGLE_ITEM.replace('  method: "minmax"\n', '  method: "minmax"\n  bits: 4\n')
    with pytest.raises(ConfigError) as info:
        KVQuantConfig.from_yaml(text)
    message = str(info.value)
    assert "qconfig.bits" in message
    for allowed in ("scope", "dtype", "symmetric", "method"):
        assert allowed in message


def test_wrong_processor_type() -> None:
    with pytest.raises(ConfigError, match=r"type: expected 'dynamic_cache'.*'linear_quant'"):
        KVQuantConfig.from_dict({"type": "linear_quant"})


def test_missing_qconfig_and_patterns_take_the_defaults() -> None:
    assert KVQuantConfig.from_dict({"type": "dynamic_cache"}) == KVQuantConfig()
    assert KVQuantConfig.from_dict({"type": "dynamic_cache", "include": None, "exclude": None}) == KVQuantConfig()


@pytest.mark.parametrize("qconfig", [["scope"], "per_channel"])
def test_qconfig_must_be_a_mapping(qconfig: object) -> None:
    with pytest.raises(ConfigError, match="qconfig: expected a mapping"):
        KVQuantConfig.from_dict({"type": "dynamic_cache", "qconfig": qconfig})


@pytest.mark.parametrize("text", ["type: [dynamic_cache\n", "a: b: c\n", "qconfig:\n  - a\n - b\n"])
def test_invalid_yaml(text: str) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        KVQuantConfig.from_yaml(text)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_yaml(text: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        KVQuantConfig.from_yaml(text)


def test_yaml_scalar_is_not_a_config() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        KVQuantConfig.from_yaml("just some words\n")


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("as_path", [True, False])
def test_load_from_file(tmp_path: Path, as_path: bool) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text(FULL_DOCUMENT, encoding="utf-8")
    config = KVQuantConfig.from_yaml(path if as_path else str(path))
    assert config == KVQuantConfig.from_yaml(FULL_DOCUMENT)


def test_load_from_yml_file(tmp_path: Path) -> None:
    path = tmp_path / "kv.yml"
    path.write_text(SINGLE_ITEM, encoding="utf-8")
    assert KVQuantConfig.from_yaml(str(path)).symmetric is False


@pytest.mark.parametrize("as_path", [True, False])
def test_missing_file(tmp_path: Path, as_path: bool) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        KVQuantConfig.from_yaml(path if as_path else str(path))
    assert "missing.yaml" in str(info.value)


# ------------------------------------------------------------------------------ round trips
CONFIGS = [
    KVQuantConfig(),
    KVQuantConfig(symmetric=False),
    KVQuantConfig(include=("model.layers.{0,2}.self_attn", "*.3.*"), exclude=("*layers.2*",)),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_dict_round_trip(config: KVQuantConfig) -> None:
    data = config.to_dict()
    assert data["type"] == "dynamic_cache"
    assert set(data) == {"type", "qconfig", "include", "exclude"}
    assert set(data["qconfig"]) == {"scope", "dtype", "symmetric", "method"}
    assert data["qconfig"]["symmetric"] is config.symmetric
    assert KVQuantConfig.from_dict(data) == config


@pytest.mark.parametrize("config", CONFIGS)
def test_yaml_round_trip(config: KVQuantConfig, tmp_path: Path) -> None:
    text = config.to_yaml()
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, list) and len(loaded) == 1  # msModelSlim processor list shape
    assert loaded[0]["qconfig"]["dtype"] == "int8"
    assert KVQuantConfig.from_yaml(text) == config
    path = tmp_path / "roundtrip.yaml"
    path.write_text(text, encoding="utf-8")
    assert KVQuantConfig.from_yaml(path) == config


def test_to_dict_is_json_plain_data() -> None:
    import json

    data = KVQuantConfig(symmetric=False, exclude=("x",)).to_dict()
    assert json.loads(json.dumps(data)) == data


# ------------------------------------------------------------------------------ patterns
def test_brace_expansion() -> None:
    assert expand_braces("model.layers.{0,1}.self_attn") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert expand_braces("plain") == ["plain"]
    assert sorted(expand_braces("{a,b}.{c,d}")) == ["a.c", "a.d", "b.c", "b.d"]


def test_nested_brace_expansion() -> None:
    assert sorted(set(expand_braces("x.{a,{b,c}d}.y"))) == ["x.a.y", "x.bd.y", "x.cd.y"]
    config = KVQuantConfig(include=("model.layers.{0,{2,3}}.self_attn",))
    assert config.select(NAMES) == [True, False, True, True]


@pytest.mark.parametrize("pattern", ["model.layers.{0,1.self_attn", "model.layers.0,1}.self_attn", "{a,{b}", "}{"])
def test_unbalanced_braces(pattern: str) -> None:
    with pytest.raises(ConfigError, match="unbalanced braces"):
        expand_braces(pattern)
    with pytest.raises(ConfigError, match="unbalanced braces"):
        KVQuantConfig(exclude=(pattern,))


def test_star_crosses_dots() -> None:
    assert match_module_names("*self_attn", NAMES) == NAMES
    assert match_module_names("model.*.1.*", NAMES) == ["model.layers.1.self_attn"]
    assert KVQuantConfig(include=("*layers.2*",)).select(NAMES) == [False, False, True, False]


def test_matching_is_whole_name_and_case_sensitive() -> None:
    assert match_module_names("model.layers.1", NAMES) == []
    assert match_module_names("MODEL.layers.*", NAMES) == []
    assert match_module_names("model.layers.*", ["Model.Layers.0.Self_Attn"]) == []
    assert match_module_names("model.layers.?.self_attn", NAMES) == NAMES


def test_exclude_wins_over_include() -> None:
    config = KVQuantConfig(include=("model.layers.1.self_attn", "model.layers.2.self_attn"), exclude=("*.1.*",))
    assert config.select(NAMES) == [False, False, True, False]
    assert not config.is_quantized("model.layers.1.self_attn")
    assert config.is_quantized("model.layers.2.self_attn")
    assert KVQuantConfig(exclude=("*",)).select(NAMES, warn_unmatched=False) == [False] * 4


def test_select_warns_on_unmatched_pattern() -> None:
    config = KVQuantConfig(include=("model.layers.*.self_atn",), exclude=("model.layers.0.self_attn",))
    with pytest.warns(UserWarning, match=r"include pattern 'model\.layers\.\*\.self_atn' matches no") as record:
        selected = config.select(NAMES)
    assert selected == [False] * 4
    assert len(record) == 1
    assert "model.layers.0.self_attn" in str(record[0].message)  # shows what names look like


def test_select_warns_on_unmatched_exclude() -> None:
    config = KVQuantConfig(exclude=("model.layers.9.self_attn",))
    with pytest.warns(UserWarning, match="exclude pattern"):
        assert config.select(NAMES) == [True] * 4


def test_select_does_not_warn_when_every_pattern_matches() -> None:
    config = KVQuantConfig(include=("model.layers.{0,1}.self_attn", "*.3.*"), exclude=("*.1.*",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.select(NAMES) == [True, False, False, True]


def test_select_can_be_silenced() -> None:
    config = KVQuantConfig(include=("nothing",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.select(NAMES, warn_unmatched=False) == [False] * 4
