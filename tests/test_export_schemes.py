"""Every exporter judges every stream of every quantized layer by the stream's own arguments.

A config can make its keys asymmetric and leave its values symmetric (``KVQuantConfig(symmetric=True,
key={"symmetric": False})``), or the other way round, or do either in a layer override. vLLM-Ascend's C8
decode path reads ``kv_cache_scale`` alone, so a state with any stream that stores zero points must be refused
for ``ascend`` (naming the stream) unless asymmetric export is asked for; the FP8 formats (``vllm``,
``modelopt``) are symmetric by construction and carry such a state correctly, to the scale its symmetric
calibration would give (the statistics are the same min/max). Checked through the Python API and the command
line, on states built directly from known ranges (no model runs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from quantcache import KVQuantConfig, QuantStateError, cli
from quantcache.calibration.calibrate import calibrate
from quantcache.export import export_checkpoint
from quantcache.export.checkpoint import NOTE_NAME, SCALE_SHARD
from quantcache.export.common import STATE_FILE_NAME, KVState, UnsupportedSchemeError
from quantcache.ops.quantize import compute_qparams
from quantcache.state.file import StateFile, write_state_file

NAMES = [f"model.layers.{index}.self_attn" for index in range(3)]
KV_HEADS, HEAD_DIM = 2, 16
KEYS_ASYMMETRIC = KVQuantConfig(symmetric=True, key={"symmetric": False})
VALUES_ASYMMETRIC = KVQuantConfig(symmetric=True, value={"symmetric": False})
LAYER_1_KEYS_ASYMMETRIC = KVQuantConfig(
    layers=[{"include": ["model.layers.1.self_attn"], "qconfig": {"key": {"symmetric": False}}}]
)
MIXED = {
    "keys": (KEYS_ASYMMETRIC, "qconfig.key"),
    "values": (VALUES_ASYMMETRIC, "qconfig.value"),
    "layer-override-keys": (LAYER_1_KEYS_ASYMMETRIC, "layers[0].qconfig.key"),
}


def _ranges(index: int, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated ranges of one stream of one layer: lopsided (mostly positive), so zero points are not 0."""
    generator = torch.Generator().manual_seed(10 * index + (stream == "value"))
    low = -torch.rand(KV_HEADS, HEAD_DIM, generator=generator) * 0.2 - 0.05
    high = torch.rand(KV_HEADS, HEAD_DIM, generator=generator) * 3.0 + 0.5
    return low, high


def _state(config: KVQuantConfig) -> StateFile:
    """A frozen state of ``config`` for a three-layer model, every calibrating stream with its own ranges."""
    tensors: dict[str, torch.Tensor] = {}
    for index, name in enumerate(NAMES):
        if not config.is_quantized(name):
            continue
        for stream in ("key", "value"):
            args = config.stream_args(stream, name)
            if not args.calibrates:
                continue
            low, high = _ranges(index, stream)
            params = compute_qparams(low, high, symmetric=args.symmetric, fmt=args.format)
            prefix = f"layers.{index}.{stream}"
            tensors.update({f"{prefix}.min": low, f"{prefix}.max": high})
            tensors.update({f"{prefix}.scale": params.scale, f"{prefix}.zero_point": params.zero_point})
    return StateFile(
        tensors=tensors,
        config=config,
        mode="frozen",
        num_layers=len(NAMES),
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        layer_names=list(NAMES),
        model_type="llama",
        quantcache_version="test",
    )


def _run_dir(tmp_path: Path, config: KVQuantConfig) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_state_file(run / STATE_FILE_NAME, _state(config))
    return run


def _main(*argv: Any) -> int:
    return cli.main([str(arg) for arg in argv])


# ================================================================================ the state's streams
@pytest.mark.parametrize("case", list(MIXED))
def test_kv_state_reads_symmetry_from_every_stream_in_use(case: str) -> None:
    config, where = MIXED[case]
    state = KVState.load(_state(config))
    assert state.zero_point_streams() == [where]
    assert state.symmetric is False
    assert state.scheme_text == f"asymmetric in {where}, symmetric elsewhere"
    assert KVState.load(_state(KVQuantConfig())).symmetric is True
    assert KVState.load(_state(KVQuantConfig(symmetric=False))).scheme_text == "asymmetric"


def test_an_asymmetric_override_of_an_excluded_layer_is_not_in_use() -> None:
    config = KVQuantConfig(
        exclude=("model.layers.1.self_attn",),
        layers=[{"include": ["model.layers.1.self_attn"], "qconfig": {"key": {"symmetric": False}}}],
    )
    state = KVState.load(_state(config))
    assert state.symmetric and state.zero_point_streams() == []


# ================================================================================ ascend
@pytest.mark.parametrize("case", list(MIXED))
def test_ascend_refuses_a_state_with_any_asymmetric_stream_naming_it(tmp_path: Path, case: str) -> None:
    config, where = MIXED[case]
    with pytest.raises(
        UnsupportedSchemeError, match=re.escape(f"the state is asymmetric ({where} stores zero points)")
    ):
        export_checkpoint(_state(config), tmp_path / "out", format="ascend", scales_only=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(MIXED))
