"""quantcache.export's shared plumbing, on a tiny Llama: registry, state loading, checkpoint layout, import.

An export must leave a checkpoint every reader agrees on (weights byte for byte, one index
naming the scale shard), refuse what the target cannot load before writing anything, and
an import must read the KV scale tensors only. The ascend format (used here as the
concrete format) has its own tests in test_export_ascend.py; the FP8 formats in
test_export_fp8.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from conftest import VOCAB
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.errors import InputError
from quantcache.export import FORMATS, export_checkpoint, get_format, import_checkpoint
from quantcache.export.ascend import DESCRIPTION_NAME
from quantcache.export.checkpoint import INDEX_FRAGMENT, INDEX_NAME, NOTE_NAME, SCALE_SHARD, tensor_locations
from quantcache.export.common import KVState, UnsupportedSchemeError
from quantcache.state.file import read_state_file

KV_HEADS, HEAD_DIM = 2, 16
PARAMS = ("scale", "zero_point")


# ================================================================================ fixtures
def _windows(seed: int = 0, count: int = 3, length: int = 20) -> torch.Tensor:
    return torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def frozen(model: PreTrainedModel, **config: Any) -> QuantizedCalibratingCache:
    return calibrate(model, _windows(), quant_config=KVQuantConfig(**config), progress=False).new_cache()


@pytest.fixture(scope="module")
def symmetric(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    return frozen(llama)


@pytest.fixture(scope="module")
def asymmetric(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    return frozen(llama, symmetric=False)


@pytest.fixture(scope="module")
def model_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    llama.save_pretrained(path)
    return path


def params(cache: QuantizedCalibratingCache) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in cache.state_dict().items() if name.endswith(PARAMS)}


def _source_with(
    llama: PreTrainedModel,
    path: Path,
    *,
    config: dict[str, Any] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    llama.save_pretrained(path)
    if config is not None:
        data = json.loads((path / "config.json").read_text())
        data.update(config)
        (path / "config.json").write_text(json.dumps(data))
    if extra is not None:
        save_file(extra, str(path / "extra.safetensors"), metadata={"format": "pt"})
    return path


def _c8_checkpoint(tmp_path: Path, symmetric: QuantizedCalibratingCache, model_dir: Path) -> Path:
    out = tmp_path / "c8"
    if not out.exists():
        export_checkpoint(symmetric, out, format="ascend", model=model_dir)
    return out


def header_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


# ================================================================================ registry
def test_registry_lists_every_format_and_loads_each() -> None:
    assert set(FORMATS) == {"ascend", "vllm", "modelopt"}
    for name in FORMATS:
        assert get_format(name).name == name


def test_unknown_format_and_unknown_option_name_the_choices(
    symmetric: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="ascend, vllm, modelopt"):
        get_format("tensorrt")
    with pytest.raises(ConfigError, match="allow_asymmetric, int8_offsets"):
        export_checkpoint(symmetric, tmp_path / "x", format="ascend", scales_only=True, strategy="tensor")


def test_importing_the_registry_loads_neither_torch_nor_a_format() -> None:
    heavy = ("torch", "quantcache.export.ascend")
    code = f"import sys, quantcache.export; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ================================================================================ the state
def test_state_loads_from_cache_state_file_path_and_run_directory(
    symmetric: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    path = symmetric.save(tmp_path / "run" / "kv_scales.safetensors")
    for source in (symmetric, read_state_file(path), path, str(tmp_path / "run")):
        state = KVState.load(source)
        assert (state.kv_heads, state.head_dim, state.num_layers, state.excluded) == (KV_HEADS, HEAD_DIM, 2, [])
        assert torch.equal(state.layers[1].value.scale, symmetric.state_dict()["layers.1.value.scale"])
    assert KVState.load(state) is state


def test_state_refuses_statistics_without_parameters(llama: PreTrainedModel, tmp_path: Path) -> None:
    unfrozen = frozen(llama).unfreeze()
    with pytest.raises(QuantStateError, match="not frozen"):
        KVState.load(unfrozen)
    path = unfrozen.save(tmp_path / "calibrating.safetensors")
    with pytest.raises(QuantStateError, match="freeze it first"):
        KVState.load(path)
    with pytest.raises(TypeError, match="expected a frozen KVQuantizer or cache, a StateFile or a state file path"):
        KVState.load(3.5)


def test_state_refuses_missing_fields_and_inconsistent_shapes(symmetric: QuantizedCalibratingCache) -> None:
    tensors = symmetric.state_dict()
    common: dict[str, Any] = {"config": KVQuantConfig(), "layer_names": symmetric.layer_names, "model_type": "llama"}
    partial = {k: v for k, v in tensors.items() if k != "layers.1.key.scale"}
    with pytest.raises(QuantStateError, match="layer 1 key is not frozen"):
        KVState.from_tensors(partial, kv_heads=KV_HEADS, head_dim=HEAD_DIM, source="t", **common)
    with pytest.raises(QuantStateError, match=r"\(kv_heads, head_dim\) = \(4, 8\)"):
        KVState.from_tensors(tensors, kv_heads=4, head_dim=8, source="t", **common)
    odd = {**tensors, "layers.1.value.max": torch.zeros(KV_HEADS, HEAD_DIM + 1)}
    with pytest.raises(QuantStateError, match="do not all equal"):
        KVState.from_tensors(odd, kv_heads=None, head_dim=None, source="t", **common)
    with pytest.raises(QuantStateError, match="no layer tensors"):
        KVState.from_tensors({}, kv_heads=None, head_dim=None, source="t", **common)
    with pytest.raises(QuantStateError, match="outside the model's 1 layers"):
        KVState.from_tensors(tensors, kv_heads=None, head_dim=None, source="t", **{**common, "layer_names": ["a"]})


# ================================================================================ checkpoint layout
def test_full_export_copies_weights_byte_for_byte_and_indexes_the_scale_shard(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path, llama: PreTrainedModel
) -> None:
    out = tmp_path / "c8"
    result = export_checkpoint(symmetric, out, format="ascend", model=model_dir)
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert not (out / "model.safetensors").exists()  # transformers would prefer it and ignore the index
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(header_names(out / "model-00001-of-00001.safetensors")) | set(result.tensors)
    payload = sum(
        t.numel() * t.element_size() for f in out.glob("*.safetensors") for t in safetensors.torch.load_file(f).values()
    )
    assert index["metadata"]["total_size"] == payload
    assert set(result.files) == {SCALE_SHARD, DESCRIPTION_NAME, NOTE_NAME}
    assert "--quantization ascend" in (out / NOTE_NAME).read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # extra tensors are ignored; the weights are the same
    ids = _windows(5, 1, 9)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, llama(ids).logits)


def test_sharded_source_keeps_its_shards_and_gains_one_index_entry_per_scale(
    symmetric: QuantizedCalibratingCache, llama: PreTrainedModel, tmp_path: Path
) -> None:
    source = tmp_path / "sharded"
    llama.save_pretrained(source, max_shard_size="100KB")
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(shards) > 1
    before = json.loads((source / INDEX_NAME).read_text())
    out = tmp_path / "c8"
    result = export_checkpoint(symmetric, out, format="ascend", model=source)
    after = json.loads((out / INDEX_NAME).read_text())
    assert after["weight_map"] == {**before["weight_map"], **{name: SCALE_SHARD for name in result.tensors}}
    added = sum(t.numel() * 4 for t in safetensors.torch.load_file(out / SCALE_SHARD).values())
    assert after["metadata"]["total_size"] == before["metadata"]["total_size"] + added
    for shard in shards:
        assert (out / shard).read_bytes() == (source / shard).read_bytes()


def test_export_from_a_model_object_uses_save_pretrained(
    symmetric: QuantizedCalibratingCache, llama: PreTrainedModel, tmp_path: Path
) -> None:
    result = export_checkpoint(symmetric, tmp_path / "c8", format="ascend", model=llama)
    locations = tensor_locations(tmp_path / "c8")
    assert {locations[name].name for name in result.tensors} == {SCALE_SHARD}
    assert "model.embed_tokens.weight" in locations


# ================================================================================ plumbing
def test_destination_rules_and_atomic_replacement(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=r"not empty.*overwrite"):
        export_checkpoint(symmetric, out, format="ascend", model=model_dir)
    export_checkpoint(symmetric, out, format="ascend", model=model_dir, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / SCALE_SHARD).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        export_checkpoint(symmetric, tmp_path / "file", format="ascend", model=model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_model_argument_errors(symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="needs the model"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend")
    with pytest.raises(InputError, match="not a model directory"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=tmp_path / "missing")
    with pytest.raises(InputError, match="model directory or a transformers model"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=object())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no config\.json"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(InputError, match=r"config\.json cannot be read by transformers"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=empty)
    (empty / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    with pytest.raises(InputError, match=r"no \*\.safetensors"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=empty)
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="not a readable safetensors"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=empty)
    (empty / "pytorch_model.bin").write_bytes(b"")
    (empty / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"no \*\.safetensors"):
        export_checkpoint(symmetric, tmp_path / "a", format="ascend", model=empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_export_of_an_export_is_refused(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    export_checkpoint(symmetric, tmp_path / "once", format="vllm", model=model_dir)
    with pytest.raises(InputError, match=r"already holds kv_cache_scales\.safetensors"):
        export_checkpoint(symmetric, tmp_path / "twice", format="ascend", model=tmp_path / "once")


def test_scales_only_writes_the_shard_fragments_and_a_merge_note(
    symmetric: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    out = tmp_path / "scales"
    result = export_checkpoint(symmetric, out, format="ascend", scales_only=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [SCALE_SHARD, INDEX_FRAGMENT, "quant_model_description.fragment.json", NOTE_NAME]
    )
    fragment = json.loads((out / INDEX_FRAGMENT).read_text())["weight_map"]
    assert fragment == {name: SCALE_SHARD for name in result.tensors} and len(fragment) == 8
    description = json.loads((out / "quant_model_description.fragment.json").read_text())
    assert description["kv_cache_type"] == "C8" and all(description[name] == "C8" for name in result.tensors)
    note = (out / NOTE_NAME).read_text()
    assert "## Merge into an existing checkpoint" in note and "vllm serve CKPT --quantization ascend" in note


def test_scales_only_with_a_model_directory_checks_its_names(
    symmetric: QuantizedCalibratingCache, tmp_path: Path, llama: PreTrainedModel
) -> None:
    source = _source_with(
        llama, tmp_path / "src", extra={"model.layers.0.self_attn.k_proj.kv_cache_scale": torch.ones(32)}
    )
    with pytest.raises(UnsupportedSchemeError, match="already holds KV scale tensors"):
        export_checkpoint(symmetric, tmp_path / "out", format="ascend", model=source, scales_only=True)


def test_import_checkpoint_argument_errors(tmp_path: Path, llama: PreTrainedModel) -> None:
    with pytest.raises(InputError, match="checkpoint directory not found"):
        import_checkpoint(tmp_path / "none", format="ascend")
    with pytest.raises(InputError, match=r"no config\.json; pass model="):
        import_checkpoint(tmp_path, format="ascend")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(InputError, match="cannot be read by transformers"):
        import_checkpoint(tmp_path, format="ascend")
    with pytest.raises(InputError, match=r"no \*\.safetensors"):
        import_checkpoint(tmp_path, format="ascend", model=llama)


def test_import_reads_only_the_kv_tensors(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = _c8_checkpoint(tmp_path, symmetric, model_dir)
    import quantcache.export.checkpoint as plumbing

    requested: list[str] = []
    real_open = plumbing.safe_open

    class Spy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            requested.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(plumbing, "safe_open", Spy)
    import_checkpoint(checkpoint, format="ascend")
    assert sorted(requested) == sorted(n for n in tensor_locations(checkpoint) if ".kv_cache_" in n)


# ================================================================================ GGUF-loaded models
class GgufHfQuantizer:
    """Stands in for transformers' quantizer, which stays on a model dequantized from GGUF and blocks saving."""

    quantization_config = argparse.Namespace(quant_method="gguf")


