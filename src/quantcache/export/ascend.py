"""msModelSlim ``ascendv1`` "C8": per-channel INT8 KV scales for vLLM-Ascend and MindIE.

quantcache's scheme *is* msModelSlim's ``dynamic_cache`` scheme, so this is the one
lossless format: every quantized layer gets four tensors, named after the projections
that produce its keys and values,

* ``{attn}.k_proj.kv_cache_scale`` / ``{attn}.k_proj.kv_cache_offset`` (keys),
* ``{attn}.v_proj.kv_cache_scale`` / ``{attn}.v_proj.kv_cache_offset`` (values),

each of shape ``[kv_heads * head_dim]``, head-major (our ``(kv_heads, head_dim)`` flattened;
vLLM-Ascend views it back as ``(kv_heads, head_dim)`` and slices whole heads per
tensor-parallel rank), float32. The offset is the zero point: engines quantize with
``q = clamp(round(x / scale + offset), -128, 127)``, exactly our formula. Offsets are
written as float32 integers, which hold every int32 zero point we produce exactly: a
zero point outside int8 is never wrapped.

``quant_model_description.json`` describes every tensor of the checkpoint (``"FLOAT"`` for
unquantized weights, ``"C8"`` for the KV tensors) plus ``"kv_cache_type": "C8"``;
vLLM-Ascend looks up each linear layer's ``.weight`` there and enables C8 for every layer
that has a ``k_proj.kv_cache_scale`` entry.

vLLM-Ascend's C8 decode path dequantizes with the scale alone (``q * scale``): it is
symmetric-only, so asymmetric states are refused unless asked for explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from quantcache.errors import InputError, QuantStateError
from quantcache.ops.quantize import INT8_MAX, INT8_MIN, compute_qparams
from quantcache.scheme.settings import Engine

from .checkpoint import INDEX_FRAGMENT, INDEX_NAME, SCALE_SHARD, read_json, read_tensors, write_json
from .common import ImportedScales, KVFormat, KVState, StreamName, StreamParams, UnsupportedSchemeError

__all__ = ["DESCRIPTION_NAME", "AscendFormat"]

DESCRIPTION_NAME = "quant_model_description.json"
_FRAGMENT_NAME = "quant_model_description.fragment.json"
_PROJECTIONS: tuple[tuple[StreamName, str], ...] = (("key", "k_proj"), ("value", "v_proj"))
_KV_TENSOR = re.compile(r"^(?P<attn>.+)\.(?P<proj>[kv]_proj)\.kv_cache_(?P<field>scale|offset)$")


def _outside_int8(zero_point: torch.Tensor) -> int:
    return int(((zero_point < INT8_MIN) | (zero_point > INT8_MAX)).sum())


def _int8_offsets(stream: StreamParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point with every zero point inside int8.

    A zero point leaves int8 only when a channel's whole range lies on one side of zero.
    Widening that range to include 0 (as the symmetric scheme always does) pins the zero
    point at -128 or 127 and keeps ``[min, max]`` representable, at a coarser step.
    """
    outside = (stream.zero_point < INT8_MIN) | (stream.zero_point > INT8_MAX)
    widened = compute_qparams(torch.clamp(stream.min, max=0.0), torch.clamp(stream.max, min=0.0), symmetric=False)
    scale = torch.where(outside, widened.scale, stream.scale)
    zero_point = torch.where(outside, widened.zero_point, stream.zero_point)
    return scale, zero_point


