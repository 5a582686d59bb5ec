"""Scheme input from strangers: every bad config is a ConfigError (exit 3) that names the problem, before a model
is loaded, and no config can stall or crash the reader.

A YAML key written twice used to keep the last silently; a brace pattern of 150 characters used to expand to
2**30 globs (minutes); deep nesting in YAML or in a state file's JSON metadata used to end in a RecursionError
(exit 1, "internal error"); an out-of-range observer option used to fail only once the model had loaded. Each
is refused here through the Python API, the state-file reader and the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from quantcache import ConfigError, KVQuantConfig, QuantArgs, QuantStateError, cli
from quantcache.cli import _steps
from quantcache.ops.observers import OBSERVERS, make_observer
from quantcache.ops.quantize import compute_qparams
from quantcache.scheme.args import OBSERVER_OPTIONS, QuantMethod
from quantcache.scheme.documents import MAX_DEPTH, load_json, load_yaml
from quantcache.scheme.patterns import MAX_EXPANSION, brace_alternatives, expand_braces
from quantcache.state.file import StateFile, read_state_file, write_state_file
from quantcache.state.schema import checksum as _checksum

NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
KV_HEADS, HEAD_DIM = 2, 16
BOMB = "{a,b}" * 30  # 150 characters, 2**30 globs


# ================================================================================ helpers
@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Models the command line asked for; every request fails the test's expectation of an early refusal."""
    asked: list[str] = []

    def load(args: argparse.Namespace) -> tuple[Any, Any]:
        asked.append(args.model)
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(_steps, "load_model_and_tokenizer", load)
    return asked


def _calibrate(tmp_path: Path, config_text: str) -> int:
    path = tmp_path / "kv.yaml"
    path.write_text(config_text, encoding="utf-8")
    return cli.main(
        ["calibrate", "--samples", "2", "--seq-len", "48", "-q", "--config", str(path), "-o", str(tmp_path / "run")]
    )