def test_ascend_with_allow_asymmetric_writes_each_streams_own_offsets(tmp_path: Path, case: str) -> None:
    config, where = MIXED[case]
    result = export_checkpoint(
        _state(config), tmp_path / "out", format="ascend", scales_only=True, allow_asymmetric=True
    )
    assert any(where in warning for warning in result.warnings)
    tensors = load_file(tmp_path / "out" / SCALE_SHARD)
    for index, name in enumerate(NAMES):
        for stream, projection in (("key", "k_proj"), ("value", "v_proj")):
            args = config.stream_args(stream, name)
            params = compute_qparams(*_ranges(index, stream), symmetric=args.symmetric)
            assert torch.equal(tensors[f"{name}.{projection}.kv_cache_scale"], params.scale.reshape(-1))
            offset = tensors[f"{name}.{projection}.kv_cache_offset"]
            assert torch.equal(offset, params.zero_point.reshape(-1).float())
            assert bool(offset.any()) is args.stores_zero_point  # symmetric streams keep offset 0
    note = (tmp_path / "out" / NOTE_NAME).read_text()
    assert f"source state: asymmetric in {where}, symmetric elsewhere INT8 per-channel" in note


def test_ascend_exports_an_all_symmetric_state_without_a_word_on_offsets(tmp_path: Path) -> None:
    result = export_checkpoint(_state(KVQuantConfig()), tmp_path / "out", format="ascend", scales_only=True)
    assert not any("asymmetric" in warning for warning in result.warnings)


# ================================================================================ FP8 formats
def _fp8_scale(index: int, stream: str) -> torch.Tensor:
    low, high = _ranges(index, stream)
    absmax = torch.maximum(low.double().abs(), high.double().abs()).amax()
    return (absmax / 448.0).float().reshape(1)


@pytest.mark.parametrize("case", list(MIXED))
@pytest.mark.parametrize(
    ("fmt", "suffixes"), [("vllm", ("k_scale", "v_scale")), ("modelopt", ("k_proj.k_scale", "v_proj.v_scale"))]
)
def test_fp8_formats_carry_a_mixed_state_to_the_scales_of_its_ranges(
    tmp_path: Path, case: str, fmt: str, suffixes: tuple[str, str]
) -> None:
    """FP8 is symmetric: each scale is ``absmax / 448`` of the calibrated range, exactly what the all-symmetric
    calibration of the same statistics exports, and the note names the streams whose zero points stay behind."""
    config, where = MIXED[case]
    result = export_checkpoint(_state(config), tmp_path / "mixed", format=fmt, scales_only=True)
    assert any(where in warning and "zero points are not written" in warning for warning in result.warnings)
    mixed = load_file(tmp_path / "mixed" / SCALE_SHARD)
    export_checkpoint(_state(KVQuantConfig()), tmp_path / "symmetric", format=fmt, scales_only=True)
    assert mixed.keys() == load_file(tmp_path / "symmetric" / SCALE_SHARD).keys()
    for name, tensor in load_file(tmp_path / "symmetric" / SCALE_SHARD).items():
        assert torch.equal(mixed[name], tensor)
    for index, name in enumerate(NAMES):
        for stream, suffix in zip(("key", "value"), suffixes, strict=True):
            assert torch.equal(mixed[f"{name}.{suffix}"].reshape(1), _fp8_scale(index, stream))


def test_a_layer_override_engines_cannot_read_is_refused_by_its_place(tmp_path: Path) -> None:
    config = KVQuantConfig(
        layers=[{"include": ["model.layers.2.self_attn"], "qconfig": {"scope": "per_token", "dynamic": True}}]
    )
    for fmt in ("ascend", "vllm", "modelopt"):
        with pytest.raises(QuantStateError, match=r"layers\[0\]\.qconfig\.key is dynamic .*--preset c8"):
            export_checkpoint(_state(config), tmp_path / fmt, format=fmt, scales_only=True)


# ================================================================================ the command line
@pytest.mark.parametrize("case", list(MIXED))
def test_cli_ascend_export_of_a_mixed_state_exits_3_naming_the_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    config, where = MIXED[case]
    run = _run_dir(tmp_path, config)
    code = _main("export", "--scales", run, "--format", "ascend", "--scales-only", "-o", tmp_path / "out")
    assert code == cli.EXIT_INPUT
    assert f"the state is asymmetric ({where} stores zero points)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = _main(
        "export", "--scales", run, "--format", "ascend", "--scales-only", "--allow-asymmetric", "-o", tmp_path / "ok"
    )
    assert code == cli.EXIT_OK


@pytest.mark.parametrize("fmt", ["vllm", "modelopt"])
def test_cli_fp8_export_of_a_mixed_state_succeeds_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    run = _run_dir(tmp_path, KEYS_ASYMMETRIC)
    assert _main("export", "--scales", run, "--format", fmt, "--scales-only", "-o", tmp_path / "out") == cli.EXIT_OK
    assert "qconfig.key calibrated asymmetric INT8" in capsys.readouterr().err
    scales = load_file(tmp_path / "out" / SCALE_SHARD)
    suffix = "k_scale" if fmt == "vllm" else "k_proj.k_scale"
    assert torch.equal(scales[f"{NAMES[1]}.{suffix}"].reshape(1), _fp8_scale(1, "key"))


@pytest.mark.parametrize("case", ["keys", "values"])
def test_a_calibrated_mixed_state_is_refused_by_ascend_and_carried_by_vllm(
    llama: PreTrainedModel, tmp_path: Path, case: str
) -> None:
    """The reported case end to end: calibrated and frozen on the tiny Llama, then exported."""
    config, where = MIXED[case]
    frozen = calibrate(
        llama,
        torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0)),
        quant_config=config,
        progress=False,
    )
    with pytest.raises(UnsupportedSchemeError, match=re.escape(f"({where} stores zero points)")):
        export_checkpoint(frozen, tmp_path / "c8", format="ascend", scales_only=True)
    result = export_checkpoint(frozen, tmp_path / "fp8", format="vllm", scales_only=True)
    assert any(where in warning for warning in result.warnings)