class AscendFormat(KVFormat):
    """msModelSlim ascendv1 C8 (see the module docstring)."""

    name = "ascend"
    numerics = Engine.ASCEND
    widest_options: ClassVar[Mapping[str, Any]] = {"allow_asymmetric": True}

    @dataclass(frozen=True)
    class Options:
        """``allow_asymmetric``: write an asymmetric state (vLLM-Ascend's decode ignores offsets).

        ``int8_offsets``: refit channels whose zero point leaves int8 so every offset fits an
        int8 (for engines that store offsets as int8); those channels lose resolution.
        """

        allow_asymmetric: bool = False
        int8_offsets: bool = False

    # ------------------------------------------------------------------ export
    def check(self, state: KVState, options: Any, source: Path | None, weight_names: set[str] | None) -> list[str]:
        warnings: list[str] = []
        asymmetric = state.zero_point_streams()
        if asymmetric:
            where = ", ".join(asymmetric)
            if not options.allow_asymmetric:
                raise UnsupportedSchemeError(
                    f"the state is asymmetric ({where} stores zero points), but vLLM-Ascend's C8 decode path "
                    "dequantizes with kv_cache_scale alone (symmetric INT8): offsets would be applied when writing "
                    "the cache and ignored when reading it. Recalibrate symmetric (symmetric: true for every stream: "
                    "KVQuantConfig(symmetric=True) with no asymmetric key/value or layer override, or quantcache "
                    "calibrate without --asymmetric), or pass allow_asymmetric=True (--allow-asymmetric) for an "
                    "engine that applies kv_cache_offset on both sides"
                )
            warnings.append(f"asymmetric C8 export ({where}): vLLM-Ascend's decode path ignores kv_cache_offset")
            outside = sum(_outside_int8(layer.stream(s).zero_point) for layer in state.layers for s, _ in _PROJECTIONS)
            if outside and options.int8_offsets:
                warnings.append(f"{outside} channel(s) had zero points outside int8; refitted to ranges that include 0")
            elif outside:
                warnings.append(
                    f"{outside} channel(s) have zero points outside int8 [-128, 127]; written exactly as float32 "
                    "(not wrapped). An engine that stores offsets as int8 needs int8_offsets=True (--int8-offsets)"
                )
        if source is not None:
            config = read_json(source / "config.json") if (source / "config.json").is_file() else {}
            if isinstance(config.get("quantization_config"), dict):
                method = config["quantization_config"].get("quant_method", "?")
                raise UnsupportedSchemeError(
                    f"the model's config.json carries a {method!r} quantization_config; an ascendv1 checkpoint "
                    "describes its quantization in quant_model_description.json only. Export from the "
                    "unquantized model, or from an msModelSlim checkpoint"
                )
        if weight_names is not None:
            for layer in state.layers:
                missing = [p for _, p in _PROJECTIONS if f"{layer.name}.{p}.weight" not in weight_names]
                if missing:
                    found = sorted({n.rsplit(".", 2)[-2] for n in weight_names if n.startswith(layer.name + ".")})
                    raise UnsupportedSchemeError(
                        f"C8 scales attach to {layer.name}.k_proj and .v_proj, but the checkpoint has no "
                        f"{missing[0]}.weight there (modules found: {found[:6]}); a fused projection needs "
                        "msModelSlim's fused naming, which this exporter does not write"
                    )
        return warnings

    def _stream_tensors(self, stream: StreamParams, options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = _int8_offsets(stream) if options.int8_offsets else (stream.scale, stream.zero_point)
        return scale.reshape(-1).to(torch.float32), zero_point.reshape(-1).to(torch.float32)

    def scale_tensors(self, state: KVState, options: Any) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for layer in state.layers:
            for stream, projection in _PROJECTIONS:
                scale, offset = self._stream_tensors(layer.stream(stream), options)
                tensors[f"{layer.name}.{projection}.kv_cache_scale"] = scale
                tensors[f"{layer.name}.{projection}.kv_cache_offset"] = offset
        return tensors

    def write_config(
        self, directory: Path, state: KVState, options: Any, tensors: Mapping[str, torch.Tensor], *, scales_only: bool
    ) -> list[str]:
        entries: dict[str, Any] = {"kv_cache_type": "C8", "kv_quant_type": "C8"}
        entries.update({name: "C8" for name in tensors})
        if scales_only:
            write_json(directory / _FRAGMENT_NAME, entries)
            return [_FRAGMENT_NAME]
        path = directory / DESCRIPTION_NAME
        if path.is_file():  # an msModelSlim checkpoint (W8A8 ...): keep its descriptions, add ours
            description = read_json(path)
            clash = sorted(name for name in tensors if name in description)
            if clash:
                raise UnsupportedSchemeError(
                    f"{DESCRIPTION_NAME} already describes KV scales ({clash[0]} ...); export from a "
                    "checkpoint without C8 scales"
                )
        else:
            description = {"model_quant_type": "FLOAT", "version": "1.0.0", "group_size": 0}
            weight_map = read_json(directory / INDEX_NAME).get("weight_map", {})
            description.update({name: "FLOAT" for name in weight_map if name not in tensors})
            config = read_json(directory / "config.json")
            text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
            tied = bool((text or {}).get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
            if tied and "lm_head.weight" not in description:
                # vLLM-Ascend looks up lm_head.weight even when it shares the embedding's storage.
                description["lm_head.weight"] = "FLOAT"
        description.update(entries)
        write_json(path, description)
        return [DESCRIPTION_NAME]

    def merge_note(self, state: KVState, options: Any) -> str:
        return (
            "To add these C8 scales to an existing msModelSlim (ascendv1) checkpoint `CKPT` whose "
            "description has no `kv_cache_scale` entries yet:\n\n"
            f"1. copy `{SCALE_SHARD}` into `CKPT/`;\n"
            f"2. if `CKPT/{INDEX_NAME}` exists, add the entries of `{INDEX_FRAGMENT}` "
            "to its `weight_map` (vLLM loads only the files an index names; without that index it "
            "loads every `*.safetensors`);\n"
            f"3. merge `{_FRAGMENT_NAME}` into `CKPT/{DESCRIPTION_NAME}`:\n\n"
            "```bash\n"
            'python -c "import json,sys; d=json.load(open(sys.argv[1])); d.update(json.load(open(sys.argv[2]))); '
            f"json.dump(d, open(sys.argv[1], 'w'), indent=2)\" CKPT/{DESCRIPTION_NAME} {_FRAGMENT_NAME}\n"
            "```\n"
        )

    def serve_command(self, directory: Path, state: KVState, options: Any) -> str:
        return f"vllm serve {directory} --quantization ascend"

    # ------------------------------------------------------------------ import
    def read(
        self, checkpoint: Path, names: list[str], tensor_files: Mapping[str, Path], kv_shape: tuple[int, int]
    ) -> ImportedScales:
        description_path = checkpoint / DESCRIPTION_NAME
        if description_path.is_file():
            kind = read_json(description_path).get("kv_cache_type")
            if kind not in (None, "C8"):
                raise UnsupportedSchemeError(
                    f"{description_path}: kv_cache_type is {kind!r}; quantcache reads C8 (per-channel INT8) only"
                )
        found: dict[str, dict[str, str]] = {}
        for tensor in tensor_files:
            match = _KV_TENSOR.match(tensor)
            if match:
                found.setdefault(match["attn"], {})[f"{match['proj']}.kv_cache_{match['field']}"] = tensor
        if not found:
            raise InputError(f"{checkpoint}: no C8 KV tensors (*.k_proj.kv_cache_scale) in its safetensors files")
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise QuantStateError(
                f"{checkpoint}: KV scales for {unknown[0]!r}, which is not an attention module of this model "
                f"(modules look like {names[0]!r}); pass the matching model"
            )
        wanted = [f"{p}.kv_cache_{f}" for _, p in _PROJECTIONS for f in ("scale", "offset")]
        for attn, fields in found.items():
            missing = [w for w in wanted if w not in fields]
            if missing:
                raise QuantStateError(f"{checkpoint}: {attn} has C8 tensors but lacks {attn}.{missing[0]}")
        loaded = read_tensors(tensor_files, [tensor for fields in found.values() for tensor in fields.values()])
        kv_heads, head_dim = kv_shape
        streams: dict[int, dict[StreamName, Any]] = {}
        symmetric = True
        for attn, fields in found.items():
            index = names.index(attn)
            streams[index] = {}
            for stream, projection in _PROJECTIONS:
                where = f"{attn}.{projection}"
                scale = self._param(loaded[fields[f"{projection}.kv_cache_scale"]], kv_heads, head_dim, where)
                offset = self._param(loaded[fields[f"{projection}.kv_cache_offset"]], kv_heads, head_dim, where)
                if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                    raise QuantStateError(f"{where}.kv_cache_scale holds zero, negative or non-finite values")
                if not bool(torch.isfinite(offset).all()) or not torch.equal(offset, offset.round()):
                    raise QuantStateError(f"{where}.kv_cache_offset holds non-integer values")
                zero_point = offset.to(torch.int32)
                symmetric = symmetric and not bool(zero_point.any())
                # The range these parameters represent: codes -128 and 127 dequantized.
                low = ((INT8_MIN - zero_point.double()) * scale.double()).float()
                high = ((INT8_MAX - zero_point.double()) * scale.double()).float()
                streams[index][stream] = (low, high, scale, zero_point)
        if symmetric:  # symmetric ranges are +-127 steps: the code -128 is never produced by our math
            for per_layer in streams.values():
                for stream_name, (_, high, scale, zero_point) in per_layer.items():
                    per_layer[stream_name] = (-high, high, scale, zero_point)
        note = (
            "msModelSlim C8 per-channel INT8: kv_cache_scale and kv_cache_offset loaded bit for bit as scale and "
            "zero point; min/max are the range those parameters represent (not the original statistics)"
        )
        return ImportedScales(streams=streams, symmetric=symmetric, note=note)

    @staticmethod
    def _param(tensor: torch.Tensor, kv_heads: int, head_dim: int, where: str) -> torch.Tensor:
        if tensor.numel() != kv_heads * head_dim:
            raise QuantStateError(
                f"{where} C8 tensor has {tensor.numel()} values; this model needs "
                f"kv_heads * head_dim = {kv_heads} * {head_dim} (was the checkpoint made for another model?)"
            )
        return tensor.detach().to(torch.float32).reshape(kv_heads, head_dim).clone()
