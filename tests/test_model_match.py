"""A state is used only for the model it was made for.

A state records its model's shape, the sha256 of its config and the config entries that shape the
keys and values (``model.kv_config``: heads, dims, RoPE and its scaling, layer types, windows,
norms). Loading it for a model of another shape is refused; for one whose keys and values differ
(another ``rope_theta``, say) it is refused unless ``allow_other_model``; for one that differs only
elsewhere in its config, it loads with a warning.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model, random_tokens
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PreTrainedModel

from quantcache import KVQuantConfig, KVQuantizer, QuantizedCalibratingCache, QuantStateError, calibrate
from quantcache.cache.model_facts import KV_CONFIG_KEYS, config_digest, kv_config
from quantcache.cli import _steps
from quantcache.state import file as state_file
from quantcache.state.file import read_state_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, llama: PreTrainedModel) -> Path:
    quantizer = calibrate(llama, random_tokens(2, 12, seed=70), quant_config=KVQuantConfig(), progress=False)
    path: Path = quantizer.save(tmp_path_factory.mktemp("state") / "kv.safetensors")
    return path


def test_the_state_records_what_shapes_keys_and_values(saved: Path, llama: PreTrainedModel) -> None:
    recorded = read_state_file(saved).model_kv_config
    assert recorded == kv_config(llama.config)
    assert recorded is not None and set(recorded) <= set(KV_CONFIG_KEYS)
    rope = recorded.get("rope_parameters") or {"rope_theta": recorded["rope_theta"]}  # transformers 5 / 4
    assert rope["rope_theta"] == llama.config.to_dict().get("rope_parameters", llama.config.to_dict())["rope_theta"]
    assert recorded["num_key_value_heads"] == llama.config.num_key_value_heads


def test_the_same_model_loads_without_a_word(saved: Path, llama: PreTrainedModel) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KVQuantizer.load(saved, llama).is_frozen


def _other_rope(llama: PreTrainedModel) -> PreTrainedModel:
    config = llama.config.to_dict()
    theta = 1234.0
    if isinstance(config.get("rope_parameters"), dict):
        return build_model("llama", rope_parameters={**config["rope_parameters"], "rope_theta": theta})
    return build_model("llama", rope_theta=theta)


def test_a_model_whose_keys_differ_is_refused_unless_allowed(saved: Path, llama: PreTrainedModel) -> None:
    other = _other_rope(llama)
    with pytest.raises(QuantStateError, match=r"keys and values differ .*rope.*allow_other_model=True"):
        KVQuantizer.load(saved, other)
    with pytest.raises(QuantStateError, match="--allow-other-model"):
        QuantizedCalibratingCache.from_file(saved, other)
    with pytest.raises(QuantStateError, match="allow_other_model"):
        _steps.frozen_cache(other, saved)
    with pytest.warns(UserWarning, match=r"entries that shape keys and values \(rope"):
        allowed = KVQuantizer.load(saved, other, allow_other_model=True)
    assert allowed.is_frozen
    with pytest.warns(UserWarning, match="rope"):
        assert _steps.frozen_cache(other, saved, allow_other_model=True).is_frozen


def test_another_config_that_keeps_keys_and_values_only_warns(saved: Path, llama: PreTrainedModel) -> None:
    other = build_model("llama", initializer_range=0.5)  # changes the config's digest, not its keys and values
    with pytest.warns(UserWarning, match="entries that do not change keys and values"):
        quantizer = KVQuantizer.load(saved, other)
    expected = read_state_file(saved).tensors["layers.0.key.scale"]
    assert torch.equal(quantizer.state_dict()["layers.0.key.scale"], expected)


def test_an_older_file_without_the_record_warns_for_another_config(tmp_path: Path, saved: Path) -> None:
    tensors = load_file(saved)
    with safe_open(saved, framework="pt") as handle:
        metadata = dict(handle.metadata())
    model = json.loads(metadata["model"])
    del model["kv_config"]
    metadata["model"] = json.dumps(model)
    older = state_file.StateFile(**{**vars(state_file.read_state_file(saved)), "model_kv_config": None})
    path = state_file.write_state_file(tmp_path / "older.safetensors", older)
    assert read_state_file(path).model_kv_config is None
    with pytest.warns(UserWarning, match="entries this older file cannot name"):
        KVQuantizer.load(path, _other_rope(build_model("llama")))
    # editing the record in a file breaks its checksum
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata)
    with pytest.raises(QuantStateError, match="checksum"):
        read_state_file(tmp_path / "edited.safetensors")


def test_where_a_config_came_from_does_not_count(saved: Path, llama: PreTrainedModel, tmp_path: Path) -> None:
    """The same config saved and read back (another name, transformers version, dtype) is the same model."""
    llama.config.save_pretrained(tmp_path)
    reread = AutoConfig.from_pretrained(tmp_path)
    assert reread.to_dict() != llama.config.to_dict()  # bookkeeping differs
    assert config_digest(reread) == config_digest(llama.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KVQuantizer.load(saved, reread).is_frozen


def test_a_file_with_the_digest_of_every_entry_still_matches(
    saved: Path, llama: PreTrainedModel, tmp_path: Path
) -> None:
    """States written before bookkeeping entries were left out recorded the digest of every entry."""
    stored = read_state_file(saved)
    digest = config_digest(llama.config, every_entry=True)
    assert digest is not None and digest != stored.model_config_sha256
    older = state_file.write_state_file(tmp_path / "older.safetensors", replace(stored, model_config_sha256=digest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KVQuantizer.load(older, llama).is_frozen
