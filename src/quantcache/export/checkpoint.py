"""Checkpoint directories: place the weights, add the scale shard, keep the index true, write atomically.

Engines find tensors by file: vLLM loads every ``*.safetensors`` of a directory, but only
the files named in ``model.safetensors.index.json`` when that index exists; Transformers
prefers a lone ``model.safetensors`` over any index. So an export always leaves one
layout that every reader agrees on: the weights (shards copied byte for byte, or written
by ``save_pretrained``) plus :data:`SCALE_SHARD`, all listed in one index. A single
``model.safetensors`` is renamed to ``model-00001-of-00001.safetensors`` for that reason.

Everything is written into a hidden sibling directory first and renamed into place at the
end, so an interrupted export never leaves a checkpoint that loads with half its scales;
the finished directory gets the permissions the umask gives (a serving engine may run as
another user), and what a killed export left beside the destination is removed by the
next one (see :mod:`quantcache.outputs`).
Reading goes through safetensors headers (``safe_open(...).keys()``) and fetches only the
tensors asked for: importing scales never reads a weight.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantcache.errors import InputError, QuantStateError
from quantcache.outputs import apply_umask, make_staging_directory, staging_path

__all__ = [
    "HF_QUANT_CONFIG",
    "INDEX_FRAGMENT",
    "INDEX_NAME",
    "NOTE_NAME",
    "SCALE_SHARD",
    "add_scale_shard",
    "commit",
    "copy_model_directory",
    "modelopt_weight_algorithm",
    "read_json",
    "read_tensors",
    "save_model",
    "stage",
    "tensor_locations",
    "unify_layout",
    "write_json",
]

SCALE_SHARD = "kv_cache_scales.safetensors"
HF_QUANT_CONFIG = "hf_quant_config.json"
"""Where a ModelOpt checkpoint describes its quantization (weights and KV cache), beside config.json."""
INDEX_FRAGMENT = "kv_cache_scales.index.fragment.json"
INDEX_NAME = "model.safetensors.index.json"
NOTE_NAME = "QUANTCACHE_EXPORT.md"
_SINGLE_NAME = "model.safetensors"
_RENAMED_SINGLE = "model-00001-of-00001.safetensors"
# Weight formats that must not travel next to safetensors: engines would load one set or both.
_SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


# ---------------------------------------------------------------------------- JSON
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged file is an input error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def modelopt_weight_algorithm(directory: Path) -> str | None:
    """The weight ``quant_algo`` that ``directory``'s :data:`HF_QUANT_CONFIG` names (``FP8`` ...), else ``None``.

    A ModelOpt checkpoint may describe its quantized weights there only, with no
    ``quantization_config`` in ``config.json``; a reader that looks at config.json alone
    takes such weights for plain ones.
    """
    path = directory / HF_QUANT_CONFIG
    if not path.is_file():
        return None
    quantization = read_json(path).get("quantization")
    algorithm = quantization.get("quant_algo") if isinstance(quantization, dict) else None
    return str(algorithm) if algorithm else None


# ---------------------------------------------------------------------------- reading
def _header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes, byte offsets), without tensor data."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from error
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    return header


def _tensor_bytes(path: Path) -> int:
    header = _header(path)
    return sum(
        int(info["data_offsets"][1]) - int(info["data_offsets"][0])
        for name, info in header.items()
        if name != "__metadata__"
    )


def tensor_locations(directory: Path) -> dict[str, Path]:
    """Every tensor name of a checkpoint directory mapped to its file, the way vLLM chooses files.

    With an index, the files it names (and only those); without one, every ``*.safetensors``.
    Only headers are read.
    """
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no 'weight_map' object")
        missing = sorted({str(f) for f in weight_map.values() if not (directory / str(f)).is_file()})
        if missing:
            raise InputError(f"{index} names files that do not exist: {missing[:3]}")
        return {str(name): directory / str(file) for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError(f"{directory}: no *.safetensors files (a checkpoint directory holds its tensors there)")
    locations: dict[str, Path] = {}
    for file in files:
        for name in _header(file):
            if name != "__metadata__":
                locations[name] = file
    return locations


def read_tensors(locations: Mapping[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Load exactly ``names`` (CPU tensors) through ``safe_open``; the other tensors are never read."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name not in locations:
            raise QuantStateError(f"tensor {name!r} is not in the checkpoint")
        by_file.setdefault(locations[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, wanted in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
        except QuantStateError:
            raise
        except Exception as error:  # safetensors raises several types for damaged files
            raise InputError(f"{file}: cannot read {wanted[0]!r} ({error})") from error
    return tensors


# ---------------------------------------------------------------------------- staging
def stage(destination: Path, *, overwrite: bool) -> Path:
    """A fresh hidden directory next to ``destination`` to build the export in (dead exports' leftovers go first)."""
    if destination.exists():
        if not destination.is_dir():
            raise InputError(f"{destination} exists and is not a directory")
        if any(destination.iterdir()) and not overwrite:
            raise InputError(f"{destination} is not empty; choose a new directory or pass overwrite=True (--force)")
    return make_staging_directory(destination)


def commit(staging: Path, destination: Path) -> None:
    """Move the finished export into place (replacing an existing ``destination`` only at the very end).

    Every file and directory gets the umask's permissions first: safetensors (the scale
    shard, ``save_pretrained``'s weights) writes files readable by their owner only.
    """
    apply_umask(staging)
    if not destination.exists():
        os.replace(staging, destination)
        return
    retired = staging_path(destination, "old")
    os.replace(destination, retired)
    try:
        os.replace(staging, destination)
    except BaseException:
        os.replace(retired, destination)  # the previous export stays where it was
        raise
    shutil.rmtree(retired, ignore_errors=True)


# ---------------------------------------------------------------------------- weights
def copy_model_directory(source: Path, target: Path) -> None:
    """Copy a Hugging Face model directory's top-level files, safetensors weights included, byte for byte.

    Other weight formats (``*.bin``, ``*.gguf`` ...) are left behind: next to safetensors an
    engine would load one set or both. Subdirectories (``original/`` ...) are not copied.
    """
    if not (source / "config.json").is_file():
        raise InputError(f"{source} has no config.json; pass a Hugging Face model directory")
    if not list(source.glob("*.safetensors")):
        raise InputError(
            f"{source} holds no *.safetensors weights; load the model and pass it as an object "
            "(its save_pretrained writes safetensors), or convert the directory first"
        )
    for entry in sorted(source.iterdir()):
        if entry.is_file() and not entry.name.startswith(".") and not entry.name.endswith(_SKIPPED_SUFFIXES):
            shutil.copyfile(entry, target / entry.name)


def _dequantized_gguf(model: Any) -> bool:
    """Whether ``model`` was loaded from GGUF with every weight dequantized to a float tensor.

    Transformers keeps its GGUF quantizer on such a model and then refuses
    ``save_pretrained`` ("not serializable"), although nothing GGUF-specific is left in it.
    Layers that kept packed GGUF blocks (a ``Gguf*``/``Ggml*`` module, integer weights)
    have no safetensors form: that is refused with the way out.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return False
    packed = any(("gguf" in type(m).__name__.lower() or "ggml" in type(m).__name__.lower()) for m in model.modules())
    if packed or not all(parameter.is_floating_point() for parameter in model.parameters()):
        raise InputError(
            "the model keeps GGUF-packed weights, which have no safetensors form; load it dequantized "
            "(without the 'kernels' package) or pass the original Hugging Face model directory"
        )
    return True


@contextmanager
def _without_gguf_quantizer(model: Any) -> Iterator[None]:
    """Hide a dequantized GGUF model's quantizer (and its config entry) while it is saved, then restore them."""
    quantizer = model.hf_quantizer
    config = model.config
    had_config = "quantization_config" in config.__dict__
    quantization_config = config.__dict__.get("quantization_config")
    model.hf_quantizer = None
    if had_config:
        del config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            config.quantization_config = quantization_config


def save_model(model: Any, tokenizer: Any, target: Path) -> None:
    """``save_pretrained`` a loaded model (and tokenizer) into ``target`` as safetensors.

    A model loaded from GGUF is saved as the float model it was dequantized to, with no
    ``quantization_config``: the checkpoint is a plain Hugging Face one.
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise InputError(f"model must be a model directory or a transformers model, got {type(model).__name__}")
    if _dequantized_gguf(model):
        with _without_gguf_quantizer(model):
            save(str(target))
    else:
        save(str(target))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    if not list(target.glob("*.safetensors")):
        raise InputError("save_pretrained wrote no *.safetensors file; upgrade transformers or save with safetensors")


def unify_layout(directory: Path) -> dict[str, str]:
    """Make ``directory`` an indexed checkpoint and return its weight map (tensor name -> file name).

    A lone ``model.safetensors`` is renamed (Transformers would otherwise ignore the index
    and with it the scale shard); unindexed shards get an index built from their headers.
    """
    index = directory / INDEX_NAME
    if index.is_file():
        return {name: path.name for name, path in tensor_locations(directory).items()}
    single = directory / _SINGLE_NAME
    if single.is_file():
        os.replace(single, directory / _RENAMED_SINGLE)
    weight_map: dict[str, str] = {}
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        total += _tensor_bytes(file)
        weight_map.update({name: file.name for name in _header(file) if name != "__metadata__"})
    write_json(index, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return weight_map


def add_scale_shard(
    directory: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, update_index: bool
) -> int:
    """Write :data:`SCALE_SHARD` and, for a full checkpoint, list its tensors in the index.

    Returns the shard's tensor bytes. ``format: pt`` metadata is what Transformers requires
    of a safetensors file before it reads it.
    """
    path = directory / SCALE_SHARD
    contiguous = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt", **metadata})
    size = _tensor_bytes(path)
    if update_index:
        index_path = directory / INDEX_NAME
        index = read_json(index_path)
        weight_map = index.setdefault("weight_map", {})
        weight_map.update({name: SCALE_SHARD for name in contiguous})
        index["weight_map"] = dict(sorted(weight_map.items()))
        meta = index.setdefault("metadata", {})
        if isinstance(meta, dict):
            meta["total_size"] = int(meta.get("total_size", 0) or 0) + size
        write_json(index_path, index)
    return size
