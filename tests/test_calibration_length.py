"""How long the calibration windows were: counted by calibrating caches, saved, loaded, shown, checked."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import random_tokens
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from quantcache import KVQuantizer, calibrate, cli
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.errors import QuantStateError
from quantcache.state.file import read_state_file, write_state_file
from quantcache.state.schema import CalibrationLength, checksum
from quantcache.state.validation import validate_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(model: PreTrainedModel, cache: object, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        model(ids, **{CACHE_KEYWORD: cache})


# ---------------------------------------------------------------------------- counting
def test_calibrate_records_the_window_length_and_count(llama: PreTrainedModel) -> None:
    quantizer = calibrate(llama, random_tokens(5, 40, seed=1), batch_size=2, progress=False)
    assert quantizer.calibration_length == CalibrationLength(tokens_per_window=40, windows=5)
    assert quantizer.calibration_tokens == 40


def test_batches_of_several_lengths_record_the_longest_and_every_row(llama: PreTrainedModel) -> None:
    batches = [random_tokens(2, 30, seed=2), random_tokens(1, 50, seed=3), random_tokens(3, 20, seed=4)]
    quantizer = calibrate(llama, batches, progress=False)
    assert quantizer.calibration_length == CalibrationLength(tokens_per_window=50, windows=6)


def test_a_hand_loop_counts_each_cache_as_windows_and_its_tokens_across_calls(llama: PreTrainedModel) -> None:
    quantizer = KVQuantizer(llama)
    assert quantizer.calibration_length is None and quantizer.calibration_tokens is None
    conversation = quantizer.new_cache()
    _run(llama, conversation, random_tokens(1, 20, seed=5))  # a prefill, then three decode steps of one token
    for step in range(3):
        _run(llama, conversation, random_tokens(1, 1, seed=6 + step))
    assert quantizer.calibration_length == CalibrationLength(tokens_per_window=23, windows=1)
    _run(llama, quantizer.new_cache(), random_tokens(2, 10, seed=9))  # two shorter rows: the longest stays 23
    assert quantizer.calibration_length == CalibrationLength(tokens_per_window=23, windows=3)
    quantizer.freeze()
    _run(llama, quantizer.new_cache(), random_tokens(1, 60, seed=10))  # a frozen quantizer's caches quantize
    assert quantizer.calibration_length == CalibrationLength(tokens_per_window=23, windows=3)


def test_continuing_a_calibration_adds_windows_and_a_reset_forgets_them(llama: PreTrainedModel) -> None:
    first = calibrate(llama, random_tokens(2, 24, seed=11), freeze=False, progress=False)
    more = calibrate(llama, random_tokens(3, 16, seed=12), quantizer=first, progress=False)
    assert first.calibration_length == CalibrationLength(tokens_per_window=24, windows=2)  # the input is not changed
    assert more.calibration_length == CalibrationLength(tokens_per_window=24, windows=5)
    assert more.unfreeze().calibration_length == CalibrationLength(tokens_per_window=24, windows=5)
    assert more.reset_statistics().calibration_length is None


def test_loading_a_state_dict_leaves_the_recorded_length(llama: PreTrainedModel) -> None:
    source = calibrate(llama, random_tokens(2, 32, seed=13), progress=False)
    target = calibrate(llama, random_tokens(1, 12, seed=14), progress=False)
    target.load_state_dict(source.state_dict())
    assert target.calibration_length == CalibrationLength(tokens_per_window=12, windows=1)


# ---------------------------------------------------------------------------- the file
@pytest.fixture(scope="module")
def saved(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    quantizer = calibrate(llama, random_tokens(3, 36, seed=15), progress=False)
    return quantizer.save(tmp_path_factory.mktemp("length") / "kv.safetensors")


def _metadata(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _rewrite(source: Path, target: Path, *, calibration: str | None, keep_checksum: bool = False) -> Path:
    """``source`` with its ``calibration`` metadata replaced (``None``: removed), checksum recomputed unless kept."""
    metadata, tensors = _metadata(source)
    metadata.pop("calibration")
    if calibration is not None:
        metadata["calibration"] = calibration
    if not keep_checksum:
        metadata["checksum"] = json.dumps(checksum(tensors, metadata))
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_the_length_is_saved_in_the_metadata_and_loaded_back(saved: Path, llama: PreTrainedModel) -> None:
    metadata, _ = _metadata(saved)
    assert json.loads(metadata["calibration"]) == {"tokens_per_window": 36, "windows": 3}
    assert read_state_file(saved).calibration == CalibrationLength(tokens_per_window=36, windows=3)
    loaded = KVQuantizer.load(saved, llama)
    assert loaded.calibration_length == CalibrationLength(tokens_per_window=36, windows=3)
    assert loaded.calibration_tokens == 36


def test_the_checksum_covers_the_length(saved: Path, tmp_path: Path) -> None:
    edited = _rewrite(
        saved,
        tmp_path / "edited.safetensors",
        calibration='{"tokens_per_window": 4096, "windows": 3}',
        keep_checksum=True,
    )
    with pytest.raises(QuantStateError, match="checksum mismatch"):
        read_state_file(edited)


def test_a_file_without_the_length_loads_with_none(saved: Path, tmp_path: Path, llama: PreTrainedModel) -> None:
    older = _rewrite(saved, tmp_path / "older.safetensors", calibration=None)
    assert "calibration" not in _metadata(older)[0]
    assert read_state_file(older).calibration is None
    quantizer = KVQuantizer.load(older, llama)
    assert quantizer.calibration_length is None and quantizer.calibration_tokens is None
    resaved = quantizer.save(tmp_path / "resaved.safetensors")  # still none recorded: the key stays absent
    assert "calibration" not in _metadata(resaved)[0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"tokens_per_window": 0, "windows": 3}', "calibration.tokens_per_window is 0, expected a positive integer"),
        ('{"tokens_per_window": 36, "windows": -1}', "calibration.windows is -1, expected a positive integer"),
        ('{"tokens_per_window": "36", "windows": 3}', "calibration.tokens_per_window is '36'"),
        ('{"tokens_per_window": 36.0, "windows": 3}', "calibration.tokens_per_window is 36.0"),
        ('{"tokens_per_window": true, "windows": 3}', "calibration.tokens_per_window is True"),
        ('{"tokens_per_window": 36}', "expected {'tokens_per_window': N, 'windows': M}, got ['tokens_per_window']"),
        ("[36, 3]", "expected {'tokens_per_window': N, 'windows': M}, got list"),
        ("null", "got NoneType"),
    ],
)
def test_a_malformed_length_is_refused_naming_it(
    saved: Path, tmp_path: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _rewrite(saved, tmp_path / "bad.safetensors", calibration=value)
    with pytest.raises(QuantStateError, match="metadata 'calibration' is malformed") as raised:
        read_state_file(bad)
    assert message in str(raised.value)
    assert cli.main(["inspect", str(bad)]) == cli.EXIT_INPUT
    assert message in capsys.readouterr().err


def test_a_state_with_a_bad_length_is_neither_valid_nor_written(saved: Path, tmp_path: Path) -> None:
    stored = replace(read_state_file(saved), calibration=CalibrationLength(tokens_per_window=36, windows=0))
    assert validate_state(stored) == ["calibration.windows is 0, expected a positive integer"]
    with pytest.raises(QuantStateError, match=r"calibration\.windows is 0"):
        write_state_file(tmp_path / "never.safetensors", stored)
    assert not (tmp_path / "never.safetensors").exists()


def test_inspect_shows_the_length(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(saved)]) == 0
    assert "calibrated:  on 3 windows of up to 36 tokens" in capsys.readouterr().out
    assert cli.main(["inspect", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"] == {"tokens_per_window": 36, "windows": 3}
    older = _rewrite(saved, tmp_path / "older.safetensors", calibration=None)
    assert cli.main(["inspect", str(older)]) == 0
    assert "calibrated:  window length not recorded" in capsys.readouterr().out
    assert cli.main(["inspect", str(older), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"] is None