def _state_file(path: Path, config_metadata: str | None = None) -> Path:
    """A valid frozen seed state for a two-layer model; with ``config_metadata``, that text as its stored config
    (and a checksum that matches it, so only the config reader can refuse it)."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for index in range(len(NAMES)):
        for stream in ("key", "value"):
            low = -torch.rand(KV_HEADS, HEAD_DIM, generator=generator) - 0.1
            high = torch.rand(KV_HEADS, HEAD_DIM, generator=generator) + 0.1
            params = compute_qparams(low, high, symmetric=True)
            prefix = f"layers.{index}.{stream}"
            tensors.update({f"{prefix}.min": low, f"{prefix}.max": high})
            tensors.update({f"{prefix}.scale": params.scale, f"{prefix}.zero_point": params.zero_point})
    stored = StateFile(
        tensors=tensors,
        config=KVQuantConfig(),
        mode="frozen",
        num_layers=len(NAMES),
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        layer_names=NAMES,
        model_type="llama",
        quantcache_version="test",
    )
    write_state_file(path, stored)
    if config_metadata is not None:
        metadata = stored.metadata()
        metadata["config"] = config_metadata
        metadata["checksum"] = json.dumps(_checksum(tensors, metadata))
        save_file(tensors, str(path), metadata=metadata)
    return path


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["inspect", str(path)])
    return code, capsys.readouterr().err


# ================================================================================ duplicate keys
@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("qconfig: {dtype: int8, dtype: int4}\n", "dtype", 1),
        ("qconfig:\n  symmetric: true\n  method: minmax\n  symmetric: false\n", "symmetric", 4),
        ("exclude: [a]\ninclude: ['*']\nexclude: [b]\n", "exclude", 3),
        ("qconfig:\n  key: {scope: per_head, scope: per_tensor}\n", "scope", 2),
        ("layers:\n  - include: [x]\n    qconfig: {dtype: int4}\n    qconfig: {dtype: int2}\n", "qconfig", 4),
    ],
)
def test_a_yaml_key_written_twice_is_refused_naming_it_and_its_line(text: str, key: str, line: int) -> None:
    with pytest.raises(ConfigError, match=rf"duplicate key '{key}' \(line {line}, column \d+\).*keep only the last"):
        KVQuantConfig.from_yaml(text)


def test_a_key_merged_in_with_yaml_merge_keys_may_still_be_overridden() -> None:
    text = "base: &base {dtype: int4, symmetric: false}\nqconfig:\n  <<: *base\n  dtype: int8\n"
    assert load_yaml(text)["qconfig"] == {"dtype": "int8", "symmetric": False}


def test_the_command_line_refuses_a_duplicated_key_before_loading_the_model(
    tmp_path: Path, model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _calibrate(tmp_path, "qconfig: {dtype: int8, dtype: int4}\n") == cli.EXIT_INPUT
    assert "duplicate key 'dtype'" in capsys.readouterr().err
    assert model_loads == []


def test_a_json_key_written_twice_is_refused() -> None:
    assert load_json('{"a": {"b": 1}, "c": [{"b": 2}]}') == {"a": {"b": 1}, "c": [{"b": 2}]}
    with pytest.raises(ConfigError, match=r"config: duplicate key 'dtype' in one JSON object"):
        load_json('{"qconfig": {"dtype": "int8", "dtype": "int4"}}', what="config")


def test_a_state_file_whose_config_repeats_a_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps(KVQuantConfig().to_dict(), sort_keys=True).replace(
        '"dtype": "int8"', '"dtype": "int8", "dtype": "int4"'
    )
    path = _state_file(tmp_path / "dup.safetensors", text)
    with pytest.raises(QuantStateError, match=r"metadata field 'config' is corrupted .*duplicate key 'dtype'"):
        read_state_file(path)
    code, err = _inspect(path, capsys)
    assert code == cli.EXIT_INPUT and "duplicate key 'dtype'" in err


# ================================================================================ brace expansion
def _reference_expansion(pattern: str) -> list[str]:
    """Brace expansion written the textbook way (first top-level group, split on its top-level commas)."""
    depth, start = 0, None
    for index, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0 and start is not None:
                inner, alternatives, level, begin = pattern[start + 1 : index], [], 0, 0
                for position, symbol in enumerate(inner):
                    level += symbol == "{"
                    level -= symbol == "}"
                    if symbol == "," and level == 0:
                        alternatives.append(inner[begin:position])
                        begin = position + 1
                alternatives.append(inner[begin:])
                tails = _reference_expansion(pattern[index + 1 :])
                heads = [text for alternative in alternatives for text in _reference_expansion(alternative)]
                return [pattern[:start] + head + tail for head in heads for tail in tails]
    return [pattern]


@st.composite
def _patterns(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        if depth < 3 and draw(st.booleans()):
            alternatives = draw(st.lists(_patterns(depth + 1), min_size=1, max_size=3))
            parts.append("{" + ",".join(alternatives) + "}")
        else:
            parts.append(draw(st.sampled_from(["a", "b", ".", "*", "x1"])))
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(pattern=_patterns())
def test_braces_expand_as_the_textbook_does_and_are_counted_without_expanding(pattern: str) -> None:
    reference = _reference_expansion(pattern)
    assert brace_alternatives(pattern) == min(len(reference), MAX_EXPANSION + 1)
    if len(reference) > MAX_EXPANSION:
        with pytest.raises(ConfigError, match=f"expands to more than {MAX_EXPANSION} alternatives"):
            expand_braces(pattern)
    else:
        assert expand_braces(pattern) == list(dict.fromkeys(reference))


def test_a_pattern_past_the_expansion_bound_is_refused_at_once() -> None:
    assert len(expand_braces("{a,b}" * 12)) == MAX_EXPANSION == 4096  # exactly at the bound
    with pytest.raises(ConfigError, match="expands to more than 4096 alternatives"):
        expand_braces("{x," + "{a,b}" * 12 + "}")  # one past it
    started = time.perf_counter()
    for where in ("include", "exclude"):
        with pytest.raises(ConfigError, match=r"pattern '\{a,b\}\{a,b\}.*'\.\.\. expands to more than 4096"):
            KVQuantConfig.from_yaml(f"{where}: ['{BOMB}']\n")
    with pytest.raises(ConfigError, match="expands to more than 4096"):
        KVQuantConfig(layers=[{"include": [BOMB], "qconfig": {"dtype": "int4"}}])
    assert time.perf_counter() - started < 2.0
    assert brace_alternatives(BOMB) == MAX_EXPANSION + 1


def test_groups_nested_too_deep_are_refused() -> None:
    assert expand_braces("{" * 32 + "a" + "}" * 32) == ["a"]
    with pytest.raises(ConfigError, match=r"nests \{a,b\} groups more than 32 deep"):
        expand_braces("{" * 33 + "a" + "}" * 33)


def test_a_state_file_with_a_brace_bomb_does_not_stall_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = KVQuantConfig().to_dict()
    data["exclude"] = [BOMB]
    path = _state_file(tmp_path / "bomb.safetensors", json.dumps(data, sort_keys=True))
    started = time.perf_counter()
    with pytest.raises(QuantStateError, match=r"stored config is invalid: pattern .* expands to more than 4096"):
        read_state_file(path)
    code, err = _inspect(path, capsys)
    assert code == cli.EXIT_INPUT and "expands to more than 4096" in err
    assert time.perf_counter() - started < 5.0


# ================================================================================ nesting depth
@pytest.mark.parametrize(
    "text",
    ["qconfig: " + "[" * 5000 + "]" * 5000 + "\n", "include:\n" + "".join("  " * i + "-\n" for i in range(1, 5000))],
    ids=["flow", "block"],
)
def test_yaml_nested_thousands_deep_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=f"nests mappings and lists more than {MAX_DEPTH} levels deep"):
        KVQuantConfig.from_yaml(text)


def test_yaml_depth_bound_is_exact_and_counts_aliases() -> None:
    assert load_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(ConfigError, match="more than 64 levels"):
        load_yaml("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    # Each anchor nests the previous one a level deeper: 70 short lines, 70 levels, no deep text.
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 70))
    with pytest.raises(ConfigError, match=r"config \(through its aliases\) nests"):
        load_yaml(chain)


def test_the_command_line_refuses_deep_yaml_with_exit_3(
    tmp_path: Path, model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _calibrate(tmp_path, "qconfig: " + "[" * 5000 + "]" * 5000 + "\n") == cli.EXIT_INPUT
    assert "more than 64 levels deep" in capsys.readouterr().err
    assert model_loads == []


def test_json_depth_bound_ignores_brackets_inside_strings() -> None:
    assert load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    assert load_json(json.dumps({"pattern": "[" * 1000 + "{" * 1000})) == {"pattern": "[" * 1000 + "{" * 1000}
    with pytest.raises(ConfigError, match="more than 64 levels deep"):
        load_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_a_state_file_whose_config_nests_100k_arrays_is_refused_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _state_file(tmp_path / "deep.safetensors", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(QuantStateError, match=r"metadata field 'config' is corrupted .*more than 64 levels deep"):
        read_state_file(path)
    code, err = _inspect(path, capsys)
    assert code == cli.EXIT_INPUT and "more than 64 levels deep" in err


# ================================================================================ observer options
BAD_OPTIONS = [
    ("percentile", {"percentile": 150}, r"percentile: expected a number in \(50, 100\].*got 150"),
    ("percentile", {"percentile": 50}, r"percentile: expected a number in \(50, 100\].*got 50"),
    ("percentile", {"percentile": math.nan}, r"percentile: expected a number in \(50, 100\].*got nan"),
    ("percentile", {"percentile": math.inf}, r"percentile: expected a number .*got inf"),
    ("percentile", {"percentile": "99"}, r"percentile: expected a number .*got '99'"),
    ("percentile", {"percentile": True}, r"percentile: expected a number .*got True"),
    ("mse", {"grid": 0}, r"grid: expected a whole number in \[1, 1024\].*got 0"),
    ("mse", {"grid": 1025}, r"grid: expected a whole number in \[1, 1024\].*got 1025"),
    ("mse", {"grid": 2.5}, r"grid: expected a whole number .*got 2.5"),
    ("mse", {"grid": 10**400}, r"grid: expected a whole number .*got 1000"),
    ("minmax", {"percentile": 99.9}, r"'percentile' is not an option of method 'minmax' \(options: none\)"),
    ("mse", {"percentile": 99.9}, r"'percentile' is not an option of method 'mse' \(options: grid\)"),
]


@pytest.mark.parametrize(("method", "options", "message"), BAD_OPTIONS)
def test_observer_options_are_checked_when_the_scheme_is_built(
    method: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=r"qconfig\.observer_options.*" + message):
        QuantArgs(method=method, observer_options=options)
    with pytest.raises(ConfigError, match=message):
        KVQuantConfig(method=method, value={"observer_options": options})


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("percentile", {"percentile": 100}),
        ("percentile", {"percentile": 50.001}),
        ("mse", {"grid": 1}),
        ("mse", {"grid": 1024}),
        ("percentile", {}),
    ],
)
def test_observer_options_at_their_bounds_are_accepted_and_reach_the_observer(
    method: str, options: dict[str, Any]
) -> None:
    args = QuantArgs(method=method, observer_options=options)
    assert args.options == options
    assert make_observer(args).args.options == options


def test_every_observer_reads_only_options_of_its_table() -> None:
    """The table is the one list of options: each method has a row, and each row's names are what the observer
    reads (a new option must be added to the table or construction refuses it)."""
    assert set(OBSERVER_OPTIONS) == set(QuantMethod) == set(OBSERVERS)
    assert {method: [option.name for option in rows] for method, rows in OBSERVER_OPTIONS.items()} == {
        QuantMethod.MINMAX: [],
        QuantMethod.PERCENTILE: ["percentile"],
        QuantMethod.MSE: ["grid"],
    }


@pytest.mark.parametrize(
    ("option", "message"),
    [("{percentile: 150}", "got 150"), ("{percentile: .nan}", "got nan"), ("{grid: 0}", "got 0")],
)
def test_the_command_line_refuses_a_bad_observer_option_before_loading_the_model(
    tmp_path: Path, model_loads: list[str], capsys: pytest.CaptureFixture[str], option: str, message: str
) -> None:
    method = "mse" if "grid" in option else "percentile"
    assert _calibrate(tmp_path, f"qconfig:\n  method: {method}\n  observer_options: {option}\n") == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert f"qconfig.observer_options.{option[1:].split(':')[0]}" in err and message in err
    assert model_loads == []


# ================================================================================ storage is the cache's
def test_a_config_takes_no_storage_and_says_where_it_goes() -> None:
    with pytest.raises(TypeError, match=r"takes no storage: .*new_cache\(storage=\.\.\.\)"):
        KVQuantConfig(storage="packed")
    for text in ("storage: packed\n", "spec:\n  process:\n    - {type: dynamic_cache, storage: fake}\n"):
        with pytest.raises(ConfigError, match=r"storage: .*chosen per cache.*QuantizedCalibratingCache\(model, "):
            KVQuantConfig.from_yaml(text)
    assert "storage" not in KVQuantConfig().to_dict()


def test_a_stored_config_drops_the_storage_earlier_versions_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {**KVQuantConfig(symmetric=False).to_dict(), "storage": "packed"}
    assert KVQuantConfig.from_dict(data, stored=True) == KVQuantConfig(symmetric=False)
    with pytest.raises(ConfigError, match="storage"):
        KVQuantConfig.from_dict(data)
    seed = {**KVQuantConfig().to_dict(), "storage": "packed"}
    path = _state_file(tmp_path / "old.safetensors", json.dumps(seed, sort_keys=True))
    assert read_state_file(path).config == KVQuantConfig()
    code, _ = _inspect(path, capsys)
    assert code == cli.EXIT_OK


def test_calibrate_refuses_storage_before_loading_the_model(
    tmp_path: Path, model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["calibrate", "--storage", "packed", "-q", "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_USAGE
    assert 'choose storage per cache when you load it: quantizer.new_cache(storage="packed")' in capsys.readouterr().err
    assert model_loads == []
