"""``quantcache evaluate`` at serving lengths: the recorded calibration length as the default context, a
second line at 4x that length, and the generation check on chat prompts (tiny model, character tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_cli import char_tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from quantcache import QuantizedCalibratingCache, cli
from quantcache.analysis.evaluation import evaluate
from quantcache.analysis.generation_check import generation_check
from quantcache.cli import _steps
from quantcache.models.data import TextSource, token_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--samples", "4", "--chunk", "16", "-q"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture
def use_model(monkeypatch: pytest.MonkeyPatch, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    monkeypatch.setattr(_steps, "load_model_and_tokenizer", lambda args: (llama, tokenizer))


def _calibrated(factory: pytest.TempPathFactory, model: PreTrainedModel, tokenizer: Any, seq_len: int) -> Path:
    out = factory.mktemp("calibrated") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_steps, "load_model_and_tokenizer", lambda args: (model, tokenizer))
        assert cli.main(["calibrate", "--samples", "2", "--seq-len", str(seq_len), "-q", "-o", str(out)]) == 0
    return out / "kv_scales.safetensors"


@pytest.fixture(scope="module")
def state48(tmp_path_factory: pytest.TempPathFactory, llama: PreTrainedModel, tokenizer: Any) -> Path:
    """A state calibrated on 2 windows of 48 tokens."""
    return _calibrated(tmp_path_factory, llama, tokenizer, 48)


def _evaluate(*arguments: str, json_path: Path) -> dict[str, Any]:
    assert cli.main(["evaluate", *arguments, "--json", str(json_path)]) == 0
    data: dict[str, Any] = json.loads(json_path.read_text())
    return data


def _library(model: PreTrainedModel, tokenizer: Any, state: Path, samples: int, length: int, prefill: int) -> Any:
    documents = TextSource(kind="builtin", split="evaluation").load()
    windows = token_windows(tokenizer, documents, num_samples=samples, seq_len=length, seed=0)
    cache = QuantizedCalibratingCache.from_file(state, model)
    return evaluate(model, cache, windows, prefill=prefill, chunk=16, progress=False)


def _same_metrics(data: dict[str, Any], result: Any) -> None:
    for key in ("ppl_reference", "ppl_quantized", "kl_mean", "top1_agreement"):
        assert data[key] == pytest.approx(getattr(result, key), rel=1e-6), key
    assert data["num_tokens"] == result.num_tokens


def test_the_default_context_is_the_calibration_length_with_a_line_at_four_times_it(
    state48: Path,
    use_model: None,
    llama: PreTrainedModel,
    tokenizer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _evaluate("--scales", str(state48), *FAST, "--generate", "0", json_path=tmp_path / "e.json")
    table = capsys.readouterr().out
    # 48 calibration tokens: the default prefill (256) does not fit, so it is half the context
    assert (data["settings"]["window_length"], data["settings"]["num_windows"], data["settings"]["prefill"]) == (
        48,
        4,
        24,
    )
    _same_metrics(data, _library(llama, tokenizer, state48, samples=4, length=48, prefill=24))
    long = data["long_context"]
    assert (long["settings"]["window_length"], long["settings"]["num_windows"]) == (192, 1)  # 4 x 48; 4 // 4 windows
    expected = _library(llama, tokenizer, state48, samples=1, length=192, prefill=24)
    _same_metrics(long, expected)
    assert data["generation"] is None
    assert data["notes"] == [
        "evaluating at the calibration length, 48 tokens (--context N to choose)",
        "prefill of 24 tokens, half the context (--prefill P to choose)",
    ]
    line = (
        f"at 192 tokens: ΔPPL {expected.ppl_relative_change * 100:+.3f} %, KL {expected.kl_mean:.3e}, "
        f"top-1 {expected.top1_agreement * 100:.2f} % (1 window)"
    )
    assert line in table.splitlines()


@pytest.mark.parametrize("option", [["--context", "48"], ["--no-long-context"]])
def test_no_longer_context_line_with_an_explicit_context_or_when_asked(
    state48: Path, use_model: None, option: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--scales", str(state48), *FAST, "--prefill", "24", "--generate", "0", *option]
    data = _evaluate(*arguments, json_path=tmp_path / "e.json")
    assert data["settings"]["window_length"] == 48 and data["long_context"] is None
    assert "at 192 tokens" not in capsys.readouterr().out


def test_the_longer_context_stops_at_the_models_positions(
    tmp_path_factory: pytest.TempPathFactory,
    use_model: None,
    llama: PreTrainedModel,
    tokenizer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = _calibrated(tmp_path_factory, llama, tokenizer, 96)  # 4 x 96 = 384 > the tiny model's 256 positions
    data = _evaluate("--scales", str(state), *FAST, "--generate", "0", json_path=tmp_path / "e.json")
    assert data["settings"]["window_length"] == 96
    assert (data["long_context"]["settings"]["window_length"], data["long_context"]["num_tokens"]) == (256, 255)
    note = "the longer context is 256 tokens, the model's max_position_embeddings, not 384"
    assert note in data["notes"]
    assert "at 256 tokens: " in capsys.readouterr().out


def test_text_too_short_for_the_longer_context_is_a_note(
    state48: Path, use_model: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)  # 135 characters: 2 x 48 fit, 192 does not
    arguments = ["--scales", str(state48), "--text-file", str(text), "--samples", "2", "--generate", "0"]
    data = _evaluate(*arguments, json_path=tmp_path / "e.json")
    assert data["settings"]["window_length"] == 48 and data["long_context"] is None
    note = (
        "no longer-context line: the text is too short for a window of 192 tokens; give longer text "
        "(--text-file, --dataset) or pass --no-long-context"
    )
    assert note in data["notes"] and f"note: {note}" in capsys.readouterr().err


def test_text_too_short_for_the_default_context_exits_3_naming_the_fix(
    state48: Path, use_model: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("Too short.")
    code = cli.main(["evaluate", "--scales", str(state48), "--text-file", str(text), "--samples", "2", "-q"])
    assert code == cli.EXIT_INPUT
    error = capsys.readouterr().err
    assert "at the default context (48 tokens, or --context N): the text has 10 tokens" in error


def test_an_explicit_prefill_longer_than_the_recorded_context_is_a_usage_error(
    state48: Path, use_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["evaluate", "--scales", str(state48), "--prefill", "64", "-q"]) == cli.EXIT_USAGE
    assert "--prefill (64) must be smaller than the context (48 tokens" in capsys.readouterr().err


def test_a_state_without_the_length_is_evaluated_at_1024_tokens_with_a_note(
    tmp_path: Path, make_model: Callable[..., PreTrainedModel], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from quantcache import calibrate
    from quantcache.state.file import read_state_file, write_state_file

    model = make_model("llama", max_position_embeddings=2048)
    documents = TextSource(kind="builtin", split="calibration").load()
    quantizer = calibrate(model, token_windows(tokenizer, documents, num_samples=1, seq_len=64), progress=False)
    saved = quantizer.save(tmp_path / "new.safetensors")
    older = write_state_file(tmp_path / "older.safetensors", replace(read_state_file(saved), calibration=None))
    monkeypatch.setattr(_steps, "load_model_and_tokenizer", lambda args: (model, tokenizer))
    arguments = ["--scales", str(older), "--samples", "1", "--chunk", "256", "--no-long-context", "--generate", "0"]
    data = _evaluate(*arguments, "-q", json_path=tmp_path / "e.json")
    assert (data["settings"]["window_length"], data["settings"]["prefill"]) == (1024, 256)
    assert data["notes"] == [
        f"{older} does not record how long its calibration windows were (written before it was, or imported): "
        "evaluating at 1024 tokens (--context N to choose)"
    ]


def test_the_generation_check_is_in_the_table_and_the_json(
    state48: Path,
    use_model: None,
    llama: PreTrainedModel,
    tokenizer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = ["--scales", str(state48), *FAST, "--no-long-context", "--generate", "6"]
    data = _evaluate(*arguments, json_path=tmp_path / "e.json")
    expected = generation_check(
        llama, tokenizer, QuantizedCalibratingCache.from_file(state48, llama), new_tokens=6, progress=False
    )
    assert data["generation"] == json.loads(json.dumps(expected.to_dict()))
    assert data["generation"]["new_tokens"] == 6 and data["generation"]["chat_template"] is False
    assert 1 <= data["generation"]["prompts_total"] <= 8
    out = capsys.readouterr().out
    assert f"same answer: {expected.same}/{expected.total}" in out
    assert "the tokenizer has no chat template: the prompts were plain User:/Assistant: text" in data["notes"]


def test_the_generation_check_runs_by_default(
    state48: Path, use_model: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _evaluate("--scales", str(state48), *FAST, "--no-long-context", json_path=tmp_path / "e.json")
    assert data["generation"]["new_tokens"] == 32
    assert "same answer: " in capsys.readouterr().out


@pytest.mark.slow
def test_real_default_model_at_the_calibration_length_and_four_times_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli.main(["calibrate", "--samples", "2", "--seq-len", "64", "-q", "--device", "cpu", "-o", str(out)]) == 0
    arguments = ["--scales", str(out), "--samples", "2", "--generate", "16", "-q", "--device", "cpu"]
    data = _evaluate(*arguments, json_path=tmp_path / "e.json")
    assert (data["settings"]["window_length"], data["settings"]["prefill"]) == (64, 32)
    long, generation = data["long_context"], data["generation"]
    assert (long["settings"]["window_length"], long["num_tokens"]) == (256, 255)
    assert generation["chat_template"] is True and generation["prompts_total"] == 8
    # measured: 2 x 64 calibration tokens of the built-in corpus; 2 x 64 and 1 x 256 evaluated, 8 answers of 16 tokens
    assert data["ppl_reference"] == pytest.approx(36.61935, rel=1e-4)
    assert data["kl_mean"] == pytest.approx(1.7180e-2, rel=0.02)
    assert data["top1_agreement"] == pytest.approx(122 / 126, abs=1.5 / 126)  # one token may flip on another CPU
    assert long["ppl_reference"] == pytest.approx(37.00898, rel=1e-4)
    assert long["kl_mean"] == pytest.approx(3.5588e-2, rel=0.02)
    assert long["top1_agreement"] == pytest.approx(235 / 255, abs=1.5 / 255)
    assert [answer["first_difference"] for answer in generation["prompts"]] == [9, None, None, None, None, 10, 6, 3]
    assert (generation["same"], generation["mean_first_difference"]) == (4, pytest.approx(7.0))
