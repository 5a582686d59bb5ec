"""The ``quantcache`` command line, run in-process on a tiny offline model.

``quantcache.cli._steps.load_model_and_tokenizer`` is replaced by a loader that returns
the session's tiny random Llama and a character-level tokenizer built with ``tokenizers``
(no download), so every command runs end to end in well under a second. Tests of
files that are not models use the real loader. Two tests start the real entry point
in a subprocess; one ``slow`` test runs the real default model.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import re
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, forge_state_file
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from quantcache import KVQuantConfig, QuantizedCalibratingCache, __version__, cli
from quantcache.analysis.evaluation import evaluate
from quantcache.analysis.report import to_json
from quantcache.calibration.calibrate import calibrate
from quantcache.cli import _steps
from quantcache.errors import InputError, QuantcacheError, QuantStateError
from quantcache.models.catalog import ModelFetchError
from quantcache.models.data import TextSource, token_windows
from quantcache.ops.quantize import compute_qparams
from quantcache.state.file import read_state_file, write_state_file

CALIBRATE_SMALL = ["--samples", "2", "--seq-len", "48", "-q"]
EVALUATE_SMALL = ["--samples", "2", "--context", "64", "--prefill", "32", "--chunk", "16", "-q"]
EVALUATE_ONLY = [*EVALUATE_SMALL, "--generate", "0"]  # evaluate without its generation check
SUBCOMMANDS = ["calibrate", "evaluate", "inspect", "suggest-exclude", "suggest-bits", "export", "import", "bench"]

FULL_DOCUMENT = """\
apiversion: modelslim_v1
metadata:
  config_id: kv-int8
spec:
  process:
    - type: "linear_quant"
      qconfig:
        act: {scope: "per_tensor", dtype: "int8", symmetric: false, method: "minmax"}
        weight: {scope: "per_channel", dtype: "int8", symmetric: true, method: "minmax"}
      include: ["*"]
    - type: "dynamic_cache"
      qconfig:
        scope: "per_channel"
        dtype: "int8"
        symmetric: false
        method: "minmax"
      include: ["*"]
      exclude: ["model.layers.0.self_attn"]
"""

SINGLE_ITEM = """\
- type: "dynamic_cache"
  qconfig:
    scope: "per_channel"
    dtype: "int8"
    symmetric: false
    method: "minmax"
  include: ["model.layers.1.self_attn"]
"""


# ---------------------------------------------------------------------------- fixtures
def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus specials; fits the tiny models' vocabulary."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    characters = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocabulary = {token: index for index, token in enumerate(specials + characters)}
    assert len(vocabulary) <= VOCAB
    backend = Tokenizer(WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture
def use_model(
    monkeypatch: pytest.MonkeyPatch, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> Callable[..., list[argparse.Namespace]]:
    """Make the CLI load ``model`` (default: the tiny Llama); returns the list of args it was called with."""

    def install(model: PreTrainedModel | None = None, error: BaseException | None = None) -> list[argparse.Namespace]:
        calls: list[argparse.Namespace] = []

        def load(args: argparse.Namespace) -> tuple[Any, Any]:
            calls.append(args)
            if error is not None:
                raise error
            return (model if model is not None else llama), tokenizer

        monkeypatch.setattr(_steps, "load_model_and_tokenizer", load)
        return calls

    install()
    return install


@pytest.fixture(scope="module")
def calibrated(
    tmp_path_factory: pytest.TempPathFactory, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> Path:
    """A directory holding a state calibrated by the CLI on the tiny Llama (shared, read-only)."""
    out = tmp_path_factory.mktemp("calibrated") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_steps, "load_model_and_tokenizer", lambda args: (llama, tokenizer))
        assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(out)]) == 0
    return out


def error_line(captured: pytest.CaptureResult[str]) -> str:
    """The stderr of a failed command: one ``quantcache: error:`` line (after any warnings), no traceback."""
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("quantcache: warning: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], captured.err
    assert errors[0].startswith("quantcache: error: ")
    return errors[0]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    paragraph = "The quick brown fox jumps over the lazy dog, again and again. " * 40
    path.write_text("\n\n".join([paragraph] * 5), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- calibrate
class _Clock:
    """A ``time`` stand-in whose ``perf_counter`` advances one second per call: durations become exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_calibrate_writes_state_and_summaries_that_reload(
    tmp_path: Path,
    use_model: Callable[..., Any],
    llama: PreTrainedModel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from quantcache.analysis.state_report import layer_summaries
    from quantcache.cli import calibrate as calibrate_command

    clock = _Clock()
    monkeypatch.setattr(calibrate_command, "time", clock)
    monkeypatch.setattr(_steps, "time", clock)
    out = tmp_path / "run"
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(out)]) == 0
    state = out / "kv_scales.safetensors"
    assert state.is_file() and (out / "kv_scales.json").is_file() and (out / "kv_scales.md").is_file()
    cache = QuantizedCalibratingCache.from_file(state, llama)
    assert cache.is_frozen and cache.quantized_layers == [0, 1]

    summary = json.loads((out / "kv_scales.json").read_text())
    assert summary["data"]["samples"] == 2 and summary["data"]["seq_len"] == 48
    assert summary["config"] == KVQuantConfig().to_dict()
    assert summary["model_type"] == "llama" and summary["quantized_layers"] == [0, 1]
    stored = read_state_file(state)
    layers = layer_summaries(stored.tensors, stored.layer_names, stored.config)
    assert summary["layers"] == json.loads(json.dumps(layers))  # what inspect reports of the same state
    key, tensors = summary["layers"][0]["key"], stored.tensors
    assert (key["min"], key["max"]) == (tensors["layers.0.key.min"].min(), tensors["layers.0.key.max"].max())
    # clock calls: start, model load (2), calibration (2), end
    assert summary["seconds"] == {"load_model": 1.0, "calibrate": 1.0, "total": 5.0}
    markdown = (out / "kv_scales.md").read_text()
    assert "| layer | module |" in markdown and "model.layers.1.self_attn" in markdown

    printed = capsys.readouterr().out
    assert "calibrated 2/2 layers" in printed and str(state) in printed


