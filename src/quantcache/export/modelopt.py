"""TensorRT-LLM / NVIDIA ModelOpt Hugging Face checkpoints: FP8 KV scales next to FP8 weights.

ModelOpt's HF export stores one FP8 e4m3 scale per layer and stream as a scalar (shape
``[]``, float32) on the projection that produces it:

* ``{attn}.k_proj.k_scale`` and ``{attn}.v_proj.v_scale``,

and records the KV scheme in ``hf_quant_config.json``:
``{"producer": {"name": "modelopt", ...}, "quantization": {"quant_algo": "FP8",
"kv_cache_quant_algo": "FP8", ...}}``. ``scale = absmax / 448``, absmax over the whole
layer's keys (values), from our per-channel min/max.

Both readers tie the KV scales to quantized weights: TensorRT-LLM's PyTorch backend reads
``k_scale``/``v_scale`` inside its FP8 linear method and refuses a ``hf_quant_config.json``
without ``quant_algo``; vLLM's ModelOpt config refuses it too. So a full export needs a
model directory that ModelOpt already quantized (its ``quant_algo`` is kept and
``kv_cache_quant_algo`` set); for a model with unquantized weights, use the ``vllm``
format, or ``scales_only`` to merge into a ModelOpt checkpoint later. Every layer gets
FP8 KV in TensorRT-LLM, so a state with excluded layers is refused.

Import reads the scalars back as ranges (``absmax = 448 * scale`` on every channel),
as for the ``vllm`` format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantcache.errors import InputError, QuantStateError
from quantcache.scheme.settings import Engine

from .checkpoint import HF_QUANT_CONFIG, INDEX_FRAGMENT, INDEX_NAME, SCALE_SHARD, read_json, read_tensors, write_json
from .common import (
    ImportedScales,
    KVFormat,
    KVState,
    StreamName,
    UnsupportedSchemeError,
    fp8_scales,
    fp8_zero_point_warnings,
    int8_params_from_absmax,
)

__all__ = ["HF_QUANT_CONFIG", "ModelOptFormat"]

_FRAGMENT_NAME = "hf_quant_config.fragment.json"
_NAMES: tuple[tuple[StreamName, str], ...] = (("key", "k_proj.k_scale"), ("value", "v_proj.v_scale"))


def _weight_algorithm(source: Path) -> str | None:
    """The ModelOpt weight ``quant_algo`` of a model directory, or ``None`` when its weights are not ModelOpt's."""
    path = source / HF_QUANT_CONFIG
    if path.is_file():
        quantization = read_json(path).get("quantization")
        if isinstance(quantization, dict) and quantization.get("quant_algo"):
            return str(quantization["quant_algo"])
        return None
    config = read_json(source / "config.json") if (source / "config.json").is_file() else {}
    inline = config.get("quantization_config")
    if isinstance(inline, dict) and str(inline.get("quant_method", "")).startswith("modelopt"):
        inner = inline.get("quantization", inline)
        algo = inner.get("quant_algo") if isinstance(inner, dict) else None
        return str(algo) if algo else None
    return None


