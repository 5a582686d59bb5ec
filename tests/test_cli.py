"""The ``quantcache`` command line, run in-process on a tiny offline model.

``quantcache.cli._load_model`` is replaced by a loader that returns the session's tiny
random Llama and a character-level tokenizer built with ``tokenizers`` (no download),
so every command runs end to end in well under a second. One test starts the real
entry point in a subprocess; one ``slow`` test runs the real default model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from quantcache import KVQuantConfig, QuantizedCalibratingCache, __version__, cli
from quantcache.models import ModelFetchError
from quantcache.serialization import read_state_file, write_state_file

CALIBRATE_SMALL = ["--samples", "2", "--seq-len", "48", "-q"]
EVALUATE_SMALL = ["--samples", "2", "--context", "64", "--prefill", "32", "--chunk", "16", "-q"]
SUBCOMMANDS = ["calibrate", "evaluate", "inspect", "suggest-exclude"]

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

        monkeypatch.setattr(cli, "_load_model", load)
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
        patch.setattr(cli, "_load_model", lambda args: (llama, tokenizer))
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
def test_calibrate_writes_state_and_summaries_that_reload(
    tmp_path: Path, use_model: Callable[..., Any], llama: PreTrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
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
    assert [layer["index"] for layer in summary["layers"]] == [0, 1]
    key = summary["layers"][0]["key"]
    assert key["min"] <= key["max"] and key["median_channel_range"] > 0
    assert summary["seconds"]["calibrate"] >= 0
    markdown = (out / "kv_scales.md").read_text()
    assert "| layer | module |" in markdown and "model.layers.1.self_attn" in markdown

    printed = capsys.readouterr().out
    assert "calibrated 2/2 layers" in printed and str(state) in printed


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
    assert stored.config.symmetric is False
    assert {name.split(".")[1] for name in stored.tensors} == {"1"}


def test_config_full_msmodelslim_document(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    config = tmp_path / "w8a8_kv8.yaml"
    config.write_text(FULL_DOCUMENT, encoding="utf-8")
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(config), "-o", str(tmp_path / "run")]) == 0
    stored = read_state_file(tmp_path / "run" / "kv_scales.safetensors")
    assert stored.config.symmetric is False and stored.config.exclude == ("model.layers.0.self_attn",)
    assert {name.split(".")[1] for name in stored.tensors} == {"1"}


def test_explicit_flags_override_the_config(tmp_path: Path, use_model: Callable[..., Any]) -> None:
    config = tmp_path / "w8a8_kv8.yaml"
    config.write_text(FULL_DOCUMENT, encoding="utf-8")
    arguments = ["--config", str(config), "--symmetric", "--exclude", "-o", str(tmp_path / "run")]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments]) == 0
    stored = read_state_file(tmp_path / "run" / "kv_scales.safetensors")
    assert stored.config.symmetric is True and stored.config.exclude == ()  # a bare --exclude clears the YAML's
    assert stored.config.scope.value == "per_channel"  # untouched keys keep the YAML's values

    arguments = ["--config", str(config), "--exclude", "model.layers.1.*", "--include", "model.layers.*"]
    assert cli.main(["calibrate", *CALIBRATE_SMALL, *arguments, "-o", str(tmp_path / "other")]) == 0
    stored = read_state_file(tmp_path / "other" / "kv_scales.safetensors")
    assert stored.config.symmetric is False
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
def test_evaluate_prints_table_and_writes_json_and_markdown(
    tmp_path: Path, calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report_json, report_md = tmp_path / "eval.json", tmp_path / "out" / "eval.md"
    arguments = ["--scales", str(calibrated), "--json", str(report_json), "--markdown", str(report_md)]
    assert cli.main(["evaluate", *EVALUATE_SMALL, *arguments]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn" in printed or "layer" in printed.lower()
    data = json.loads(report_json.read_text())
    assert isinstance(data, dict) and data
    assert report_md.read_text().strip()


def test_evaluate_json_to_stdout_keeps_stdout_pure(
    calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["evaluate", *EVALUATE_SMALL, "--scales", str(calibrated), "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert isinstance(json.loads(captured.out), dict)
    assert captured.err.strip()  # the table went to stderr


def test_evaluate_writes_plot(tmp_path: Path, calibrated: Path, use_model: Callable[..., Any]) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "layers.png"
    assert cli.main(["evaluate", *EVALUATE_SMALL, "--scales", str(calibrated), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_evaluate_plot_without_matplotlib_fails_before_work(
    tmp_path: Path, calibrated: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    calls = use_model()
    code = cli.main(["evaluate", *EVALUATE_SMALL, "--scales", str(calibrated), "--plot", str(tmp_path / "p.png")])
    assert code == cli.EXIT_INPUT and not calls
    assert "matplotlib" in error_line(capsys.readouterr())


def test_scales_from_another_model_shape(
    calibrated: Path,
    use_model: Callable[..., Any],
    make_model: Callable[..., PreTrainedModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_model(make_model("llama", num_key_value_heads=4))
    assert cli.main(["evaluate", *EVALUATE_SMALL, "--scales", str(calibrated)]) == cli.EXIT_INPUT
    assert "another model" in error_line(capsys.readouterr())

    use_model(make_model("llama", num_hidden_layers=3))
    assert cli.main(["evaluate", *EVALUATE_SMALL, "--scales", str(calibrated)]) == cli.EXIT_INPUT
    assert "num_layers 2 vs 3" in error_line(capsys.readouterr())


# ---------------------------------------------------------------------------- inspect
def test_inspect_a_good_file(calibrated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = calibrated / "kv_scales.safetensors"
    assert cli.main(["inspect", str(state)]) == 0
    text = capsys.readouterr().out
    for expected in ("valid quantcache KV state", "quantcache.kv_state v1", "llama", "frozen", "int8 per_channel"):
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
    write_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    assert "min > max" in error_line(capsys.readouterr())

    tensors = {name: tensor for name, tensor in stored.tensors.items() if name != "layers.1.key.scale"}
    write_state_file(state, _with_tensors(stored, tensors))
    assert cli.main(["inspect", str(state)]) == cli.EXIT_INPUT
    assert "layer 1 key lacks scale" in error_line(capsys.readouterr())


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
    assert cli.main(["suggest-exclude", *EVALUATE_SMALL, *arguments, "--kl-budget", budget]) == 0
    config = KVQuantConfig.from_yaml(suggested)
    assert len(config.exclude) == 1 and config.symmetric is True
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


# ---------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_default_model_calibrate_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["calibrate", "--samples", "2", "--seq-len", "64", "-q", "--device", "cpu", "-o", str(out)]) == 0
    assert (out / "kv_scales.safetensors").is_file()
    arguments = ["--samples", "1", "--context", "128", "--prefill", "64", "-q", "--device", "cpu"]
    assert cli.main(["evaluate", "--scales", str(out), *arguments, "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())
    assert cli.main(["inspect", str(out)]) == 0
    assert "llama" in capsys.readouterr().out