@pytest.mark.parametrize(
    ("options", "warns"),
    [
        (["--preset", "seed"], True),  # 48-token windows, 256 positions
        (["--preset", "seed", "--context", "160"], False),  # the user serves 160 tokens: < 4 x 48
        (["--preset", "seed", "--context", "192"], True),
        (["--preset", "c8"], False),
    ],
)
def test_calibrate_warns_once_naming_c8_when_windows_are_far_shorter_than_serving(
    tmp_path: Path,
    use_model: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    warns: bool,
) -> None:
    """A seed calibrated on windows a quarter of the serving length or less (the tiny model's 256 positions,
    or ``--context``) is told, once, what will happen and what to use instead."""
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *options, "-o", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quantcache: warning:")]
    assert len(lines) == int(warns), lines
    if warns:
        assert "48-token windows" in lines[0] and "Use --preset c8" in lines[0]



def test_calibrate_to_an_explicit_file_name(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    out = tmp_path / "nested" / "scales.safetensors"
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file() and out.with_suffix(".md").is_file()


def test_calibrate_passes_model_options_to_the_loader(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    calls = use_model()
    arguments = ["--model", "some/model", "--device", "cpu", "--dtype", "bfloat16", "--cache-dir", str(tmp_path)]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments, "-o", str(tmp_path / "run")]) == 0
    (args,) = calls
    assert (args.model, args.device, args.dtype, args.cache_dir) == ("some/model", "cpu", "bfloat16", tmp_path)
    assert args.quiet is True


def test_calibrate_on_text_file_and_jsonl(tmp_path: Path, use_model: Callable[..., Any], corpus: Path) -> None:
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--text-file", str(corpus), "-o", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "kv_scales.json").read_text())
    assert "corpus.txt" in summary["data"]["source"]

    records = tmp_path / "chats.jsonl"
    lines = [json.dumps({"id": i, "content": corpus.read_text()[i * 300 : (i + 2) * 300]}) for i in range(5)]
    records.write_text("\n".join(lines) + "\n", encoding="utf-8")
    arguments = ["--jsonl", str(records), "--jsonl-field", "content"]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments, "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "kv_scales.safetensors").is_file()


def test_config_single_item_yaml(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    config = tmp_path / "kv.yaml"
    config.write_text(SINGLE_ITEM, encoding="utf-8")
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(config), "-o", str(tmp_path / "run")]) == 0
    stored = read_state_file(tmp_path / "run" / "kv_scales.safetensors")
    assert stored.config == KVQuantConfig.from_yaml(config)
    assert stored.config.key.symmetric is False
    assert {name.split(".")[1] for name in stored.tensors} == {"1"}


def test_config_full_msmodelslim_document(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    config = tmp_path / "w8a8_kv8.yaml"
    config.write_text(FULL_DOCUMENT, encoding="utf-8")
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(config), "-o", str(tmp_path / "run")]) == 0
    stored = read_state_file(tmp_path / "run" / "kv_scales.safetensors")
    assert stored.config.key.symmetric is False and stored.config.exclude == ("model.layers.0.self_attn",)
    assert {name.split(".")[1] for name in stored.tensors} == {"1"}


def test_explicit_flags_override_the_config(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    config = tmp_path / "w8a8_kv8.yaml"
    config.write_text(FULL_DOCUMENT, encoding="utf-8")
    arguments = ["--config", str(config), "--symmetric", "--exclude", "-o", str(tmp_path / "run")]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments]) == 0
    stored = read_state_file(tmp_path / "run" / "kv_scales.safetensors")
    assert stored.config.key.symmetric is True and stored.config.exclude == ()  # a bare --exclude clears the YAML's
    assert stored.config.key.scope.value == "per_channel"  # untouched keys keep the YAML's values

    arguments = ["--config", str(config), "--exclude", "model.layers.1.*", "--include", "model.layers.*"]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments, "-o", str(tmp_path / "other")]) == 0
    stored = read_state_file(tmp_path / "other" / "kv_scales.safetensors")
    assert stored.config.key.symmetric is False
    assert stored.config.include == ("model.layers.*",) and stored.config.exclude == ("model.layers.1.*",)
    assert {name.split(".")[1] for name in stored.tensors} == {"0"}


def test_unmatched_pattern_is_a_one_line_warning(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--exclude", "model.layers.9.self_atn", "-o", str(tmp_path / "run")]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quantcache: warning:")]
    assert any("model.layers.9.self_atn" in line for line in warnings)


# ---------------------------------------------------------------------------- evaluate
EVALUATION_KEYS = {
    "ppl_reference",
    "ppl_quantized",
    "ppl_relative_change",
    "kl_mean",
    "top1_agreement",
    "num_tokens",
    "layers",
    "settings",
    "effective_bits",
    "long_context",  # null: --context given
    "generation",  # null: --generate 0
    "notes",
}