class ModelOptFormat(KVFormat):
    """ModelOpt / TensorRT-LLM FP8 KV scales (see the module docstring)."""

    name = "modelopt"
    numerics = Engine.MODELOPT

    @dataclass(frozen=True)
    class Options:
        """No options: ModelOpt KV scales are per tensor."""

    # ------------------------------------------------------------------ export
    def check(self, state: KVState, options: Any, source: Path | None, weight_names: set[str] | None) -> list[str]:
        if state.excluded:
            raise UnsupportedSchemeError(
                f"layers {state.excluded} have no KV scales (excluded), but TensorRT-LLM applies "
                "kv_cache_quant_algo to every attention layer and would use scale 1.0 there. Recalibrate "
                "without exclude, or export --format vllm (which can skip layers)"
            )
        if source is not None and _weight_algorithm(source) is None:
            raise UnsupportedSchemeError(
                "TensorRT-LLM and vLLM read ModelOpt KV scales only in a checkpoint whose weights ModelOpt "
                "quantized: both refuse an hf_quant_config.json without quant_algo. Pass a ModelOpt "
                "checkpoint (hf_quant_config.json with quantization.quant_algo, e.g. FP8) as the model, "
                "use scales_only (--scales-only) to merge into one later, or export --format vllm for "
                "FP8 KV with unquantized weights"
            )
        if weight_names is not None:
            for layer in state.layers:
                for projection in ("k_proj", "v_proj"):
                    if not any(name.startswith(f"{layer.name}.{projection}.") for name in weight_names):
                        raise UnsupportedSchemeError(
                            f"ModelOpt KV scales attach to {layer.name}.{projection}, which the checkpoint "
                            "does not have (fused projections are not supported)"
                        )
        return [
            "FP8 per-tensor scales: one range per layer and stream replaces the per-channel ranges",
            *fp8_zero_point_warnings(state),
        ]

    def scale_tensors(self, state: KVState, options: Any) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for layer in state.layers:
            for stream, suffix in _NAMES:
                params = layer.stream(stream)
                tensors[f"{layer.name}.{suffix}"] = fp8_scales(params.min, params.max, "tensor").reshape(())
        return tensors

    def write_config(
        self, directory: Path, state: KVState, options: Any, tensors: Mapping[str, torch.Tensor], *, scales_only: bool
    ) -> list[str]:
        if scales_only:
            write_json(directory / _FRAGMENT_NAME, {"quantization": {"kv_cache_quant_algo": "FP8"}})
            return [_FRAGMENT_NAME]
        written: list[str] = []
        path = directory / HF_QUANT_CONFIG
        if path.is_file():
            document = read_json(path)
            quantization = document.setdefault("quantization", {})
            quantization["kv_cache_quant_algo"] = "FP8"
            write_json(path, document)
            written.append(HF_QUANT_CONFIG)
        config = read_json(directory / "config.json")
        inline = config.get("quantization_config")
        if isinstance(inline, dict) and str(inline.get("quant_method", "")).startswith("modelopt"):
            # ModelOpt >= 0.31 also writes the scheme into config.json; engines warn when the two disagree.
            if isinstance(inline.get("quantization"), dict):
                inline["quantization"]["kv_cache_quant_algo"] = "FP8"
            else:  # the flat style vLLM reads as compressed-tensors-like keys
                inline["kv_cache_quant_algo"] = "FP8"
                inline["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "dynamic": False}
            write_json(directory / "config.json", config)
            written.append("config.json")
        return written

    def merge_note(self, state: KVState, options: Any) -> str:
        return (
            "To add these FP8 KV scales to a ModelOpt checkpoint `CKPT` (one whose `hf_quant_config.json` "
            "has a `quant_algo`, and no `k_proj.k_scale` tensors yet):\n\n"
            f"1. copy `{SCALE_SHARD}` into `CKPT/` and add the entries of `{INDEX_FRAGMENT}` to the "
            f"`weight_map` of `CKPT/{INDEX_NAME}`;\n"
            f'2. set `quantization.kv_cache_quant_algo` to `"FP8"` in `CKPT/{HF_QUANT_CONFIG}` (and '
            "`quantization_config.kv_cache_quant_algo` in `config.json` if it has a ModelOpt one):\n\n"
            "```bash\n"
            'python -c "import json,sys; d=json.load(open(sys.argv[1])); '
            "d.setdefault('quantization', {})['kv_cache_quant_algo']='FP8'; "
            f"json.dump(d, open(sys.argv[1], 'w'), indent=2)\" CKPT/{HF_QUANT_CONFIG}\n"
            "```\n"
        )

    def serve_command(self, directory: Path, state: KVState, options: Any) -> str:
        return f"trtllm-serve {directory}   # or: vllm serve {directory} --kv-cache-dtype fp8"

    # ------------------------------------------------------------------ import
    def read(
        self, checkpoint: Path, names: list[str], tensor_files: Mapping[str, Path], kv_shape: tuple[int, int]
    ) -> ImportedScales:
        path = checkpoint / HF_QUANT_CONFIG
        algo: Any = None
        if path.is_file():
            quantization = read_json(path).get("quantization")
            algo = quantization.get("kv_cache_quant_algo") if isinstance(quantization, dict) else None
        else:
            inline = read_json(checkpoint / "config.json").get("quantization_config")
            if isinstance(inline, dict):
                inner = inline.get("quantization", inline)
                algo = inner.get("kv_cache_quant_algo") if isinstance(inner, dict) else None
                if algo is None and isinstance(inner, dict) and isinstance(inner.get("kv_cache_scheme"), dict):
                    algo = "FP8" if inner["kv_cache_scheme"].get("type") == "float" else inner["kv_cache_scheme"]
        if algo is None:
            raise InputError(f"{checkpoint}: no kv_cache_quant_algo in {HF_QUANT_CONFIG} or config.json")
        if str(algo).upper() != "FP8":
            raise UnsupportedSchemeError(
                f"kv_cache_quant_algo is {algo!r}; quantcache imports FP8 KV scales (NVFP4 and INT8 KV caches "
                "use block or per-token scales that map to no per-channel range)"
            )
        scale_names = [n for n in tensor_files if n.endswith((".k_proj.k_scale", ".v_proj.v_scale"))]
        unknown = sorted({n.rsplit(".", 2)[0] for n in scale_names} - set(names))
        if unknown:
            raise QuantStateError(
                f"{checkpoint}: KV scales under {unknown[0]!r}, which is not an attention module of this model "
                f"(modules look like {names[0]!r}); pass the matching model"
            )
        if not scale_names:
            raise InputError(f"{checkpoint}: no *.k_proj.k_scale / *.v_proj.v_scale tensors")
        loaded = read_tensors(tensor_files, scale_names)
        kv_heads, head_dim = kv_shape
        streams: dict[int, dict[StreamName, Any]] = {}
        for index, attn in enumerate(names):
            present = [f"{attn}.{suffix}" in loaded for _, suffix in _NAMES]
            if not any(present):
                continue
            if not all(present):
                raise QuantStateError(f"{checkpoint}: {attn} has only one of k_proj.k_scale / v_proj.v_scale")
            streams[index] = {}
            for stream, suffix in _NAMES:
                tensor = loaded[f"{attn}.{suffix}"]
                if tensor.numel() != 1:
                    raise QuantStateError(f"{attn}.{suffix} has {tensor.numel()} values; ModelOpt's are scalars")
                low, high = int8_params_from_absmax(tensor, kv_heads, head_dim)
                streams[index][stream] = (low, high, None, None)
        note = (
            "ModelOpt FP8 per-tensor scales: absmax = 448 * scale on every channel of the layer's keys (values), "
            "then quantcache's symmetric INT8 per-channel math on that range; it measures their calibrated "
            "ranges under INT8, not FP8 arithmetic"
        )
        return ImportedScales(streams=streams, symmetric=True, note=note)
