"""quantcache.export's FP8 formats: ``vllm`` (compressed-tensors) and ``modelopt`` (TensorRT-LLM).

FP8 per-tensor / per-head scales are a different scheme from our per-channel INT8, so the
round trip is defined on what survives: ``scale = absmax / 448`` from our ranges, import
as ``absmax = 448 * scale`` on every channel of the tensor (head), and export -> import ->
export reproduces the FP8 scales bit for bit. What vllm writes is validated with the
``compressed-tensors`` package's own classes (config parsing, the parameter shapes it
creates, its checkpoint scan), not only with our reading of the format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers
from conftest import VOCAB
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import PreTrainedModel

from quantcache import KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.calibration.calibrate import calibrate
from quantcache.errors import InputError
from quantcache.export import export_checkpoint, get_format, import_checkpoint
from quantcache.export.checkpoint import INDEX_NAME, SCALE_SHARD
from quantcache.export.common import KVState, UnsupportedSchemeError, fp8_scales, int8_params_from_absmax
from quantcache.export.modelopt import HF_QUANT_CONFIG

KV_HEADS, HEAD_DIM = 2, 16
FP32_STEP = 2.0**-23  # one float32 rounding, relative


def _windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cache(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    return calibrate(llama, _windows(), progress=False).new_cache()


@pytest.fixture(scope="module")
def model_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    llama.save_pretrained(path)
    return path


def absmax(cache: QuantizedCalibratingCache, layer: int, stream: str) -> torch.Tensor:
    """Per-head absmax of the calibrated range, ``(kv_heads,)`` float64, computed independently of the exporter."""
    state = cache.state_dict()
    low, high = state[f"layers.{layer}.{stream}.min"].double(), state[f"layers.{layer}.{stream}.max"].double()
    return torch.stack([low.abs(), high.abs()]).amax(dim=(0, 2))


def shard(checkpoint: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(checkpoint / SCALE_SHARD)


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


# ================================================================================ FP8 math
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=2 * KV_HEADS * HEAD_DIM, max_size=64))
def test_fp8_scale_is_absmax_over_448_per_tensor_and_per_head(values: list[float]) -> None:
    data = torch.tensor(values[: 2 * KV_HEADS * HEAD_DIM]).view(2, KV_HEADS, HEAD_DIM)
    low, high = torch.minimum(data[0], data[1]), torch.maximum(data[0], data[1])
    tensor, head = fp8_scales(low, high, "tensor"), fp8_scales(low, high, "attn_head")
    amax = torch.maximum(low.abs(), high.abs()).double()
    eps = torch.finfo(torch.float32).eps
    assert tensor.shape == (1,) and head.shape == (KV_HEADS,)
    assert float(tensor) == max(float(eps), float(torch.tensor(float(amax.max()) / 448, dtype=torch.float32)))
    for h in range(KV_HEADS):
        assert float(head[h]) == max(float(eps), float(torch.tensor(float(amax[h].max()) / 448, dtype=torch.float32)))
    assert float(tensor) == float(head.max())


@settings(max_examples=1000, deadline=None)
@given(st.floats(448 * 2.0**-23, 2.0**100, allow_nan=False, allow_infinity=False, width=32))
def test_our_fp8_scales_survive_import_and_export_bit_for_bit(amax: float) -> None:
    high = torch.full((KV_HEADS, HEAD_DIM), amax)
    exported = fp8_scales(-high, high, "tensor")
    low, back = int8_params_from_absmax(exported, KV_HEADS, HEAD_DIM)
    assert torch.equal(low, -back) and back.shape == (KV_HEADS, HEAD_DIM)
    assert abs(float(back[1, 7]) - amax) <= amax * 2 * FP32_STEP
    assert torch.equal(fp8_scales(low, back, "tensor"), exported)


@settings(max_examples=1000, deadline=None)
@given(st.floats(2.0**-23, 2.0**100, allow_nan=False, allow_infinity=False, width=32))  # from the eps floor up
def test_foreign_fp8_scales_come_back_within_one_float32_step(scale: float) -> None:
    original = torch.tensor([scale], dtype=torch.float32)
    low, high = int8_params_from_absmax(original, KV_HEADS, HEAD_DIM)
    again = fp8_scales(low, high, "tensor")
    assert abs(float(again) - scale) <= scale * FP32_STEP


def test_fp8_range_refuses_wrong_counts_and_non_positive_scales() -> None:
    with pytest.raises(QuantStateError, match=r"3 values; expected 1 \(per tensor\) or 2"):
        int8_params_from_absmax(torch.ones(3), KV_HEADS, HEAD_DIM)
    with pytest.raises(QuantStateError, match="non-positive"):
        int8_params_from_absmax(torch.tensor([0.0, 1.0]), KV_HEADS, HEAD_DIM)
    with pytest.raises(QuantStateError, match="non-finite"):
        int8_params_from_absmax(torch.tensor([float("inf")]), KV_HEADS, HEAD_DIM)


# ================================================================================ vllm: export
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_vllm_export_names_shapes_values_and_config(
    strategy: str, cache: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fp8"
    result = export_checkpoint(cache, out, format="vllm", model=model_dir, strategy=strategy)
    assert result.serve_command == f"vllm serve {out} --kv-cache-dtype fp8"
    tensors = shard(out)
    assert sorted(tensors) == sorted(f"model.layers.{i}.self_attn.{s}_scale" for i in (0, 1) for s in "kv")
    for layer in (0, 1):
        for stream, letter in (("key", "k"), ("value", "v")):
            scale = tensors[f"model.layers.{layer}.self_attn.{letter}_scale"]
            assert scale.dtype == torch.float32
            expected = absmax(cache, layer, stream) / 448
            if strategy == "tensor":
                assert scale.shape == (1,) and float(scale) == float(expected.max().float())
            else:
                assert scale.shape == (KV_HEADS, 1, 1) and torch.equal(scale.flatten(), expected.float())
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["config_groups"] == {}
    assert quantization["kv_cache_scheme"] == {
        "num_bits": 8,
        "type": "float",
        "strategy": strategy,
        "dynamic": False,
        "symmetric": True,
    }


def test_vllm_output_validates_with_compressed_tensors(
    cache: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("compressed_tensors", reason="validating the vllm format needs compressed-tensors")
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
    from compressed_tensors.utils.safetensors_load import get_quantization_parameter_to_path_mapping

    for strategy in ("tensor", "attn_head"):
        out = tmp_path / strategy
        export_checkpoint(cache, out, format="vllm", model=model_dir, strategy=strategy)
        config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
        args = config.kv_cache_scheme
        assert args is not None and args.strategy == QuantizationStrategy(strategy) and args.symmetric
        assert args.dynamic is False and (args.num_bits, args.type) == (8, "float")
        # the parameters compressed-tensors itself creates on an attention module for this scheme
        module = torch.nn.Module()
        for base in ("k", "v"):
            initialize_qparams(
                module, base, args, observed_shape=(KV_HEADS, None, HEAD_DIM), observed_dtype=torch.float32
            )
        tensors = shard(out)
        for name, tensor in tensors.items():
            assert tensor.shape == getattr(module, name.rsplit(".", 1)[1]).shape, name
        # its checkpoint scan finds every scale, in our shard, through the index
        mapping = get_quantization_parameter_to_path_mapping(str(out))
        assert {name: Path(path).name for name, path in mapping.items()} == {name: SCALE_SHARD for name in tensors}


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) >= 5,
    reason="compressed-tensors 0.20 finds attention by a past_key_values argument, which transformers 5 renamed",
)
def test_vllm_scales_load_into_a_model_prepared_by_compressed_tensors(
    cache: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path, make_model: Any
) -> None:
    pytest.importorskip("compressed_tensors", reason="validating the vllm format needs compressed-tensors")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    out = tmp_path / "fp8"
    export_checkpoint(cache, out, format="vllm", model=model_dir, strategy="attn_head")
    model = make_model("llama")
    apply_quantization_config(
        model, QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    )
    tensors = shard(out)
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == []
    assert torch.equal(
        model.model.layers[1].self_attn.v_scale.data.float(), tensors["model.layers.1.self_attn.v_scale"]
    )


def test_vllm_keeps_an_llm_compressor_scheme_and_refuses_other_quantizers(
    cache: QuantizedCalibratingCache, llama: PreTrainedModel, tmp_path: Path
) -> None:
    source = tmp_path / "w8a8"
    llama.save_pretrained(source)
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}
    existing = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": groups}
    edit_json(source / "config.json", quantization_config=existing)
    export_checkpoint(cache, tmp_path / "out", format="vllm", model=source)
    merged = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert merged["config_groups"] == groups and merged["format"] == "int-quantized"
    assert merged["kv_cache_scheme"]["strategy"] == "tensor"
    edit_json(source / "config.json", quantization_config={"quant_method": "awq"})
    with pytest.raises(UnsupportedSchemeError, match=r"'awq'.*compressed-tensors"):
        export_checkpoint(cache, tmp_path / "again", format="vllm", model=source)
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    config["compression_config"] = {}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSchemeError, match=r"legacy 'compression_config'"):
        export_checkpoint(cache, tmp_path / "again", format="vllm", model=source)


def test_vllm_refuses_per_channel_scales_naming_what_carries_them(
    cache: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedSchemeError, match=r"'channel'.*per tensor.*per KV head.*ascend"):
        export_checkpoint(cache, tmp_path / "x", format="vllm", scales_only=True, strategy="channel")


def test_vllm_skips_excluded_layers_in_the_serve_command(llama: PreTrainedModel, tmp_path: Path) -> None:
    excluded = calibrate(
        llama, _windows(), quant_config=KVQuantConfig(exclude=["model.layers.0.*"]), progress=False
    ).new_cache()
    result = export_checkpoint(excluded, tmp_path / "x", format="vllm", scales_only=True)
    assert result.serve_command == "vllm serve CKPT --kv-cache-dtype fp8 --kv-cache-dtype-skip-layers 0"
    assert any("--kv-cache-dtype-skip-layers" in warning for warning in result.warnings)
    assert all(name.startswith("model.layers.1.") for name in result.tensors)


def test_vllm_refuses_a_state_whose_layer_names_the_checkpoint_lacks(cache: QuantizedCalibratingCache) -> None:
    fmt = get_format("vllm")
    with pytest.raises(QuantStateError, match=r"no tensors under 'model.layers.0.self_attn'"):
        fmt.check(KVState.load(cache), fmt.options({}), None, {"transformer.h.0.attn.c_attn.weight"})


def test_vllm_scales_only_fragment_is_a_full_quantization_config(
    cache: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    export_checkpoint(cache, tmp_path / "x", format="vllm", scales_only=True, strategy="attn_head")
    fragment = json.loads((tmp_path / "x" / "config.fragment.json").read_text())
    assert fragment["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"
    assert not (tmp_path / "x" / "config.json").exists()  # a fragment, never a file an engine mistakes for a model


# ================================================================================ vllm: import
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_vllm_import_gives_the_fp8_range_on_every_channel(
    strategy: str, cache: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    export_checkpoint(cache, tmp_path / "fp8", format="vllm", model=model_dir, strategy=strategy)
    imported = import_checkpoint(tmp_path / "fp8", format="vllm")
    assert imported.symmetric and imported.layers == [0, 1] and imported.cache.is_frozen
    state = imported.cache.state_dict()
    for layer in (0, 1):
        for stream in ("key", "value"):
            expected = absmax(cache, layer, stream)
            if strategy == "tensor":
                expected = expected.max().expand(KV_HEADS)
            high = state[f"layers.{layer}.{stream}.max"]
            assert torch.equal(state[f"layers.{layer}.{stream}.min"], -high)
            deviation = (high.double() - expected[:, None]).abs() / expected[:, None]
            assert float(deviation.max()) <= 2 * FP32_STEP  # two roundings: / 448 on export, * 448 on import
            assert torch.equal(state[f"layers.{layer}.{stream}.scale"], (high / 127).clamp(min=torch.finfo().eps))
    # and back: export of the import reproduces the FP8 scales bit for bit
    export_checkpoint(imported.cache, tmp_path / "again", format="vllm", model=model_dir, strategy=strategy)
    first, second = shard(tmp_path / "fp8"), shard(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _rewrite(checkpoint: Path, edit: Any) -> None:
    tensors = shard(checkpoint)
    edit(tensors)
    save_file(tensors, str(checkpoint / SCALE_SHARD), metadata={"format": "pt"})
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    index["weight_map"] = {
        **{k: v for k, v in index["weight_map"].items() if v != SCALE_SHARD},
        **{name: SCALE_SHARD for name in tensors},
    }
    (checkpoint / INDEX_NAME).write_text(json.dumps(index))


def test_vllm_import_errors(cache: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no quantization_config.kv_cache_scheme"):
        import_checkpoint(model_dir, format="vllm")
    out = tmp_path / "fp8"
    export_checkpoint(cache, out, format="vllm", model=model_dir)
    config = json.loads((out / "config.json").read_text())
    for scheme in (
        {"num_bits": 8, "type": "int", "strategy": "tensor"},
        {"num_bits": 8, "type": "float", "strategy": "channel"},
        {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": False},
    ):
        config["quantization_config"]["kv_cache_scheme"] = scheme
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedSchemeError, match="static symmetric FP8"):
            import_checkpoint(out, format="vllm")
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    (out / "config.json").write_text(json.dumps(config))
    _rewrite(out, lambda t: t.pop("model.layers.1.self_attn.v_scale"))
    with pytest.raises(QuantStateError, match=r"model.layers.1.self_attn has only one of k_scale / v_scale"):
        import_checkpoint(out, format="vllm")
    _rewrite(out, lambda t: t.update({"model.decoder.k_scale": torch.ones(1)}))
    with pytest.raises(QuantStateError, match=r"'model.decoder'.*not an attention module"):
        import_checkpoint(out, format="vllm")
    _rewrite(out, lambda t: t.clear() or t.update({"other": torch.ones(1)}))
    with pytest.raises(InputError, match=r"no \*\.k_scale"):
        import_checkpoint(out, format="vllm")


# ================================================================================ modelopt
@pytest.fixture
def modelopt_dir(llama: PreTrainedModel, tmp_path: Path) -> Path:
    """A stand-in for a ModelOpt FP8 checkpoint: the files and config an FP8 export has (weights stay float)."""
    path = tmp_path / "modelopt-fp8"
    llama.save_pretrained(path)
    edit_json(
        path / HF_QUANT_CONFIG,
        producer={"name": "modelopt", "version": "0.31.0"},
        quantization={"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    )
    return path


def test_modelopt_export_keeps_the_weight_scheme_and_adds_scalar_kv_scales(
    cache: QuantizedCalibratingCache, modelopt_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trt"
    result = export_checkpoint(cache, out, format="modelopt", model=modelopt_dir)
    assert result.serve_command.startswith(f"trtllm-serve {out}")
    document = json.loads((out / HF_QUANT_CONFIG).read_text())
    assert document["producer"]["name"] == "modelopt"  # vLLM recognises ModelOpt by it
    assert document["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head"],
    }
    tensors = shard(out)
    assert sorted(tensors) == sorted(f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in (0, 1) for p in "kv")
    for layer in (0, 1):
        for stream, p in (("key", "k"), ("value", "v")):
            scale = tensors[f"model.layers.{layer}.self_attn.{p}_proj.{p}_scale"]
            assert scale.shape == () and scale.dtype == torch.float32
            assert float(scale) == float((absmax(cache, layer, stream).max() / 448).float())
    imported = import_checkpoint(out, format="modelopt")
    high = imported.cache.state_dict()["layers.1.key.max"]
    assert torch.equal(
        high, torch.full_like(high, float(tensors["model.layers.1.self_attn.k_proj.k_scale"].double() * 448))
    )


def test_vllm_refuses_a_modelopt_checkpoint_whose_weights_only_hf_quant_config_describes(
    cache: QuantizedCalibratingCache, modelopt_dir: Path, tmp_path: Path
) -> None:
    """Its config.json has no quantization_config: the compressed-tensors one vllm would add makes vLLM load
    the FP8 weights as plain ones. Refused before anything is copied, naming the format that fits."""
    for options in ({}, {"scales_only": True}):
        with pytest.raises(UnsupportedSchemeError, match=r"ModelOpt checkpoint.*\(FP8\).*unquantized.*format modelopt"):
            export_checkpoint(cache, tmp_path / "x", format="vllm", model=modelopt_dir, **options)
    assert not (tmp_path / "x").exists()
    edit_json(modelopt_dir / HF_QUANT_CONFIG, quantization={"kv_cache_quant_algo": "FP8"})  # weights not quantized
    export_checkpoint(cache, tmp_path / "x", format="vllm", model=modelopt_dir)
    assert "kv_cache_scheme" in json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]


def test_modelopt_updates_an_inline_config_in_both_styles(
    cache: QuantizedCalibratingCache, modelopt_dir: Path, tmp_path: Path
) -> None:
    (modelopt_dir / HF_QUANT_CONFIG).unlink()
    edit_json(modelopt_dir / "config.json", quantization_config={"quant_method": "modelopt", "quant_algo": "FP8"})
    export_checkpoint(cache, tmp_path / "flat", format="modelopt", model=modelopt_dir)
    flat = json.loads((tmp_path / "flat" / "config.json").read_text())["quantization_config"]
    assert flat["kv_cache_quant_algo"] == "FP8" and flat["kv_cache_scheme"]["type"] == "float"
    assert import_checkpoint(tmp_path / "flat", format="modelopt").layers == [0, 1]
    nested = {"quant_method": "modelopt", "quantization": {"quant_algo": "FP8"}}
    edit_json(modelopt_dir / "config.json", quantization_config=nested)
    export_checkpoint(cache, tmp_path / "nested", format="modelopt", model=modelopt_dir)
    inner = json.loads((tmp_path / "nested" / "config.json").read_text())["quantization_config"]["quantization"]
    assert inner == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}


def test_modelopt_refuses_unquantized_weights_naming_the_alternatives(
    cache: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedSchemeError, match=r"quant_algo.*ModelOpt checkpoint.*scales_only.*--format vllm"):
        export_checkpoint(cache, tmp_path / "x", format="modelopt", model=model_dir)
    result = export_checkpoint(cache, tmp_path / "x", format="modelopt", scales_only=True)
    fragment = json.loads((tmp_path / "x" / "hf_quant_config.fragment.json").read_text())
    assert fragment == {"quantization": {"kv_cache_quant_algo": "FP8"}}
    assert not (tmp_path / "x" / HF_QUANT_CONFIG).exists() and len(result.tensors) == 4


def test_modelopt_refuses_excluded_layers_and_fused_projections(
    llama: PreTrainedModel, cache: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    excluded = calibrate(
        llama, _windows(), quant_config=KVQuantConfig(exclude=["model.layers.1.*"]), progress=False
    ).new_cache()
    with pytest.raises(UnsupportedSchemeError, match=r"layers \[1\].*every attention layer.*--format vllm"):
        export_checkpoint(excluded, tmp_path / "x", format="modelopt", scales_only=True)
    fmt = get_format("modelopt")
    with pytest.raises(UnsupportedSchemeError, match="fused projections"):
        fmt.check(KVState.load(cache), fmt.options({}), None, {"model.layers.0.self_attn.qkv_proj.weight"})


def test_modelopt_import_errors(cache: QuantizedCalibratingCache, modelopt_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no kv_cache_quant_algo"):
        import_checkpoint(modelopt_dir, format="modelopt")
    out = tmp_path / "trt"
    export_checkpoint(cache, out, format="modelopt", model=modelopt_dir)
    edit_json(out / HF_QUANT_CONFIG, quantization={"quant_algo": "NVFP4", "kv_cache_quant_algo": "NVFP4"})
    with pytest.raises(UnsupportedSchemeError, match=r"'NVFP4'; quantcache imports FP8"):
        import_checkpoint(out, format="modelopt")
    edit_json(out / HF_QUANT_CONFIG, quantization={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    _rewrite(out, lambda t: t.update({"model.layers.0.self_attn.k_proj.k_scale": torch.ones(2)}))
    with pytest.raises(QuantStateError, match=r"has 2 values; ModelOpt's are scalars"):
        import_checkpoint(out, format="modelopt")
    _rewrite(out, lambda t: t.pop("model.layers.0.self_attn.k_proj.k_scale"))
    with pytest.raises(QuantStateError, match=r"only one of k_proj.k_scale / v_proj.v_scale"):
        import_checkpoint(out, format="modelopt")
    _rewrite(out, lambda t: t.update({"lm.k_proj.k_scale": torch.ones(())}))
    with pytest.raises(QuantStateError, match=r"'lm'.*not an attention module"):
        import_checkpoint(out, format="modelopt")
    _rewrite(out, lambda t: t.clear() or t.update({"other": torch.ones(1)}))
    with pytest.raises(InputError, match=r"no \*.k_proj.k_scale"):
        import_checkpoint(out, format="modelopt")
