"""``quantcache export`` and ``quantcache import``, run in-process on the tiny Llama.

The model loader (``quantcache.cli._steps.load_model_and_tokenizer``) is replaced where a
command would load a model by name, so nothing is downloaded; a model directory is never
loaded at all (its shards are copied). Every refusal must happen with its documented exit
code, and before a model is loaded where it can.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, build_model
from transformers import PreTrainedModel

from quantcache import KVQuantConfig, QuantizedCalibratingCache, cli
from quantcache.calibration.calibrate import calibrate
from quantcache.cli import _steps
from quantcache.state.file import read_state_file

PARAMS = ("scale", "zero_point")


def _windows() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    calibrate(llama, _windows(), progress=False).new_cache().save(run / "kv_scales.safetensors")
    return run


@pytest.fixture(scope="module")
def model_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    llama.save_pretrained(path)
    return path


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, llama: PreTrainedModel) -> list[str]:
    """Models the commands asked the loader for (the tiny Llama answers every request)."""
    asked: list[str] = []

    def load(args: argparse.Namespace) -> tuple[Any, Any]:
        asked.append(args.model)
        return llama, None

    monkeypatch.setattr(_steps, "load_model_and_tokenizer", load)
    return asked


def main(*argv: Any) -> int:
    return cli.main([str(arg) for arg in argv])


# ================================================================================ help
def test_help_lists_both_commands_and_every_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("--help") == 0
    listing = capsys.readouterr().out
    assert "export" in listing and "import" in listing
    assert main("export", "--help") == 0
    text = capsys.readouterr().out
    for name in ("ascend", "vllm", "modelopt", "--scales-only", "--strategy", "--allow-asymmetric", "Examples:"):
        assert name in text
    assert main("import", "--help") == 0
    assert "[-448 s, 448 s]" in capsys.readouterr().out


def test_export_help_loads_no_torch() -> None:
    code = "import sys; from quantcache.cli import main; main(['export', '--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


# ================================================================================ round trips
def test_ascend_export_then_import_is_bit_exact(
    run_dir: Path, model_dir: Path, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c8"
    assert main("export", "--scales", run_dir, "--model", model_dir, "--format", "ascend", "-o", out, "-q") == 0
    printed = capsys.readouterr().out
    assert "exported 8 KV scale tensors (ascend, checkpoint)" in printed
    assert f"serve with: vllm serve {out} --quantization ascend" in printed
    assert loads == []  # a model directory is copied, never loaded
    assert main("import", "--format", "ascend", out, "-o", tmp_path / "back", "-q") == 0
    assert "imported 2/2 layers (symmetric)" in capsys.readouterr().out
    original = read_state_file(run_dir / "kv_scales.safetensors").tensors
    back = read_state_file(tmp_path / "back" / "kv_scales.safetensors")
    assert back.mode == "frozen"
    for key in (k for k in original if k.endswith(PARAMS)):
        assert torch.equal(back.tensors[key], original[key]), key
    summary = json.loads((tmp_path / "back" / "kv_scales.json").read_text())
    assert summary["format"] == "ascend" and "bit for bit" in summary["meaning"]
    assert summary["imported_from"] == str(out) and summary["quantized_layers"] == [0, 1]


def test_vllm_export_of_a_named_model_loads_it_and_saves_its_weights(
    run_dir: Path, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str], llama: PreTrainedModel
) -> None:
    out = tmp_path / "fp8"
    code = main("export", "--scales", run_dir, "--format", "vllm", "--strategy", "attn_head", "-o", out, "-q")
    assert code == 0 and loads == ["smollm2-135m"]  # the default model, as for calibrate
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]["strategy"]
        == "attn_head"
    )
    assert "serve with: vllm serve" in capsys.readouterr().out
    assert main("import", "--format", "vllm", out, "-o", tmp_path / "back" / "imported.safetensors", "-q") == 0
    summary = json.loads((tmp_path / "back" / "imported.json").read_text())
    assert "448" in summary["meaning"] and summary["config"]["qconfig"]["symmetric"] is True
    assert QuantizedCalibratingCache.from_file(tmp_path / "back" / "imported.safetensors", llama).is_frozen


def test_scales_only_needs_no_model(
    run_dir: Path, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kv"
    assert main("export", "--scales", run_dir, "--format", "modelopt", "--scales-only", "-o", out, "-q") == 0
    assert loads == [] and (out / "hf_quant_config.fragment.json").is_file()
    assert "(modelopt, scales only)" in capsys.readouterr().out


# ================================================================================ refusals
def _error(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


def test_refusals_come_before_any_model_is_loaded(
    run_dir: Path,
    model_dir: Path,
    tmp_path: Path,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    llama: PreTrainedModel,
) -> None:
    assert main("export", "--scales", tmp_path / "missing", "--format", "vllm", "-o", tmp_path / "o") == 3
    assert "state file not found" in _error(capsys)
    unfrozen = calibrate(llama, _windows(), freeze=False, progress=False).new_cache().save(tmp_path / "cal.safetensors")
    assert main("export", "--scales", unfrozen, "--format", "vllm", "-o", tmp_path / "o") == 3
    assert "saved before freeze()" in _error(capsys)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main("export", "--scales", run_dir, "--format", "vllm", "-o", busy) == 3
    assert f"-o {busy}: exists and is not empty; choose another path or pass --force to replace it" in _error(capsys)
    assert main("export", "--scales", run_dir, "--format", "ascend", "--strategy", "tensor", "-o", tmp_path / "o") == 3
    assert "format 'ascend' has no option 'strategy'" in _error(capsys)
    asymmetric = calibrate(llama, _windows(), quant_config=KVQuantConfig(symmetric=False), progress=False).new_cache()
    path = asymmetric.save(tmp_path / "asym" / "kv_scales.safetensors")
    assert main("export", "--scales", path, "--format", "ascend", "-o", tmp_path / "o") == 3
    assert "(--allow-asymmetric)" in _error(capsys)
    assert main("export", "--scales", run_dir, "--format", "modelopt", "--model", model_dir, "-o", tmp_path / "o") == 3
    assert "quant_algo" in _error(capsys)
    assert loads == [] and not (tmp_path / "o").exists()


def test_a_model_of_another_shape_is_refused(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "qwen3"
    build_model("qwen3", num_hidden_layers=3).save_pretrained(other)
    assert main("export", "--scales", run_dir, "--model", other, "--format", "ascend", "-o", tmp_path / "o") == 3
    assert "calibrated for another model: model_type llama vs qwen3, num_layers 2 vs 3" in _error(capsys)


def test_usage_errors_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main("export", "--scales", run_dir, "--format", "tensorrt", "-o", tmp_path / "o") == 2
    assert "invalid choice: 'tensorrt'" in _error(capsys)
    assert main("export", "--scales", run_dir, "-o", tmp_path / "o") == 2
    assert main("import", tmp_path, "-o", tmp_path / "o") == 2


def test_import_errors_exit_3(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main("import", "--format", "vllm", model_dir, "-o", tmp_path / "run") == 3
    assert "no quantization_config.kv_cache_scheme" in _error(capsys)
    assert main("import", "--format", "ascend", tmp_path / "none", "-o", tmp_path / "run") == 3
    assert "checkpoint directory not found" in _error(capsys)
    assert main("import", "--format", "ascend", model_dir, "-o", tmp_path / "run.txt") == 3
    assert "ending in .safetensors" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_export_of_a_modelopt_checkpoint_as_vllm_exits_3_naming_the_modelopt_format(
    run_dir: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "modelopt-fp8"
    source.mkdir()
    for entry in model_dir.iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    (source / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    assert main("export", "--scales", run_dir, "--model", source, "--format", "vllm", "-o", tmp_path / "o", "-q") == 3
    line = _error(capsys)
    assert line.startswith(f"quantcache: error: {source} is a ModelOpt checkpoint") and "--format modelopt" in line
    assert not (tmp_path / "o").exists()
    assert main("export", "--scales", run_dir, "--model", source, "--format", "modelopt", "-o", tmp_path / "o") == 0


def test_export_and_import_refuse_to_replace_an_earlier_result_without_force(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kv"
    out.mkdir()  # an empty directory holds nothing to lose
    export = ["export", "--scales", run_dir, "--format", "ascend", "--scales-only", "-o", out, "-q"]
    assert main(*export) == 0
    (out / "note.txt").write_text("from the first export")
    assert main(*export) == 3
    assert _error(capsys) == (
        f"quantcache: error: -o {out}: exists and is not empty; choose another path or pass --force to replace it\n"
    )
    assert main(*export, "--force") == 0 and not (out / "note.txt").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "kv_scales.json").write_text("{}")  # an earlier import's summary alone is enough to refuse
    (out / "config.json").write_text(json.dumps(build_model("llama").config.to_dict()))
    assert main("import", "--format", "ascend", out, "-o", run, "-q") == 3
    assert _error(capsys) == (
        f"quantcache: error: -o {run}: {run / 'kv_scales.json'} exists and is not empty; choose another path or pass "
        "--force to replace it\n"
    )
    assert main("import", "--format", "ascend", out, "-o", run, "-q", "--force") == 0
    assert read_state_file(run / "kv_scales.safetensors").origin == "imported from ascend"