def test_a_model_dequantized_from_gguf_is_saved_as_a_plain_checkpoint(
    symmetric: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    from conftest import build_model

    model = build_model("llama")
    quantizer = GgufHfQuantizer()
    model.hf_quantizer = quantizer
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")
    export_checkpoint(symmetric, tmp_path / "c8", format="ascend", model=model)
    assert "quantization_config" not in json.loads((tmp_path / "c8" / "config.json").read_text())
    assert model.hf_quantizer is quantizer and model.config.quantization_config == {"quant_method": "gguf"}
    model.model.layers[0].mlp.add_module("packed", type("GgmlLinear", (torch.nn.Module,), {})())
    with pytest.raises(InputError, match="GGUF-packed weights"):
        export_checkpoint(symmetric, tmp_path / "packed", format="ascend", model=model)


@pytest.mark.parametrize(
    "config",
    [
        KVQuantConfig.preset("int4"),
        KVQuantConfig.preset("int8"),
        KVQuantConfig(method="percentile"),
        KVQuantConfig(rotation="hadamard"),
        KVQuantConfig(dtype="int4"),
        KVQuantConfig(scope="per_head"),
    ],
    ids=["int4-preset", "int8-preset", "percentile", "rotated", "int4-static", "per-head"],
)
def test_a_scheme_engines_cannot_read_is_refused_by_name(
    llama: PreTrainedModel, tmp_path: Path, config: KVQuantConfig
) -> None:
    """Engines read static INT8-derived per-channel ranges; anything else is refused before writing, naming the
    scheme and the way out (the seed scheme)."""
    cache = calibrate(llama, torch.randint(3, 128, (1, 12)), quant_config=config, progress=False).new_cache()
    with pytest.raises(QuantStateError, match=r"cannot be exported.*--preset c8"):
        export_checkpoint(cache, tmp_path / "out", format="vllm", scales_only=True)
    assert not (tmp_path / "out").exists()


def test_a_seed_state_with_sink_tokens_is_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    """Engines quantize every token: a state whose sinks quantcache keeps in full precision would serve otherwise."""
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(sink_tokens=1))
    llama(torch.randint(3, 128, (1, 12)), **{CACHE_KEYWORD: cache})
    cache.freeze()
    with pytest.raises(QuantStateError, match=r"keeps sink_tokens: 1 in full precision.*without sink_tokens"):
        export_checkpoint(cache, tmp_path / "out", format="vllm", scales_only=True)
    assert not (tmp_path / "out").exists()
