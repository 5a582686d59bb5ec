"""vLLM through compressed-tensors: FP8 (e4m3) KV scales, per tensor or per KV head.

This is how llm-compressor checkpoints carry KV scales and how vLLM reads them:

* tensors ``{attn}.k_scale`` and ``{attn}.v_scale`` (``model.layers.N.self_attn.k_scale``),
  float32, shape ``(1,)`` for ``strategy: tensor`` and ``(kv_heads, 1, 1)`` for
  ``strategy: attn_head`` (the shapes compressed-tensors itself creates); vLLM maps them
  onto its attention layer (``...self_attn.attn.k_scale``);
* ``quantization_config.kv_cache_scheme`` in ``config.json``:
  ``{"num_bits": 8, "type": "float", "strategy": ..., "dynamic": false, "symmetric": true}``.
  A model without a quantization config gets a KV-only compressed-tensors config (no
  ``config_groups``); an llm-compressor checkpoint keeps its weight scheme and gains ours.
  Its presence alone makes vLLM allocate an FP8 cache.

FP8 stores ``x / scale`` with ``scale = absmax / 448``. The absmax comes from our
per-channel min/max (max of ``|min|``, ``|max|`` over the whole tensor or each head), so
one calibration serves both the INT8 formats and this one. Per-channel FP8 scales have no
slot in vLLM; that scheme is refused with what would be needed.

Import reads the scales back as a range: ``absmax = 448 * scale`` broadcast to every
channel of the tensor (or head), symmetric INT8 on top (see :func:`~.common.int8_params_from_absmax`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantcache.errors import InputError, QuantStateError
from quantcache.scheme.settings import Engine

from .checkpoint import (
    HF_QUANT_CONFIG,
    INDEX_FRAGMENT,
    INDEX_NAME,
    SCALE_SHARD,
    modelopt_weight_algorithm,
    read_json,
    read_tensors,
    write_json,
)
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

__all__ = ["STRATEGIES", "VllmFormat", "kv_cache_scheme"]

STRATEGIES = ("tensor", "attn_head")
_FRAGMENT_NAME = "config.fragment.json"
_SUFFIXES: tuple[tuple[StreamName, str], ...] = (("key", "k_scale"), ("value", "v_scale"))


def kv_cache_scheme(strategy: str) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` for a static, symmetric FP8 KV cache."""
    return {"num_bits": 8, "type": "float", "strategy": strategy, "dynamic": False, "symmetric": True}


def _quantization_config(config: Mapping[str, Any], strategy: str) -> dict[str, Any]:
    """``config.json``'s quantization_config with our kv_cache_scheme merged in."""
    existing = config.get("quantization_config")
    if "compression_config" in config and existing is None:
        raise UnsupportedSchemeError(
            "config.json uses the legacy 'compression_config' key; re-save the model with a current "
            "llm-compressor (quantization_config) before adding KV scales"
        )
    if existing is None:
        return {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "quantization_status": "compressed",
            "config_groups": {},
            "ignore": [],
            "kv_cache_scheme": kv_cache_scheme(strategy),
        }
    method = existing.get("quant_method") if isinstance(existing, dict) else None
    if method != "compressed-tensors":
        raise UnsupportedSchemeError(
            f"the model's weights are quantized with {method!r}; vLLM reads one quantization_config and "
            "only compressed-tensors' carries a kv_cache_scheme. Export from the unquantized model or an "
            "llm-compressor checkpoint (use --format modelopt for ModelOpt checkpoints)"
        )
    return {**existing, "kv_cache_scheme": kv_cache_scheme(strategy)}


def _refuse_modelopt_weights(source: Path) -> None:
    """Refuse a ModelOpt checkpoint whose quantized weights only its hf_quant_config.json describes.

    vLLM takes config.json's ``quantization_config`` first: the compressed-tensors one this
    format writes there (KV scheme only, no weight groups) would make it load the FP8
    weights as plain ones.
    """
    algorithm = modelopt_weight_algorithm(source)
    if algorithm is not None:
        raise UnsupportedSchemeError(
            f"{source} is a ModelOpt checkpoint: its {HF_QUANT_CONFIG} says the weights are quantized "
            f"({algorithm}), and the compressed-tensors quantization_config this format writes into config.json "
            "would make vLLM load them as unquantized weights. Export it with --format modelopt (vLLM and "
            "TensorRT-LLM read ModelOpt KV scales), or export --format vllm from the unquantized model"
        )


