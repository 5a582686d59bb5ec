"""KVQuantConfig: defaults, validation, msModelSlim YAML shapes, round trips and layer selection."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcache import ConfigError, KVQuantConfig, QuantArgs, QuantDtype, QuantMethod, QuantScope
from quantcache.scheme.args import STREAM_KEYS
from quantcache.scheme.config import expand_braces, match_module_names
from quantcache.scheme.presets import PRESETS

NAMES = [f"model.layers.{i}.self_attn" for i in range(4)]
# Stream schemes of every kind: the presets' keys and values, and a few static ones.
SCHEMES = sorted(
    {args for name in PRESETS for args in (KVQuantConfig.preset(name).key, KVQuantConfig.preset(name).value)}
    | {QuantArgs(symmetric=False), QuantArgs(scope="group", group_size=4), QuantArgs(method="mse")},
    key=repr,
)

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
    for args in (config.key, config.value):
        assert args.dtype is QuantDtype.INT8
        assert args.scope is QuantScope.PER_CHANNEL
        assert args.method is QuantMethod.MINMAX
        assert args.symmetric is True
    assert config.include == ("*",)
    assert config.exclude == ()
    assert all(config.select(NAMES))


def test_enum_values_accept_strings_case_insensitively() -> None:
    config = KVQuantConfig(dtype="INT8", scope="Per_Channel", method="minmax")
    assert config.key.dtype is QuantDtype.INT8 and config.value.dtype is QuantDtype.INT8
    assert config.key.scope is QuantScope.PER_CHANNEL and config.value.scope is QuantScope.PER_CHANNEL
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
        config.key = QuantArgs(symmetric=False)  # type: ignore[misc]
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
    assert config.key.symmetric and config.value.symmetric  # the linear_quant item's symmetric: False is not picked up
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
    assert KVQuantConfig.from_yaml(text) == KVQuantConfig(symmetric=True, exclude=("model.layers.0.self_attn",))


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
    assert KVQuantConfig.from_yaml(str(path)) == KVQuantConfig(symmetric=False, exclude=("model.layers.0.self_attn",))


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
    assert data["qconfig"]["symmetric"] is config.key.symmetric is config.value.symmetric
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
    assert expand_braces("x.{a,{b,c}d}.y") == ["x.a.y", "x.bd.y", "x.cd.y"]
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


# ------------------------------------------------------------------------------ the two streams are the scheme
def test_the_config_holds_its_streams_and_no_flat_scheme_fields() -> None:
    """``key`` and ``value`` are the only statement of the scheme: a flat field left beside them is what let the
    ascend exporter read ``symmetric`` from the wrong place."""
    config = KVQuantConfig(symmetric=True, key={"symmetric": False})
    for name in STREAM_KEYS:
        assert not hasattr(config, name), name
    assert config.key == QuantArgs(symmetric=False) and config.value == QuantArgs()
    assert config.key_args is config.key and config.value_args is config.value
    assert config.stream_args("key") is config.key and config.all_stream_args() == [config.key, config.value]
    assert {field.name for field in dataclasses.fields(config)} >= {"key", "value"}
    assert not {field.name for field in dataclasses.fields(config)} & set(STREAM_KEYS)


def test_flat_keywords_set_both_streams_and_a_mapping_changes_one_on_top() -> None:
    config = KVQuantConfig(dtype="int4", scope="per_token", dynamic=True, value={"symmetric": False})
    assert config.key == QuantArgs(dtype="int4", scope="per_token", dynamic=True)
    assert config.value == QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False)
    assert KVQuantConfig(symmetric=False) == KVQuantConfig(key=QuantArgs(symmetric=False), value={"symmetric": False})
    with pytest.raises(ConfigError, match=r"unknown key 'qconfig\.value\.bits'"):
        KVQuantConfig(value={"bits": 4})
    with pytest.raises(TypeError, match="unexpected keyword argument 'bits'; a stream's keywords are scope, dtype"):
        KVQuantConfig(bits=4)


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(SCHEMES),
    value=st.sampled_from([args for args in SCHEMES if not (args.query_aware or args.rope_radius)]),
)
def test_configs_that_describe_the_same_streams_are_equal_however_spelled(key: QuantArgs, value: QuantArgs) -> None:
    """Complete streams, flat keywords plus a mapping, the dict a state file stores, its JSON and the YAML all
    make one config: equal, with equal hashes."""
    pre = not key.rope_radius  # RoPE-radius ranges are for keys after RoPE; query-aware rounding needs them before
    spellings = [
        KVQuantConfig(key=key, value=value, pre_rope_keys=pre),
        KVQuantConfig(**key.to_dict(full=True), value=value.to_dict(full=True), pre_rope_keys=pre),
        KVQuantConfig(**value.to_dict(full=True), key=key.to_dict(full=True), pre_rope_keys=pre),
        KVQuantConfig(key=key.to_dict(), value=value.to_dict(), pre_rope_keys=pre),
    ]
    spellings += [KVQuantConfig.from_dict(spellings[0].to_dict())]
    spellings += [KVQuantConfig.from_dict(json.loads(json.dumps(spellings[0].to_dict())))]
    spellings += [KVQuantConfig.from_yaml(spellings[0].to_yaml())]
    for config in spellings:
        assert config == spellings[0] and hash(config) == hash(spellings[0])
        assert config.key == key and config.value == value


def test_to_dict_is_msmodelslims_flat_shape_when_the_streams_agree_and_adds_the_values_when_not() -> None:
    assert KVQuantConfig(symmetric=False).to_dict()["qconfig"] == {
        "scope": "per_channel",
        "dtype": "int8",
        "symmetric": False,
        "method": "minmax",
    }
    mixed = KVQuantConfig(symmetric=True, key={"symmetric": False}).to_dict()["qconfig"]
    assert mixed == {
        "scope": "per_channel",
        "dtype": "int8",
        "symmetric": False,
        "method": "minmax",
        "value": QuantArgs().to_dict(full=True),
    }


def test_a_complete_stream_and_a_flat_keyword_that_disagree_are_refused_not_ignored() -> None:
    """``dataclasses.replace(config, symmetric=False)`` hands the constructor the config's complete streams
    together with the flat keyword: silently keeping the streams would do nothing, silently overriding them
    would change what a caller passed as complete; either way one of the two is lost."""
    config = KVQuantConfig()
    with pytest.raises(
        ConfigError,
        match=r"key: a complete QuantArgs \(symmetric=True\) and the flat keyword\(s\) "
        r"symmetric=False.*with_stream_args\(symmetric=False\)",
    ):
        dataclasses.replace(config, symmetric=False)
    conflict = r"value: a complete QuantArgs \(dtype='int8'\) and the flat keyword\(s\) dtype='int4'"
    with pytest.raises(ConfigError, match=conflict):
        KVQuantConfig(dtype="int4", key=QuantArgs(dtype="int4"), value=QuantArgs())
    assert dataclasses.replace(config, symmetric=True) == config  # agreeing is not a conflict
    assert dataclasses.replace(config, key=QuantArgs(symmetric=False)) == KVQuantConfig(key={"symmetric": False})
    assert dataclasses.replace(config, exclude=("x",)).key == config.key


def test_with_stream_args_changes_both_streams_and_leaves_layer_overrides() -> None:
    override = {"include": ["model.layers.1.*"], "qconfig": {"dtype": "int4"}}
    config = KVQuantConfig(key={"symmetric": False}, layers=[override], exclude=("x",))
    changed = config.with_stream_args(dtype="int4", symmetric=True)
    assert changed.key == changed.value == QuantArgs(dtype="int4")
    assert changed.layers == config.layers and changed.exclude == ("x",)
    with pytest.raises(ConfigError, match=r"qconfig\.dtype: unsupported value 'int5'"):
        config.with_stream_args(dtype="int5")
    with pytest.raises(TypeError, match="unexpected keyword argument 'include'"):
        config.with_stream_args(include=("*",))


def test_stream_schemes_name_every_scheme_in_use_as_the_yaml_does() -> None:
    config = KVQuantConfig(
        key={"symmetric": False},
        layers=[{"include": ["model.layers.1.*"], "qconfig": {"value": {"symmetric": False}}}],
        exclude=("model.layers.3.*",),
    )
    everything = [(where, stream) for where, stream, _ in config.stream_schemes()]
    assert everything == [
        ("qconfig.key", "key"),
        ("qconfig.value", "value"),
        ("layers[0].qconfig.key", "key"),
        ("layers[0].qconfig.value", "value"),
    ]
    assert [where for where, _, args in config.stream_schemes(NAMES) if args.stores_zero_point] == [
        "qconfig.key",
        "layers[0].qconfig.key",
        "layers[0].qconfig.value",
    ]
    assert [where for where, _, _ in config.stream_schemes(["model.layers.1.self_attn"])] == [
        "layers[0].qconfig.key",
        "layers[0].qconfig.value",
    ]
    assert config.stream_schemes(["model.layers.3.self_attn"]) == []  # excluded: its scheme is not in use


# ------------------------------------------------------------------------------ facts derived from a scheme
DERIVED = [
    # args, stores_zero_point, decodes_with_zero_point, row_parameter_bits, calibrated_parameter_bits, calibrates,
    # engine_exportable
    (QuantArgs(), False, False, 0, 32, True, True),
    (QuantArgs(symmetric=False), True, True, 0, 64, True, True),
    (QuantArgs(scope="per_head", symmetric=False), True, True, 0, 64, True, False),
    (QuantArgs(dtype="fp8_e4m3", scope="per_tensor"), False, False, 0, 32, True, False),
    (QuantArgs(method="percentile"), False, False, 0, 32, True, False),
    (QuantArgs(rotation="hadamard"), False, False, 0, 32, True, False),
    (QuantArgs(dtype="int4", scope="per_token", dynamic=True), False, False, 16, 0, False, False),
    (QuantArgs(scope="per_token", dynamic=True, symmetric=False), True, True, 32, 0, False, False),
    (
        QuantArgs(dtype="int3", scope="per_token", dynamic=True, symmetric=False, zero_point_format="int8"),
        True,
        True,
        24,
        0,
        False,
        False,
    ),
    (
        QuantArgs(
            dtype="int3",
            scope="per_token",
            dynamic=True,
            center=True,
            symmetric=False,
            scale_format="log8",
            zero_point_format="int8",
        ),
        True,
        True,
        16,
        0,
        True,
        False,
    ),
    (
        QuantArgs(dtype="int2", scope="per_token", dynamic=True, zero_level=False, scale_format="log8"),
        False,
        True,
        8,
        0,
        False,
        False,
    ),
    (QuantArgs(dtype="fp8_e4m3", scope="per_token", dynamic=True, center=True), False, False, 16, 0, True, False),
]


@pytest.mark.parametrize(
    ("args", "stores", "decodes", "row_bits", "calibrated_bits", "calibrates", "exportable"), DERIVED
)
def test_facts_derived_from_a_stream_scheme(
    args: QuantArgs,
    stores: bool,
    decodes: bool,
    row_bits: int,
    calibrated_bits: int,
    calibrates: bool,
    exportable: bool,
) -> None:
    """Each fact once, on the arguments: a mid-rise stream decodes with its constant -1/2 but stores no zero
    point; a static stream's rows carry no parameters; only static INT8 per-channel min/max ranges without a
    rotation are what the exporters read."""
    assert args.stores_zero_point is stores
    assert args.decodes_with_zero_point is decodes
    assert args.row_parameter_bits == row_bits
    assert args.calibrated_parameter_bits == calibrated_bits
    assert args.calibrates is calibrates
    assert args.engine_exportable is exportable
    assert (args.export_problems() == []) is exportable


def test_export_problems_name_each_setting_and_its_place() -> None:
    config = KVQuantConfig(
        dtype="int4",
        scope="per_token",
        dynamic=True,
        rotation="hadamard",
        sink_tokens=1,
        residual_window=2,
        pre_rope_keys=True,
        value=QuantArgs().to_dict(full=True),
    )
    problems = config.export_problems()
    assert problems[0].startswith("qconfig.key is dynamic")
    assert "dtype int4" in problems[0] and "scope per_token" in problems[0] and "rotation hadamard" in problems[0]
    assert not any(problem.startswith("qconfig.value") for problem in problems)
    assert [problem.split(" ")[1].rstrip(":") for problem in problems[1:]] == ["keeps", "reads", "quantizes"]
    assert KVQuantConfig().export_problems() == [] and KVQuantConfig(symmetric=False).export_problems() == []