@pytest.fixture(scope="module")
def expected_evaluation(calibrated: Path, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """What ``evaluate`` with EVALUATE_SMALL must report, computed through the library on the same windows."""
    documents = TextSource(kind="builtin", split="evaluation").load()
    windows = token_windows(tokenizer, documents, num_samples=2, seq_len=64, seed=0)
    cache = QuantizedCalibratingCache.from_file(calibrated / "kv_scales.safetensors", llama)
    result = evaluate(llama, cache, windows, prefill=32, chunk=16, progress=False)
    data: dict[str, Any] = json.loads(to_json(result))
    return data


def check_evaluation(data: dict[str, Any], expected: dict[str, Any]) -> None:
    """``data`` is the real evaluation: every metric key, the settings used, and the measured values."""
    assert set(data) == EVALUATION_KEYS
    assert data["num_tokens"] == expected["num_tokens"] == 2 * 63
    assert (data["settings"]["prefill"], data["settings"]["chunk"]) == (32, 16)
    assert (data["settings"]["num_windows"], data["settings"]["window_length"]) == (2, 64)
    assert [layer["name"] for layer in data["layers"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert data["ppl_reference"] > 1 and data["kl_mean"] >= 0 and 0 <= data["top1_agreement"] <= 1
    for key in ("ppl_reference", "ppl_quantized", "ppl_relative_change", "kl_mean", "top1_agreement"):
        assert data[key] == pytest.approx(expected[key], rel=1e-6), key
    for layer, reference in zip(data["layers"], expected["layers"], strict=True):
        assert (layer["index"], layer["name"], layer["quantized"]) == (
            reference["index"],
            reference["name"],
            reference["quantized"],
        )
        numbers = ("key_sqnr_db", "value_sqnr_db", "key_clip_fraction", "value_clip_fraction")
        assert [layer[key] for key in numbers] == pytest.approx([reference[key] for key in numbers], rel=1e-6)
    assert data["settings"] == expected["settings"]
    # seed INT8 at 64 tokens of 2 heads x 16 channels: 8-bit codes + a flag byte per 16 + fp32 scales per channel
    assert data["effective_bits"] == expected["effective_bits"] == pytest.approx(8 + 8 / 16 + 32 / 64)


def test_evaluate_prints_table_and_writes_json_and_markdown(
    tmp_path: Path,
    calibrated: Path,
    use_model: Callable[..., Any],
    expected_evaluation: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report_json, report_md = tmp_path / "eval.json", tmp_path / "out" / "eval.md"
    arguments = ["--scales", str(calibrated), "--json", str(report_json), "--markdown", str(report_md)]
    assert cli.main(["evaluate", *EVALUATE_ONLY, *arguments]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn" in printed or "layer" in printed.lower()
    data = json.loads(report_json.read_text())
    check_evaluation(data, expected_evaluation)
    ppl = f"{data['ppl_reference']:.4f}"
    assert ppl in printed
    markdown = report_md.read_text()
    assert markdown.startswith("# KV-cache quantization quality") and f"| PPL reference | {ppl} |" in markdown


def test_evaluate_json_to_stdout_keeps_stdout_pure(
    calibrated: Path,
    use_model: Callable[..., Any],
    expected_evaluation: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated), "--json", "-"]) == 0
    captured = capsys.readouterr()
    check_evaluation(json.loads(captured.out), expected_evaluation)
    assert f"{expected_evaluation['kl_mean']:.3e}" in captured.err  # the table went to stderr


def test_evaluate_writes_plot(tmp_path: Path, calibrated: Path, use_model: Callable[..., Any]) -> None:
    # matplotlib is a dev dependency: this test runs (it is not skipped) wherever the tests do.
    plot = tmp_path / "plots" / "layers.png"
    assert cli.main(["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [entry.name for entry in plot.parent.iterdir()] == ["layers.png"]  # no temporary file left


def test_evaluate_plot_without_matplotlib_fails_before_work(
    tmp_path: Path,
    calibrated: Path,
    use_model: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    calls = use_model()
    code = cli.main(["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated), "--plot", str(tmp_path / "p.png")])
    assert code == cli.EXIT_INPUT and not calls
    assert "matplotlib" in error_line(capsys.readouterr())


def test_scales_from_another_model_shape(
    calibrated: Path,
    use_model: Callable[..., Any],
    make_model: Callable[..., PreTrainedModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_model(make_model("llama", num_key_value_heads=4))
    assert cli.main(["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated)]) == cli.EXIT_INPUT
    assert "another model" in error_line(capsys.readouterr())

    use_model(make_model("llama", num_hidden_layers=3))
    assert cli.main(["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated)]) == cli.EXIT_INPUT
    assert "num_layers 2 vs 3" in error_line(capsys.readouterr())


# ---------------------------------------------------------------------------- inspect
def test_inspect_a_good_file(calibrated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = calibrated / "kv_scales.safetensors"
    assert cli.main(["inspect", str(state)]) == 0
    text = capsys.readouterr().out
    for expected in ("valid quantcache KV state", "quantcache.kv_state v2", "llama", "frozen", "int8 per_channel"):
        assert expected in text
    assert "model.layers.1.self_attn" in text and "outlier channels" in text

    assert cli.main(["inspect", str(calibrated), "--json", "--top", "2", "--outlier-factor", "1.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and report["num_layers"] == 2 and report["kv_heads"] == 2 and report["head_dim"] == 16
    assert report["mode"] == "frozen" and report["quantized_layers"] == [0, 1]
    assert report["quantcache_version"] == __version__
    for layer in report["layers"]:
        for stream in ("key", "value"):
            summary = layer[stream]
            assert len(summary["outliers"]) <= 2
            for outlier in summary["outliers"]:
                assert outlier["ratio"] > 1.5 and 0 <= outlier["kv_head"] < 2 and 0 <= outlier["channel"] < 16


def test_outlier_channels_are_found(tmp_path: Path, calibrated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = read_state_file(calibrated / "kv_scales.safetensors")
    tensors = {name: tensor.clone() for name, tensor in stored.tensors.items()}
    tensors["layers.1.key.min"][1, 5] = -500.0
    tensors["layers.1.key.max"][1, 5] = 500.0
    # parameters must follow the statistics, or the state is refused as altered
    params = compute_qparams(tensors["layers.1.key.min"], tensors["layers.1.key.max"], symmetric=True)
    tensors["layers.1.key.scale"], tensors["layers.1.key.zero_point"] = params.scale, params.zero_point
    state = tmp_path / "outlier.safetensors"
    write_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state), "--json"]) == 0
    outliers = json.loads(capsys.readouterr().out)["layers"][1]["key"]["outliers"]
    assert outliers[0]["kv_head"] == 1 and outliers[0]["channel"] == 5 and outliers[0]["range"] == 1000.0
    assert cli.main(["inspect", str(state)]) == 0
    assert "layer   1 key    head 1 ch 5" in capsys.readouterr().out


def _with_tensors(stored: Any, tensors: dict[str, torch.Tensor]) -> Any:
    from dataclasses import replace

    return replace(stored, tensors=tensors)


def test_inspect_a_corrupted_file(tmp_path: Path, calibrated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (calibrated / "kv_scales.safetensors").read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    assert cli.main(["inspect", str(broken)]) == cli.EXIT_INPUT
    assert "broken.safetensors" in error_line(capsys.readouterr())

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert cli.main(["inspect", str(garbage), "--json"]) == cli.EXIT_INPUT
    error_line(capsys.readouterr())

    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == cli.EXIT_INPUT
    assert "not found" in error_line(capsys.readouterr())


def test_inspect_rejects_inconsistent_tensors(
    tmp_path: Path, calibrated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = read_state_file(calibrated / "kv_scales.safetensors")
    tensors = {name: tensor.clone() for name, tensor in stored.tensors.items()}
    tensors["layers.0.value.min"][0, 0] = tensors["layers.0.value.max"][0, 0] + 1.0
    state = tmp_path / "swapped.safetensors"
    forge_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    assert "min > max" in error_line(capsys.readouterr())

    tensors = {name: tensor for name, tensor in stored.tensors.items() if name != "layers.1.key.scale"}
    forge_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    assert "layer 1 key lacks scale" in error_line(capsys.readouterr())


def _add(name: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensor

    return mutate


def _set(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][0, 0] = value

    return mutate


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return mutate


def _clear(tensors: dict[str, torch.Tensor]) -> None:
    tensors.clear()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_add("layers.0.key.absmax", torch.ones(2, 16)), "unexpected tensor 'layers.0.key.absmax'"),
        (_add("layers.7.key.min", torch.zeros(2, 16)), "layer 7 is beyond the model's 2 layers"),
        (_add("layers.0.key.min", torch.zeros(2, 8)), "but this model's (kv_heads, head_dim) is (2, 16)"),
        (_set("layers.0.key.max", math.nan), "layers.0.key.max contains NaN or Inf"),
        (_set("layers.1.value.scale", math.inf), "layers.1.value.scale contains NaN or Inf"),
        (_clear, "the state holds no layer"),
        (_drop("layers.1.key.scale"), "layer 1 key lacks scale"),
        (_drop("layers.0.value.zero_point"), "layer 0 value lacks zero_point"),
        (_set("layers.0.key.min", 1e6), "layers.0.key: min > max"),
        (_set("layers.1.key.scale", 0.0), "layers.1.key.scale holds zero, negative"),
        (_set("layers.1.value.scale", -1.0), "layers.1.value.scale holds zero, negative"),
    ],
)
def test_inspect_refuses_each_kind_of_bad_tensor(
    mutate: Callable[[dict[str, torch.Tensor]], None],
    message: str,
    tmp_path: Path,
    calibrated: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stored = read_state_file(calibrated / "kv_scales.safetensors")
    tensors = {name: tensor.clone() for name, tensor in stored.tensors.items()}
    mutate(tensors)
    state = tmp_path / "bad.safetensors"
    forge_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert "invalid state" in line and message in line


def test_inspect_refuses_tensors_of_a_layer_the_config_does_not_quantize(
    tmp_path: Path, calibrated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    stored = read_state_file(calibrated / "kv_scales.safetensors")
    config = replace(stored.config, exclude=("model.layers.1.self_attn",))
    state = tmp_path / "excluded.safetensors"
    forge_state_file(state, replace(stored, config=config))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    assert "layer 1 (model.layers.1.self_attn) has tensors but the stored config does not quantize it" in error_line(
        capsys.readouterr()
    )


def test_inspect_refuses_streams_whose_tensors_disagree_in_shape(
    tmp_path: Path, calibrated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    stored = read_state_file(calibrated / "kv_scales.safetensors")
    tensors = {name: tensor.clone() for name, tensor in stored.tensors.items()}
    tensors["layers.0.value.scale"] = torch.ones(4, 8)
    state = tmp_path / "ragged.safetensors"  # without a recorded shape only agreement can be checked
    forge_state_file(state, replace(stored, tensors=tensors, kv_heads=None, head_dim=None))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    assert "layers.0.value tensors have shapes" in error_line(capsys.readouterr())


NO_LAYER_1 = "quantized layers [1] (model.layers.1.self_attn ...) have no tensors"


@pytest.mark.parametrize(
    ("keep", "mode", "message"),
    [
        (tuple(f"layers.0.{s}.{f}" for s in ("key", "value") for f in ("min", "max")), "calibrate", NO_LAYER_1),
        (("layers.0.",), "frozen", NO_LAYER_1),
        ((".scale", ".zero_point"), "frozen", "layers.0.key: frozen parameters without the statistics"),
    ],
    ids=["calibrating state that saw layer 0 only", "frozen state of layer 0 only", "calibrated without statistics"],
)
def test_inspect_judges_a_state_as_writing_and_loading_do(
    keep: tuple[str, ...],
    mode: str,
    message: str,
    tmp_path: Path,
    calibrated: Path,
    llama: PreTrainedModel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What inspect calls valid a cache loads, and what a cache refuses neither inspect nor the writer accepts."""
    from dataclasses import replace

    stored = read_state_file(calibrated / "kv_scales.safetensors")
    kept = {name: t for name, t in stored.tensors.items() if name.startswith(keep) or name.endswith(keep)}
    state = replace(stored, tensors=kept, mode=mode)
    path = forge_state_file(tmp_path / "forged.safetensors", state)
    assert cli.main(["inspect", str(path)]) == cli.EXIT_INPUT
    assert message in error_line(capsys.readouterr())
    with pytest.raises(QuantStateError, match=re.escape(message)):
        QuantizedCalibratingCache.from_file(path, llama)
    with pytest.raises(QuantStateError, match=re.escape(message)):
        write_state_file(tmp_path / "written.safetensors", state)
    assert not (tmp_path / "written.safetensors").exists()


def test_inspect_counts_further_problems(tmp_path: Path, calibrated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = read_state_file(calibrated / "kv_scales.safetensors")
    tensors = {name: tensor for name, tensor in stored.tensors.items() if not name.endswith(".scale")}
    state = tmp_path / "unscaled.safetensors"
    forge_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert "layer 0 key lacks scale" in line and "(and 1 more)" in line


# ---------------------------------------------------------------------------- suggest-exclude
def test_suggest_exclude_writes_yaml_that_calibrate_reads(
    tmp_path: Path, calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    suggested = tmp_path / "suggested.yaml"
    arguments = ["--scales", str(calibrated), "-o", str(suggested)]
    assert cli.main(["suggest-exclude", *EVALUATE_SMALL, *arguments, "--kl-budget", "1e-12"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn" in printed and "model.layers.1.self_attn" in printed
    assert set(KVQuantConfig.from_yaml(suggested).exclude) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}

    # A budget just under the all-quantized KL: excluding the most sensitive layer is enough.
    kl_all = float(re.search(r"KL, all quantized:\s+(\S+)", printed).group(1))  # type: ignore[union-attr]
    budget = f"{kl_all * 0.999:.6e}"
    assert cli.main(["suggest-exclude", *EVALUATE_SMALL, *arguments, "--kl-budget", budget, "--force"]) == 0
    config = KVQuantConfig.from_yaml(suggested)
    assert len(config.exclude) == 1 and config.key.symmetric is True
    assert suggested.read_text().startswith("# KV-cache quantization config suggested by quantcache")

    out = tmp_path / "run"
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(suggested), "-o", str(out)]) == 0
    stored = read_state_file(out / "kv_scales.safetensors")
    assert stored.config == config and len({name.split(".")[1] for name in stored.tensors}) == 1


def test_suggest_exclude_needs_a_budget(calibrated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["suggest-exclude", "--scales", str(calibrated)]) == cli.EXIT_USAGE
    assert "--kl-budget" in capsys.readouterr().err
    assert cli.main(["suggest-exclude", "--scales", str(calibrated), "--kl-budget", "-1"]) == cli.EXIT_USAGE


# ---------------------------------------------------------------------------- errors
def test_missing_text_file(tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    calls = use_model()
    missing = tmp_path / "nope.txt"
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--text-file", str(missing), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT
    assert "nope.txt" in error_line(capsys.readouterr())
    assert not calls  # failed before loading the model


def test_bad_config_key_is_named(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kv.yaml"
    config.write_text(SINGLE_ITEM.replace("method:", "granularity:"), encoding="utf-8")
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(config), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT
    assert "qconfig.granularity" in error_line(capsys.readouterr())

    code = cli.main(["calibrate", "--config", str(tmp_path / "absent.yaml"), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT
    assert "absent.yaml" in error_line(capsys.readouterr())


def test_everything_excluded_is_an_input_error(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--exclude", "*", "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT
    assert "no layer is selected" in error_line(capsys.readouterr())


def test_output_must_be_safetensors(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "scales.json")])
    assert code == cli.EXIT_INPUT
    assert ".safetensors" in error_line(capsys.readouterr())


def test_model_fetch_error_exits_4(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    use_model(error=ModelFetchError("cannot reach the package index to fetch smollm2-135m: connection refused"))
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == cli.EXIT_FETCH
    assert "package index" in error_line(capsys.readouterr())
    assert not (tmp_path / "run").exists()


def test_internal_error_exits_1_with_a_hint_and_verbose_shows_the_traceback(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    use_model(error=ZeroDivisionError("boom"))
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == cli.EXIT_INTERNAL
    line = error_line(capsys.readouterr())
    assert "ZeroDivisionError: boom" in line and "-v" in line

    assert cli.main(["-v", "calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("quantcache: error:")


def test_model_that_names_nothing_is_an_input_error(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    calls = use_model()
    for model in ("no-such-model", str(tmp_path / "missing.gguf")):
        code = cli.main(["calibrate", *CALIBRATE_SMALL, "--model", model, "-o", str(tmp_path / "run")])
        assert code == cli.EXIT_INPUT
        assert model in error_line(capsys.readouterr())
    assert not calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    calls = use_model()
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--device", "cuda", "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT and not calls
    assert "CUDA is not available" in error_line(capsys.readouterr())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["calibrate"], "-o"),
        (["calibrate", "-o", "x", "--samples", "0"], "--samples"),
        (["calibrate", "-o", "x", "--dtype", "int8"], "--kv-dtype"),
        (["calibrate", "-o", "x", "--jsonl-field", "text"], "--jsonl"),
        (["calibrate", "-o", "x", "--text-file", "a", "--dataset", "wikitext2"], "not allowed"),
        (["evaluate", "--scales", "x", "--context", "64", "--prefill", "64"], "--prefill"),
        (["evaluate", "--scales", "x", "--device", "warp-drive"], "--device"),
        (["frobnicate"], "invalid choice"),
        ([], "COMMAND"),
    ],
)
def test_usage_errors_exit_2(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(arguments) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------- exit codes
def test_ctrl_c_exits_130(tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    use_model(error=KeyboardInterrupt())
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == 130 == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "quantcache: interrupted"
    assert not (tmp_path / "run").exists()


def test_an_os_error_exits_3_naming_the_file(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    use_model(error=PermissionError(13, "Permission denied", "/models/weights.safetensors"))
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == 3 == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert line == "quantcache: error: Permission denied: /models/weights.safetensors"


def test_a_missing_optional_dependency_exits_3_with_the_install_command(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    use_model(error=ModuleNotFoundError("No module named 'datasets'", name="datasets"))
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == 3 == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert "missing optional dependency 'datasets'" in line and "pip install 'quantcache[datasets]'" in line
    assert "bug" not in line


def test_a_project_error_exits_with_the_code_it_carries(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    class Unreachable(QuantcacheError):
        exit_code = 4

    use_model(error=Unreachable("the mirror is down"))
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == 4
    assert error_line(capsys.readouterr()) == "quantcache: error: the mirror is down"


def test_evaluate_refuses_a_state_saved_before_freeze(
    tmp_path: Path,
    llama: PreTrainedModel,
    use_model: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    windows = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    state = calibrate(llama, windows, freeze=False, progress=False).save(tmp_path / "statistics.safetensors")
    assert read_state_file(state).mode == "calibrate"
    calls = use_model()
    for command in (["evaluate"], ["suggest-exclude", "--kl-budget", "1e-3"]):
        assert cli.main([*command, *EVALUATE_SMALL, "--scales", str(state)]) == cli.EXIT_INPUT
        line = error_line(capsys.readouterr())
        assert "statistics.safetensors" in line and "before freeze()" in line and "mode 'calibrate'" in line
    assert not calls  # refused before the model loads


def test_asymmetric_flag_reaches_the_saved_state(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--asymmetric", "-o", str(tmp_path / "asym")]) == 0
    stored = read_state_file(tmp_path / "asym" / "kv_scales.safetensors")
    assert stored.config.key.symmetric is False
    assert any(bool(tensor.ne(0).any()) for name, tensor in stored.tensors.items() if name.endswith("zero_point"))
    summary = json.loads((tmp_path / "asym" / "kv_scales.json").read_text())
    assert summary["config"]["qconfig"]["symmetric"] is False
    assert "asymmetric" in (tmp_path / "asym" / "kv_scales.md").read_text()

    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "sym")]) == 0
    stored = read_state_file(tmp_path / "sym" / "kv_scales.safetensors")
    assert stored.config.key.symmetric is True
    assert all(not tensor.any() for name, tensor in stored.tensors.items() if name.endswith("zero_point"))


# ---------------------------------------------------------------------------- files that are not what they seem
def test_a_config_that_is_not_utf8_exits_3(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kv.yaml"
    config.write_bytes(SINGLE_ITEM.replace("per_channel", "per_channel # d\u00e9j\u00e0").encode("latin-1"))
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(config), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert re.search(r"config file .*kv\.yaml is not UTF-8 text \(undecodable byte at line 3", line)


@pytest.mark.parametrize("option", ["--config", "--text-file"])
def test_a_directory_or_a_link_loop_is_named_for_what_it_is(
    option: str, tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    calls = use_model()
    folder = tmp_path / "folder"
    folder.mkdir()
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    for path, expected in ((folder, "is a directory"), (loop, "is a symbolic link loop")):
        code = cli.main(["calibrate", *CALIBRATE_SMALL, option, str(path), "-o", str(tmp_path / "run")])
        assert code == cli.EXIT_INPUT
        line = error_line(capsys.readouterr())
        assert expected in line and str(path) in line and "not found" not in line
    assert not calls


def test_inspect_names_a_link_loop_and_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert cli.main(["inspect", str(loop)]) == cli.EXIT_INPUT
    assert "is a symbolic link loop" in error_line(capsys.readouterr())
    (tmp_path / "run" / "kv_scales.safetensors").mkdir(parents=True)
    assert cli.main(["inspect", str(tmp_path / "run")]) == cli.EXIT_INPUT
    assert "kv_scales.safetensors is a directory" in error_line(capsys.readouterr())


def test_random_bytes_as_a_gguf_model_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(bytes(range(256)) * 16)
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--model", str(model), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_FETCH
    line = error_line(capsys.readouterr())
    assert f"could not load GGUF file {model}" in line and "bug" not in line


def test_a_truncated_gguf_model_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from gguf import GGUFWriter

    whole = tmp_path / "whole.gguf"
    writer = GGUFWriter(str(whole), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = tmp_path / "cut" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(whole.read_bytes()[:-300])
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--model", str(model), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_FETCH
    assert "truncated or corrupted" in error_line(capsys.readouterr())


def test_a_model_directory_without_model_type_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}', encoding="utf-8")
    code = cli.main(["calibrate", *CALIBRATE_SMALL, "--model", str(model), "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_FETCH
    assert "model_type" in error_line(capsys.readouterr())


# ---------------------------------------------------------------------------- outputs
@pytest.fixture
def read_only_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory nobody may create files in. Root ignores file modes, so for root the
    kernel's answer to the permission check is given here as an unprivileged user would get it."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        real_access = os.access

        def access(path: Any, mode: int, **kwargs: Any) -> bool:
            inside = Path(path) == folder or folder in Path(path).parents
            return False if inside and mode & os.W_OK else real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["calibrate", *CALIBRATE_SMALL, "-o", "{dir}/run"], "-o"),
        (["evaluate", *EVALUATE_ONLY, "--scales", "{scales}", "--json", "{dir}/eval.json"], "--json"),
        (["evaluate", *EVALUATE_ONLY, "--scales", "{scales}", "--markdown", "{dir}/eval.md"], "--markdown"),
        (["evaluate", *EVALUATE_ONLY, "--scales", "{scales}", "--plot", "{dir}/p/layers.png"], "--plot"),
        (["suggest-exclude", *EVALUATE_SMALL, "--scales", "{scales}", "--kl-budget", "1", "-o", "{dir}/s.yaml"], "-o"),
    ],
)
def test_an_unwritable_output_is_refused_before_any_work(
    command: list[str],
    option: str,
    read_only_dir: Path,
    calibrated: Path,
    use_model: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = use_model()
    arguments = [part.format(dir=read_only_dir, scales=calibrated) for part in command]
    assert cli.main(arguments) == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert line.startswith(f"quantcache: error: {option} {read_only_dir}/")
    assert f"cannot write into {read_only_dir}" in line
    assert not calls  # neither the model nor the data was touched


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_on_a_file_system_that_takes_no_files_is_refused_even_for_root(
    calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    calls = use_model()
    arguments = ["--scales", str(calibrated), "--json", "/proc/quantcache-test/eval.json"]
    assert cli.main(["evaluate", *EVALUATE_ONLY, *arguments]) == cli.EXIT_INPUT
    assert "cannot write into /proc" in error_line(capsys.readouterr())
    assert not calls


def test_an_output_that_is_a_directory_is_refused_before_any_work(
    tmp_path: Path, calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    calls = use_model()
    code = cli.main(["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated), "--json", str(tmp_path)])
    assert code == cli.EXIT_INPUT and not calls
    assert "is a directory" in error_line(capsys.readouterr())


def test_json_and_markdown_both_to_stdout_is_a_usage_error(
    calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    calls = use_model()
    arguments = ["--scales", str(calibrated), "--json", "-", "--markdown", "-"]
    assert cli.main(["evaluate", *EVALUATE_ONLY, *arguments]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: quantcache evaluate") and "would both write to stdout" in err
    assert not calls


def test_seq_len_beyond_the_models_positions_is_refused_before_running(
    tmp_path: Path, use_model: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("calibration must not start")

    monkeypatch.setattr("quantcache.calibration.calibrate", never)
    code = cli.main(["calibrate", "--samples", "1", "--seq-len", "257", "-q", "-o", str(tmp_path / "run")])
    assert code == cli.EXIT_INPUT
    line = error_line(capsys.readouterr())
    assert "--seq-len 257" in line and "256 positions" in line and "max_position_embeddings" in line
    assert not (tmp_path / "run").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_calibrate_and_report_outputs_respect_the_umask(
    mask: int, tmp_path: Path, calibrated: Path, use_model: Callable[..., Any]
) -> None:
    reports = tmp_path / "reports"
    evaluate = ["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated)]
    previous = os.umask(mask)
    try:
        assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(tmp_path / "run")]) == 0
        outputs = [f"--{kind}={reports / name}" for kind, name in (("json", "e.json"), ("markdown", "e.md"))]
        assert cli.main([*evaluate, *outputs, "--plot", str(reports / "p.png")]) == 0
        arguments = ["--scales", str(calibrated), "--kl-budget", "1", "-o", str(reports / "s.yaml")]
        assert cli.main(["suggest-exclude", *EVALUATE_SMALL, *arguments]) == 0
    finally:
        os.umask(previous)
    for directory, names in (
        (tmp_path / "run", ["kv_scales.json", "kv_scales.md", "kv_scales.safetensors"]),
        (reports, ["e.json", "e.md", "p.png", "s.yaml"]),
    ):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~mask
        assert sorted(path.name for path in directory.iterdir()) == names  # no staging or temporary file left
        for name in names:
            assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert sorted(path.name for path in tmp_path.iterdir()) == ["reports", "run"]


@pytest.mark.parametrize("failure", ["OSError", "SafetensorError"])
def test_a_full_disk_during_calibrate_exits_3_and_leaves_no_partial_run(
    failure: str,
    tmp_path: Path,
    use_model: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors import SafetensorError

    def full(tensors: Any, path: str, metadata: Any = None) -> None:
        Path(path).write_bytes(b"\0" * 100)  # a first part made it to disk
        if failure == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr("quantcache.state.file.save_file", full)
    for out in (tmp_path / "new", tmp_path / "existing"):
        if out.name == "existing":
            out.mkdir()
            (out / "eval.json").write_text("{}")
        assert cli.main(["calibrate", *CALIBRATE_SMALL, "--force", "-o", str(out)]) == cli.EXIT_INPUT
        assert error_line(capsys.readouterr()) == (
            f"quantcache: error: cannot write the output set of {out / 'kv_scales.safetensors'}: No space left on "
            "device; free space on that file system or write somewhere else (the destination was left as it was)"
        )
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["eval.json", "existing"]


def test_an_interrupted_calibrate_leaves_the_previous_set_untouched(
    tmp_path: Path, use_model: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(out)]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def interrupted(summary: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("quantcache.analysis.state_report.calibration_markdown", interrupted)
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--asymmetric", "--force", "-o", str(out)]) == cli.EXIT_INTERRUPTED
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert read_state_file(out / "kv_scales.safetensors").config.key.symmetric is True


REPLACING = "exists and is not empty; choose another path or pass --force to replace it"


@pytest.mark.parametrize(
    ("command", "option", "existing"),
    [
        (["calibrate", *CALIBRATE_SMALL, "-o", "{dir}/run"], "-o", "run/kv_scales.safetensors"),
        (["calibrate", *CALIBRATE_SMALL, "-o", "{dir}/run"], "-o", "run/kv_scales.md"),
        (["calibrate", *CALIBRATE_SMALL, "-o", "{dir}/kv.safetensors"], "-o", "kv.json"),
        (["evaluate", *EVALUATE_ONLY, "--scales", "{scales}", "--json", "{dir}/eval.json"], "--json", "eval.json"),
        (["evaluate", *EVALUATE_ONLY, "--scales", "{scales}", "--markdown", "{dir}/e.md"], "--markdown", "e.md"),
        (["evaluate", *EVALUATE_ONLY, "--scales", "{scales}", "--plot", "{dir}/p.png"], "--plot", "p.png"),
        (
            ["suggest-exclude", *EVALUATE_SMALL, "--scales", "{scales}", "--kl-budget", "1", "-o", "{dir}/s.yaml"],
            "-o",
            "s.yaml",
        ),
        (["suggest-bits", *EVALUATE_SMALL, "--budget", "4", "-o", "{dir}/b.yaml"], "-o", "b.yaml"),
        (["suggest-bits", *EVALUATE_SMALL, "--budget", "4", "--json", "{dir}/b.json"], "--json", "b.json"),
    ],
)
def test_every_command_refuses_to_replace_an_existing_output_without_force(
    command: list[str],
    option: str,
    existing: str,
    tmp_path: Path,
    calibrated: Path,
    use_model: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One rule, one message: an earlier result is never replaced without a word (export and import: see
    tests/test_export_cli.py)."""
    calls = use_model()
    arguments = [part.format(dir=tmp_path, scales=calibrated) for part in command]
    old = tmp_path / existing
    old.parent.mkdir(exist_ok=True)
    old.write_text("an earlier result")
    assert cli.main(arguments) == cli.EXIT_INPUT
    value = arguments[arguments.index(option) + 1]
    where = "" if Path(value) == old else f"{old} "
    assert error_line(capsys.readouterr()) == f"quantcache: error: {option} {value}: {where}{REPLACING}"
    assert not calls and old.read_text() == "an earlier result"  # refused before the model loaded


def test_force_replaces_and_empty_outputs_need_no_force(
    tmp_path: Path, calibrated: Path, use_model: Callable[..., Any]
) -> None:
    out = tmp_path / "run"
    out.mkdir()  # an empty directory holds nothing to lose
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(out)]) == 0
    first = (out / "kv_scales.json").read_text()
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "-o", str(out)]) == cli.EXIT_INPUT
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--seed", "1", "--force", "-o", str(out)]) == 0
    assert (out / "kv_scales.json").read_text() != first
    report = tmp_path / "eval.json"
    report.touch()  # an empty file (mktemp's) is not an earlier result
    arguments = ["evaluate", *EVALUATE_ONLY, "--scales", str(calibrated), "--json", str(report)]
    assert cli.main(arguments) == 0 and json.loads(report.read_text())["num_tokens"] == 126
    assert cli.main(arguments) == cli.EXIT_INPUT
    assert cli.main([*arguments, "--force"]) == 0


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_umask_permissions_whatever_their_writer_chose(mask: int, tmp_path: Path) -> None:
    """safetensors and tempfile create 0600 files: the output takes the permissions the umask gives new files."""
    from quantcache.cli import _output

    def private(path: Path) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    previous = os.umask(mask)
    try:
        single = _output.write_with(tmp_path / "report.json", private)
        files = _output.write_file_set(tmp_path / "run", "kv.json", lambda staging: private(staging / "kv.json"))
    finally:
        os.umask(previous)
    for path in (single, *files):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~mask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json", "run"]


def test_an_output_set_never_pairs_a_new_state_with_an_old_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantcache.cli import _output

    out = tmp_path / "run"
    out.mkdir()
    for name in ("kv.safetensors", "kv.json", "kv.md", "eval.json"):
        (out / name).write_text(f"old {name}")

    def write(staging: Path) -> None:
        for name in ("kv.safetensors", "kv.json", "kv.md"):
            (staging / name).write_text(f"new {name}")

    real_replace = os.replace
    moved: list[str] = []

    def replace_then_stop(source: Any, target: Any) -> None:
        if moved:
            raise KeyboardInterrupt  # interrupted right after the state moved in
        real_replace(source, target)
        moved.append(Path(target).name)

    monkeypatch.setattr(_output.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _output.write_file_set(out, "kv.safetensors", write)
    assert moved == ["kv.safetensors"]
    contents = {path.name: path.read_text() for path in out.iterdir()}
    assert contents == {"kv.safetensors": "new kv.safetensors", "eval.json": "old eval.json"}

    monkeypatch.setattr(_output.os, "replace", real_replace)
    paths = _output.write_file_set(out, "kv.safetensors", write)
    assert [path.name for path in paths] == ["kv.json", "kv.md", "kv.safetensors"]
    assert {path.name: path.read_text() for path in out.iterdir()} == {
        "kv.safetensors": "new kv.safetensors",
        "kv.json": "new kv.json",
        "kv.md": "new kv.md",
        "eval.json": "old eval.json",
    }


def test_progress_in_a_log_is_plain_lines(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["calibrate", "--samples", "2", "--seq-len", "48", "-o", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("calibrate: ")]
    assert 1 <= len(progress) <= 11 and progress[-1].startswith("calibrate: 100% 96.0/96.0 tok")


# ---------------------------------------------------------------------------- help and entry point
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples" in text and f"quantcache {command}" in text and "exit codes" in text


def test_top_level_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples" in text and all(command in text for command in SUBCOMMANDS)
    for code in ("0", "1", "2", "3", "4"):
        assert f"\n  {code} " in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"quantcache {__version__}")


def test_python_dash_m_entry_point() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "quantcache", "--help"], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "calibrate" in completed.stdout and "exit codes" in completed.stdout


HELP_WITHOUT_TORCH = """
import contextlib, io, sys
import quantcache.cli as cli
cli.build_parser()  # every command's options
with contextlib.redirect_stdout(io.StringIO()):
    codes = [cli.main(["--help"])] + [cli.main([name, "--help"]) for name in cli.COMMANDS]
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "safetensors"))
print(codes, heavy)
"""


def test_help_imports_neither_torch_nor_transformers() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"{[0] * (len(cli.COMMANDS) + 1)} []"


def test_every_command_in_the_table_has_a_parser_and_a_runner() -> None:
    assert set(SUBCOMMANDS) <= set(cli.COMMANDS)
    parser = cli.build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert list(subparsers.choices) == list(cli.COMMANDS)
    for name in cli.COMMANDS:
        module = cli.command_module(name)
        assert callable(module.add_parser) and callable(module.run)
        assert subparsers.choices[name].prog == f"quantcache {name}"


# ---------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_default_model_calibrate_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["calibrate", "--samples", "2", "--seq-len", "64", "-q", "--device", "cpu", "-o", str(out)]) == 0
    assert (out / "kv_scales.safetensors").is_file()
    arguments = ["--samples", "1", "--context", "128", "--prefill", "64", "-q", "--device", "cpu"]
    assert cli.main(["evaluate", "--scales", str(out), *arguments, "--json", str(tmp_path / "eval.json")]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data) == EVALUATION_KEYS and data["num_tokens"] == 127 and len(data["layers"]) == 30
    # measured: 2 x 64 calibration tokens of the built-in corpus, one 128-token window evaluated
    assert data["ppl_reference"] == pytest.approx(11.21538, rel=1e-4)
    assert data["kl_mean"] == pytest.approx(2.1056e-2, rel=0.02)
    assert data["top1_agreement"] == pytest.approx(118 / 127, abs=1.5 / 127)  # one token may flip on another CPU
    assert cli.main(["inspect", str(out)]) == 0
    assert "llama" in capsys.readouterr().out


@pytest.mark.parametrize("force", [False, True])
def test_an_output_that_is_a_device_is_refused_even_with_force(force: bool, tmp_path: Path) -> None:
    """Outputs are renamed over their destination: over /dev/null that would replace the device node itself."""
    from quantcache.cli._common import refuse_existing

    with pytest.raises(InputError, match=r"--json /dev/null: /dev/null is not a regular file or directory"):
        refuse_existing("--json", "/dev/null", [Path("/dev/null")], force=force)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="a device or a pipe"):
        refuse_existing("-o", fifo, [fifo], force=force)
    refuse_existing("-o", tmp_path / "new", [tmp_path / "new"], force=force)  # a path to create passes