class VllmFormat(KVFormat):
    """compressed-tensors FP8 KV scales for vLLM (see the module docstring)."""

    name = "vllm"
    numerics = Engine.VLLM

    @dataclass(frozen=True)
    class Options:
        """``strategy``: ``tensor`` (one scale per layer and stream) or ``attn_head`` (one per KV head)."""

        strategy: str = "tensor"

    # ------------------------------------------------------------------ export
    def check(self, state: KVState, options: Any, source: Path | None, weight_names: set[str] | None) -> list[str]:
        if options.strategy not in STRATEGIES:
            raise UnsupportedSchemeError(
                f"strategy {options.strategy!r}: vLLM's compressed-tensors KV path reads one FP8 scale per tensor "
                "('tensor') or per KV head ('attn_head'); per-channel KV scales would need an engine with "
                "per-channel KV dequantization (the ascend format carries them, as INT8)"
            )
        warnings = fp8_zero_point_warnings(state)
        if state.excluded:
            warnings.append(
                f"layers {state.excluded} have no KV scales (excluded); vLLM puts every layer's KV in FP8 once "
                "kv_cache_scheme is set, so serve with --kv-cache-dtype-skip-layers (in the serve command)"
            )
        if options.strategy == "attn_head":
            warnings.append("per-head FP8 KV scales need an attention backend that supports them (FlashAttention)")
        if source is not None:
            _refuse_modelopt_weights(source)
        if source is not None and (source / "config.json").is_file():
            _quantization_config(read_json(source / "config.json"), options.strategy)  # raises if it cannot merge
        if weight_names is not None:
            for layer in state.layers:
                if not any(name.startswith(layer.name + ".") for name in weight_names):
                    raise QuantStateError(
                        f"the checkpoint has no tensors under {layer.name!r}; the state was made for a model "
                        f"whose attention modules are named differently (checkpoint names look like "
                        f"{min(weight_names)!r})"
                    )
        return warnings

    def scale_tensors(self, state: KVState, options: Any) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for layer in state.layers:
            for stream, suffix in _SUFFIXES:
                params = layer.stream(stream)
                scale = fp8_scales(params.min, params.max, options.strategy)
                tensors[f"{layer.name}.{suffix}"] = scale if options.strategy == "tensor" else scale.reshape(-1, 1, 1)
        return tensors

    def write_config(
        self, directory: Path, state: KVState, options: Any, tensors: Mapping[str, torch.Tensor], *, scales_only: bool
    ) -> list[str]:
        if scales_only:
            write_json(directory / _FRAGMENT_NAME, {"quantization_config": _quantization_config({}, options.strategy)})
            return [_FRAGMENT_NAME]
        path = directory / "config.json"
        config = read_json(path)
        config["quantization_config"] = _quantization_config(config, options.strategy)
        write_json(path, config)
        return ["config.json"]

    def merge_note(self, state: KVState, options: Any) -> str:
        return (
            "To add these FP8 KV scales to an existing checkpoint `CKPT` (unquantized, or an llm-compressor "
            "checkpoint without KV scales):\n\n"
            f"1. copy `{SCALE_SHARD}` into `CKPT/` and add the entries of `{INDEX_FRAGMENT}` to the "
            f"`weight_map` of `CKPT/{INDEX_NAME}` (a lone `model.safetensors` needs no index for vLLM);\n"
            f"2. in `CKPT/config.json`, set `quantization_config` from `{_FRAGMENT_NAME}`, or, if the checkpoint "
            "already has a compressed-tensors `quantization_config`, add only its `kv_cache_scheme`:\n\n"
            "```bash\n"
            'python -c "import json,sys; c=json.load(open(sys.argv[1])); f=json.load(open(sys.argv[2]))'
            "['quantization_config']; q=c.get('quantization_config'); "
            "c['quantization_config']=f if q is None else {**q, 'kv_cache_scheme': f['kv_cache_scheme']}; "
            f"json.dump(c, open(sys.argv[1], 'w'), indent=2)\" CKPT/config.json {_FRAGMENT_NAME}\n"
            "```\n"
        )

    def serve_command(self, directory: Path, state: KVState, options: Any) -> str:
        command = f"vllm serve {directory} --kv-cache-dtype fp8"
        if state.excluded:
            command += " --kv-cache-dtype-skip-layers " + " ".join(str(index) for index in state.excluded)
        return command

    # ------------------------------------------------------------------ import
    def read(
        self, checkpoint: Path, names: list[str], tensor_files: Mapping[str, Path], kv_shape: tuple[int, int]
    ) -> ImportedScales:
        config = read_json(checkpoint / "config.json")
        quant = config.get("quantization_config") or config.get("compression_config")
        scheme = quant.get("kv_cache_scheme") if isinstance(quant, dict) else None
        if not isinstance(scheme, dict):
            raise InputError(
                f"{checkpoint}/config.json has no quantization_config.kv_cache_scheme: not a checkpoint with "
                "compressed-tensors KV scales"
            )
        kind = (scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy"), scheme.get("symmetric", True))
        if kind[:2] != ("float", 8) or kind[2] not in STRATEGIES or kind[3] is not True:
            raise UnsupportedSchemeError(
                f"kv_cache_scheme {scheme}: quantcache imports static symmetric FP8 (type float, num_bits 8) "
                f"scales with strategy {' or '.join(STRATEGIES)}"
            )
        suffixes = tuple(f".{suffix}" for _, suffix in _SUFFIXES)
        scale_names = [name for name in tensor_files if name.endswith(suffixes)]
        unknown = sorted({name.rsplit(".", 1)[0] for name in scale_names} - set(names))
        if unknown:
            raise QuantStateError(
                f"{checkpoint}: KV scales under {unknown[0]!r}, which is not an attention module of this model "
                f"(modules look like {names[0]!r}); pass the matching model"
            )
        if not scale_names:
            raise InputError(f"{checkpoint}: kv_cache_scheme is set but no *.k_scale / *.v_scale tensors exist")
        loaded = read_tensors(tensor_files, scale_names)
        kv_heads, head_dim = kv_shape
        streams: dict[int, dict[StreamName, Any]] = {}
        for index, attn in enumerate(names):
            present = [f"{attn}.{suffix}" in loaded for _, suffix in _SUFFIXES]
            if not any(present):
                continue
            if not all(present):
                raise QuantStateError(f"{checkpoint}: {attn} has only one of k_scale / v_scale")
            streams[index] = {}
            for stream, suffix in _SUFFIXES:
                low, high = int8_params_from_absmax(loaded[f"{attn}.{suffix}"], kv_heads, head_dim)
                streams[index][stream] = (low, high, None, None)
        note = (
            f"compressed-tensors FP8 scales (strategy {kind[2]}): absmax = 448 * scale broadcast to every channel "
            f"of the {'tensor' if kind[2] == 'tensor' else 'KV head'}, then quantcache's symmetric INT8 per-channel "
            "math on that range. It measures their calibrated ranges under INT8, not FP8 arithmetic"
        )
        return ImportedScales(streams=streams, symmetric=True, note=note)
