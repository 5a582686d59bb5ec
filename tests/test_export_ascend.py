"""quantcache.export's ``ascend`` format (msModelSlim ascendv1 C8) on a tiny Llama.

quantcache's scheme is msModelSlim's, so this round trip must be bit-exact: export ->
import gives the same frozen scale and zero point tensors, symmetric or asymmetric. The
files must be what vLLM-Ascend reads (head-major ``[kv_heads * head_dim]`` tensors, every
tensor described), asymmetric states must be refused unless asked for, and zero points
outside int8 must be written exactly, never wrapped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_export import HEAD_DIM, KV_HEADS, _c8_checkpoint, _source_with, frozen, params
from transformers import PreTrainedModel

from quantcache import QuantizedCalibratingCache, QuantStateError
from quantcache.errors import InputError
from quantcache.export import export_checkpoint, get_format, import_checkpoint
from quantcache.export.api import LENGTH_UNSAFE_NOTE
from quantcache.export.ascend import DESCRIPTION_NAME, _int8_offsets
from quantcache.export.checkpoint import INDEX_NAME, SCALE_SHARD
from quantcache.export.common import KVState, StreamParams, UnsupportedSchemeError
from quantcache.ops.quantize import INT8_MAX, INT8_MIN, QuantParams, compute_qparams, dequantize, quantize


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


def with_far_channels(model: PreTrainedModel) -> QuantizedCalibratingCache:
    """An asymmetric cache whose layer-0 keys have channels wholly above or below zero (zero points outside int8)."""
    cache = frozen(model, symmetric=False).unfreeze()
    state = cache.state_dict()
    low, high = state["layers.0.key.min"].clone(), state["layers.0.key.max"].clone()
    low[0, :3], high[0, :3] = torch.tensor([5.0, 40.0, 0.3]), torch.tensor([6.0, 41.0, 0.31])
    low[1, :2], high[1, :2] = torch.tensor([-9.0, -2.0]), torch.tensor([-8.5, -1.99])
    state["layers.0.key.min"], state["layers.0.key.max"] = low, high
    cache.load_state_dict(state)
    return cache.freeze()


# ================================================================================ ascend: files
def test_ascend_export_writes_head_major_c8_tensors_and_describes_every_tensor(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c8"
    result = export_checkpoint(symmetric, out, format="ascend", model=model_dir)
    assert result.serve_command == f"vllm serve {out} --quantization ascend"
    assert result.warnings == [LENGTH_UNSAFE_NOTE]  # a seed state: its key ranges end where calibration did
    state = symmetric.state_dict()
    with safe_open(str(out / SCALE_SHARD), framework="pt") as handle:
        assert handle.metadata()["format"] == "pt"  # transformers refuses safetensors files without it
        for layer in (0, 1):
            for stream, projection in (("key", "k_proj"), ("value", "v_proj")):
                scale = handle.get_tensor(f"model.layers.{layer}.self_attn.{projection}.kv_cache_scale")
                offset = handle.get_tensor(f"model.layers.{layer}.self_attn.{projection}.kv_cache_offset")
                assert scale.shape == offset.shape == (KV_HEADS * HEAD_DIM,)
                assert scale.dtype == offset.dtype == torch.float32
                # head-major: element h * head_dim + c is head h, channel c
                assert scale[HEAD_DIM + 3] == state[f"layers.{layer}.{stream}.scale"][1, 3]
                assert torch.equal(scale.view(KV_HEADS, HEAD_DIM), state[f"layers.{layer}.{stream}.scale"])
                assert not offset.any()
    description = json.loads((out / DESCRIPTION_NAME).read_text())
    assert (description["kv_cache_type"], description["kv_quant_type"], description["model_quant_type"]) == (
        "C8",
        "C8",
        "FLOAT",
    )
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    for name, file in index.items():
        assert description[name] == ("C8" if file == SCALE_SHARD else "FLOAT")
    assert sum(value == "C8" for value in description.values()) == 2 + 8
    assert "lm_head.weight" in description  # looked up by vLLM-Ascend even when tied to the embedding


# ================================================================================ ascend: round trips
def test_ascend_round_trip_is_bit_exact_for_symmetric_and_asymmetric_states(
    symmetric: QuantizedCalibratingCache, asymmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    for name, cache, options in (("sym", symmetric, {}), ("asym", asymmetric, {"allow_asymmetric": True})):
        out = tmp_path / name
        export_checkpoint(cache, out, format="ascend", model=model_dir, **options)
        imported = import_checkpoint(out, format="ascend")
        assert imported.symmetric is cache.quant_config.key.symmetric and imported.layers == [0, 1]
        assert imported.cache.is_frozen
        original, back = params(cache), params(imported.cache)
        assert original.keys() == back.keys()
        for key in original:
            assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key]), key


def test_imported_ranges_are_what_the_parameters_represent(
    asymmetric: QuantizedCalibratingCache, symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    export_checkpoint(asymmetric, tmp_path / "a", format="ascend", model=model_dir, allow_asymmetric=True)
    state = import_checkpoint(tmp_path / "a", format="ascend").cache.state_dict()
    scale, zero_point = state["layers.0.key.scale"].double(), state["layers.0.key.zero_point"].double()
    assert torch.equal(state["layers.0.key.min"], ((INT8_MIN - zero_point) * scale).float())
    assert torch.equal(state["layers.0.key.max"], ((INT8_MAX - zero_point) * scale).float())
    export_checkpoint(symmetric, tmp_path / "s", format="ascend", model=model_dir)
    state = import_checkpoint(tmp_path / "s", format="ascend").cache.state_dict()
    assert torch.equal(state["layers.1.value.min"], -state["layers.1.value.max"])
    assert torch.equal(state["layers.1.value.max"], (INT8_MAX * state["layers.1.value.scale"].double()).float())


def test_imported_state_saves_and_reloads_for_the_model(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path, llama: PreTrainedModel
) -> None:
    export_checkpoint(symmetric, tmp_path / "c8", format="ascend", model=model_dir)
    saved = import_checkpoint(tmp_path / "c8", format="ascend").cache.save(tmp_path / "run" / "kv_scales.safetensors")
    reloaded = QuantizedCalibratingCache.from_file(saved, llama)
    assert reloaded.is_frozen
    for key, tensor in params(symmetric).items():
        assert torch.equal(reloaded.state_dict()[key], tensor)


def test_excluded_layers_stay_excluded_through_export_and_import(
    llama: PreTrainedModel, model_dir: Path, tmp_path: Path
) -> None:
    cache = frozen(llama, exclude=["model.layers.0.self_attn"])
    result = export_checkpoint(cache, tmp_path / "c8", format="ascend", model=model_dir)
    assert all(name.startswith("model.layers.1.") for name in result.tensors)
    imported = import_checkpoint(tmp_path / "c8", format="ascend", model=llama)
    assert imported.layers == [1]
    assert imported.cache.quant_config.exclude == ("model.layers.0.self_attn",)
    assert imported.cache.quantized_layers == [1]


# ================================================================================ ascend: asymmetric and offsets
def test_asymmetric_state_is_refused_by_default_naming_both_ways_out(
    asymmetric: QuantizedCalibratingCache, tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedSchemeError, match=r"symmetric.*allow_asymmetric"):
        export_checkpoint(asymmetric, tmp_path / "x", format="ascend", scales_only=True)
    assert not (tmp_path / "x").exists()
    result = export_checkpoint(asymmetric, tmp_path / "x", format="ascend", scales_only=True, allow_asymmetric=True)
    assert any("ignores kv_cache_offset" in warning for warning in result.warnings)


def test_zero_points_outside_int8_are_written_exactly_never_wrapped(
    llama: PreTrainedModel, model_dir: Path, tmp_path: Path
) -> None:
    cache = with_far_channels(llama)
    zero_point = cache.state_dict()["layers.0.key.zero_point"]
    assert int(zero_point.min()) < INT8_MIN and int(zero_point.max()) > INT8_MAX
    result = export_checkpoint(cache, tmp_path / "c8", format="ascend", model=model_dir, allow_asymmetric=True)
    assert any("5 channel(s) have zero points outside int8" in warning for warning in result.warnings)
    offset = safetensors.torch.load_file(tmp_path / "c8" / SCALE_SHARD)[
        "model.layers.0.self_attn.k_proj.kv_cache_offset"
    ]
    assert torch.equal(offset, zero_point.reshape(-1).float())
    back = import_checkpoint(tmp_path / "c8", format="ascend").cache.state_dict()["layers.0.key.zero_point"]
    assert torch.equal(back, zero_point)


def test_int8_offsets_refit_only_the_far_channels(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = with_far_channels(llama)
    result = export_checkpoint(
        cache, tmp_path / "c8", format="ascend", scales_only=True, allow_asymmetric=True, int8_offsets=True
    )
    assert any("5 channel(s) had zero points outside int8; refitted" in warning for warning in result.warnings)
    tensors = safetensors.torch.load_file(tmp_path / "c8" / SCALE_SHARD)
    offset = tensors["model.layers.0.self_attn.k_proj.kv_cache_offset"].view(KV_HEADS, HEAD_DIM)
    scale = tensors["model.layers.0.self_attn.k_proj.kv_cache_scale"].view(KV_HEADS, HEAD_DIM)
    state = cache.state_dict()
    assert int(offset.min()) >= INT8_MIN and int(offset.max()) <= INT8_MAX
    assert offset[0, :3].tolist() == [INT8_MIN] * 3 and offset[1, :2].tolist() == [INT8_MAX] * 2
    untouched = torch.ones(KV_HEADS, HEAD_DIM, dtype=torch.bool)
    untouched[0, :3] = untouched[1, :2] = False
    assert torch.equal(offset[untouched], state["layers.0.key.zero_point"][untouched].float())
    assert torch.equal(scale[untouched], state["layers.0.key.scale"][untouched])


@settings(max_examples=80, deadline=None)
@given(
    low=st.floats(-1e4, 1e4, allow_nan=False, width=32),
    width=st.floats(0.0009765625, 1e4, allow_nan=False, width=32),
)
def test_int8_offset_refit_keeps_the_calibrated_range_representable(low: float, width: float) -> None:
    lo = torch.tensor([[low]], dtype=torch.float32)
    hi = lo + width
    scale, zero_point = compute_qparams(lo, hi, symmetric=False)
    stream = StreamParams(lo, hi, scale, zero_point)
    new_scale, new_zero = _int8_offsets(stream)
    assert INT8_MIN <= int(new_zero) <= INT8_MAX
    if INT8_MIN <= int(zero_point) <= INT8_MAX:
        assert torch.equal(new_scale, scale) and torch.equal(new_zero, zero_point)

    grid = torch.linspace(float(lo), float(hi), 33).reshape(1, 1, 33, 1)
    restored = dequantize(quantize(grid, QuantParams(new_scale, new_zero)), QuantParams(new_scale, new_zero))
    # inside [min, max] nothing clips: the error is at most half a step (plus float32 rounding)
    assert float((restored - grid).abs().max()) <= float(new_scale) * 0.5 * (1 + 1e-4) + 1e-6 * abs(float(hi))


# ================================================================================ ascend: refusals
def test_refuses_a_model_whose_config_is_already_quantized(
    symmetric: QuantizedCalibratingCache, llama: PreTrainedModel, tmp_path: Path
) -> None:
    source = _source_with(llama, tmp_path / "src", config={"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(UnsupportedSchemeError, match="'gptq' quantization_config"):
        export_checkpoint(symmetric, tmp_path / "out", format="ascend", model=source)
    assert list(tmp_path.iterdir()) == [source]  # nothing staged or left behind


def test_refuses_a_checkpoint_that_already_holds_kv_scales(
    symmetric: QuantizedCalibratingCache, llama: PreTrainedModel, tmp_path: Path
) -> None:
    name = "model.layers.1.self_attn.v_proj.kv_cache_offset"
    source = _source_with(llama, tmp_path / "src", extra={name: torch.zeros(KV_HEADS * HEAD_DIM)})
    with pytest.raises(UnsupportedSchemeError, match="already holds KV scale tensors"):
        export_checkpoint(symmetric, tmp_path / "out", format="ascend", model=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_a_model_without_separate_k_and_v_projections(symmetric: QuantizedCalibratingCache) -> None:
    fmt = get_format("ascend")
    names = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.self_attn.qkv_proj.weight"}
    with pytest.raises(UnsupportedSchemeError, match=r"no k_proj\.weight there.*qkv_proj"):
        fmt.check(KVState.load(symmetric), fmt.options({}), None, names)


def test_merges_into_an_msmodelslim_description_and_refuses_one_with_c8_entries(
    symmetric: QuantizedCalibratingCache, llama: PreTrainedModel, tmp_path: Path
) -> None:
    source = _source_with(llama, tmp_path / "src")
    (source / DESCRIPTION_NAME).write_text(json.dumps({"model_quant_type": "W8A8", "model.norm.weight": "FLOAT"}))
    export_checkpoint(symmetric, tmp_path / "out", format="ascend", model=source)
    merged = json.loads((tmp_path / "out" / DESCRIPTION_NAME).read_text())
    assert merged["model_quant_type"] == "W8A8" and merged["kv_cache_type"] == "C8"
    assert merged["model.layers.0.self_attn.k_proj.kv_cache_scale"] == "C8"
    (source / DESCRIPTION_NAME).write_text(json.dumps({"model.layers.0.self_attn.k_proj.kv_cache_scale": "C8"}))
    with pytest.raises(UnsupportedSchemeError, match="already describes KV scales"):
        export_checkpoint(symmetric, tmp_path / "again", format="ascend", model=source)


# ================================================================================ ascend: import
def _rewrite_shard(checkpoint: Path, edit: Any) -> None:
    tensors = safetensors.torch.load_file(checkpoint / SCALE_SHARD)
    edit(tensors)
    save_file(tensors, str(checkpoint / SCALE_SHARD), metadata={"format": "pt"})
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    weights = {k: v for k, v in index["weight_map"].items() if v != SCALE_SHARD}
    index["weight_map"] = {**weights, **{name: SCALE_SHARD for name in tensors}}
    (checkpoint / INDEX_NAME).write_text(json.dumps(index))


K_SCALE = "model.layers.0.self_attn.k_proj.kv_cache_scale"
K_OFFSET = "model.layers.0.self_attn.k_proj.kv_cache_offset"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(K_OFFSET), "lacks model.layers.0.self_attn.k_proj.kv_cache_offset"),
        (
            lambda t: t.update({K_SCALE: torch.ones(7)}),
            "has 7 values; this model needs kv_heads \\* head_dim = 2 \\* 16",
        ),
        (lambda t: t.update({K_OFFSET: torch.full((32,), 0.5)}), "kv_cache_offset holds non-integer values"),
        (lambda t: t.update({K_SCALE: torch.zeros(32)}), "kv_cache_scale holds zero, negative or non-finite"),
        (
            lambda t: t.update({"model.layers.0.mlp.k_proj.kv_cache_scale": torch.ones(32)}),
            "'model.layers.0.mlp'.*not an attention module",
        ),
    ],
)
def test_ascend_import_names_what_is_wrong(
    edit: Any, message: str, symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    checkpoint = _c8_checkpoint(tmp_path, symmetric, model_dir)
    _rewrite_shard(checkpoint, edit)
    with pytest.raises(QuantStateError, match=message):
        import_checkpoint(checkpoint, format="ascend")


def test_ascend_import_refuses_other_kv_types_and_plain_checkpoints(
    symmetric: QuantizedCalibratingCache, model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="no C8 KV tensors"):
        import_checkpoint(model_dir, format="ascend")
    checkpoint = _c8_checkpoint(tmp_path, symmetric, model_dir)
    description = json.loads((checkpoint / DESCRIPTION_NAME).read_text())
    (checkpoint / DESCRIPTION_NAME).write_text(json.dumps({**description, "kv_cache_type": "C4"}))
    with pytest.raises(UnsupportedSchemeError, match=r"'C4'.*C8"):
        import_checkpoint(checkpoint, format="ascend")
