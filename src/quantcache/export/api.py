"""The two entry points behind ``quantcache export`` and ``quantcache import``.

:func:`export_checkpoint` runs every refusal a format has *before* copying weights
(gigabytes), then builds the directory beside its destination and moves it into place.
:func:`import_checkpoint` reads only a checkpoint's config and its KV scale tensors and
returns a frozen :class:`~quantcache.cache.cache.QuantizedCalibratingCache`, so ``quantcache
evaluate`` can measure someone else's calibration on the same text as ours.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.errors import InputError, QuantStateError
from quantcache.ops.quantize import compute_qparams
from quantcache.outputs import reporting_write_failures, write_failure_error
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.settings import Engine

from .checkpoint import (
    INDEX_FRAGMENT,
    NOTE_NAME,
    SCALE_SHARD,
    add_scale_shard,
    commit,
    copy_model_directory,
    save_model,
    stage,
    tensor_locations,
    unify_layout,
    write_json,
)
from .common import ExportResult, KVFormat, KVState, UnsupportedSchemeError
from .registry import FORMATS, get_format

__all__ = ["ImportResult", "export_checkpoint", "import_checkpoint", "served_numerics"]


@dataclass
class ImportResult:
    """A foreign checkpoint's KV scales as a frozen cache, and what that import means."""

    cache: QuantizedCalibratingCache
    format: str
    checkpoint: Path
    layers: list[int]
    symmetric: bool
    note: str


def _model_directory(model: Any) -> Path | None:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_dir():
            raise InputError(
                f"{path} is not a model directory; for a Hub id, a .gguf file or a known model name, load "
                "it first (quantcache.models.loading.load_model) and pass the model object"
            )
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json; pass a Hugging Face model directory")
        if (path / SCALE_SHARD).exists():
            raise InputError(
                f"{path} already holds {SCALE_SHARD} (a quantcache export); export from the original model directory"
            )
        return path
    return None


def _check_model(kv: KVState, model: Any, source: Path | None) -> None:
    """Refuse a model whose shape is not the one the state was calibrated on (reads config.json only)."""
    config = _config_of(source) if source is not None else getattr(model, "config", None)
    if config is None:
        return  # save_model reports what is wrong with the object
    probe = QuantizedCalibratingCache(config, KVQuantConfig(), warn_unmatched=False)
    theirs = {
        "model_type": probe.model_type,
        "num_layers": len(probe.layer_names),
        "kv_heads": probe.kv_heads,
        "head_dim": probe.head_dim,
    }
    mine = {"model_type": kv.model_type, "num_layers": kv.num_layers, "kv_heads": kv.kv_heads, "head_dim": kv.head_dim}
    differing = [key for key in mine if mine[key] is not None and mine[key] != theirs[key]]
    if differing:
        detail = ", ".join(f"{key} {mine[key]} vs {theirs[key]}" for key in differing)
        raise QuantStateError(f"the state was calibrated for another model: {detail} (state vs model)")


def _note(fmt: KVFormat, kv: KVState, options: Any, result: ExportResult, tensors: dict[str, torch.Tensor]) -> str:
    example = next(iter(tensors))
    lines = [
        "# KV cache scales exported by quantcache",
        "",
        f"- format: `{fmt.name}` ({FORMATS[fmt.name].summary})",
        f"- source state: {kv.scheme_text} INT8 per-channel, {len(kv.layers)} of {kv.num_layers} layers quantized"
        + (f" (excluded: {kv.excluded})" if kv.excluded else ""),
        f"- KV shape: {kv.kv_heads} heads x {kv.head_dim} channels",
        f"- `{SCALE_SHARD}`: {len(tensors)} tensors, e.g. `{example}` {list(tensors[example].shape)} "
        f"{str(tensors[example].dtype).replace('torch.', '')}",
        "",
        "## Serve",
        "",
        "```bash",
        result.serve_command,
        "```",
    ]
    if result.warnings:
        lines += ["", "## Notes", ""] + [f"- {warning}" for warning in result.warnings]
    if result.scales_only:
        lines += ["", "## Merge into an existing checkpoint", "", fmt.merge_note(kv, options).rstrip()]
    return "\n".join(lines) + "\n"


LENGTH_UNSAFE_NOTE = (
    "these static key ranges hold for the positions the calibration windows reached: keys served at later "
    "positions leave them and clip (RoPE turns them). `quantcache calibrate --preset c8` writes the same format "
    "with key ranges that hold at any context length"
)
"""The export's note on a state whose key ranges are not length-safe (see ``KVQuantConfig.length_safe``)."""


def export_checkpoint(
    state: Any,
    destination: str | os.PathLike[str],
    *,
    format: str,
    model: Any = None,
    tokenizer: Any = None,
    scales_only: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> ExportResult:
    """Write ``state``'s KV scales as a checkpoint directory that ``format``'s engine loads as is.

    Args:
        state: a frozen ``QuantizedCalibratingCache``, a ``StateFile``, a state file or a run directory.
        destination: the directory to create (refused if it exists and is not empty, unless ``overwrite``).
        format: a name in :data:`quantcache.export.FORMATS`.
        model: a Hugging Face model directory (its safetensors shards are copied byte for
            byte, other files alongside) or a loaded model (written with ``save_pretrained``).
            Not needed with ``scales_only``; if given then as a directory, its tensor names are checked.
        tokenizer: saved next to a model object's weights.
        scales_only: write only the scale shard, config fragments and a merge note.
        overwrite: replace a non-empty ``destination`` (only once the new export is complete).
        **options: the format's own switches (``strategy=`` for vllm; ``allow_asymmetric=``,
            ``int8_offsets=`` for ascend).

    Raises:
        UnsupportedSchemeError: (a ``ConfigError``) the target cannot represent the state; names what would.
        QuantStateError: the state is not frozen or does not fit the model.
        InputError: unusable model directory or destination.
    """
    fmt = get_format(format)
    chosen = fmt.options(options)
    kv = KVState.load(state)
    target = Path(destination)
    warnings = fmt.check(kv, chosen, None, None)
    if not kv.config.length_safe:
        warnings.append(LENGTH_UNSAFE_NOTE)
    source = _model_directory(model)
    if not scales_only and model is None:
        raise InputError(
            "a full export needs the model whose weights go next to the scales: pass model= (a model "
            "directory or a loaded model), or scales_only=True (--scales-only) for the scales alone"
        )
    if model is not None:
        _check_model(kv, model, source)
    weight_names: set[str] = set()
    if source is not None:  # refuse before copying gigabytes
        weight_names = set(tensor_locations(source))
        warnings += fmt.check(kv, chosen, source, weight_names)
    with reporting_write_failures(target, InputError, "the export"):
        staging = stage(target, overwrite=overwrite)
    try:
        if not scales_only:
            if source is not None:
                copy_model_directory(source, staging)
                unify_layout(staging)
            else:
                save_model(model, tokenizer, staging)
                weight_names = set(unify_layout(staging))
                warnings += fmt.check(kv, chosen, staging, weight_names)
        tensors = fmt.scale_tensors(kv, chosen)
        clash = sorted(set(tensors) & weight_names)
        if clash:
            raise UnsupportedSchemeError(
                f"the model checkpoint already holds KV scale tensors ({clash[0]} ...); engines would load "
                "both. Export from a checkpoint without KV scales"
            )
        from quantcache import __version__

        metadata = {"quantcache_format": fmt.name, "quantcache_version": __version__}
        add_scale_shard(staging, tensors, metadata, update_index=not scales_only)
        files = [SCALE_SHARD]
        if scales_only:
            write_json(staging / INDEX_FRAGMENT, {"weight_map": {name: SCALE_SHARD for name in sorted(tensors)}})
            files.append(INDEX_FRAGMENT)
        files += fmt.write_config(staging, kv, chosen, tensors, scales_only=scales_only)
        result = ExportResult(
            directory=target,
            format=fmt.name,
            scales_only=scales_only,
            files=[*files, NOTE_NAME],
            tensors=sorted(tensors),
            warnings=list(dict.fromkeys(warnings)),
            serve_command=fmt.serve_command(Path("CKPT") if scales_only else target, kv, chosen),
        )
        (staging / NOTE_NAME).write_text(_note(fmt, kv, chosen, result, tensors), encoding="utf-8")
        commit(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        failure = write_failure_error(error, target, InputError, "the export")
        if failure is not None:
            raise failure from error
        raise
    return result


def served_numerics(state: Any, engine: str) -> tuple[Engine, list[str]]:
    """The engine arithmetic ``evaluate --as engine`` applies to ``state``, after the export's refusals.

    ``engine`` names an export format (``ascend``, ``vllm``, ``modelopt``); its ``numerics`` is what
    is returned, so ``--as`` and ``export --format`` always agree on the engine. ``state`` is anything
    :meth:`KVState.load` takes. A state the format could not write is refused exactly as ``export``
    refuses it (:class:`QuantStateError` for a scheme no engine reads, :class:`UnsupportedSchemeError`
    for one this format cannot carry), each naming the fix; the check uses the format's
    ``widest_options`` (ascend: asymmetric states are accepted, as ``--allow-asymmetric`` writes
    them). Returns ``(engine, warnings)``: the export's notes on what the engine does with the state.
    """
    fmt = get_format(engine)
    kv = KVState.load(state)
    warnings = fmt.check(kv, fmt.options(fmt.widest_options), None, None)
    return fmt.numerics, warnings


def _config_of(checkpoint: Path) -> Any:
    from transformers import AutoConfig

    if not (checkpoint / "config.json").is_file():
        raise InputError(f"{checkpoint} has no config.json; pass model= to say which model the scales belong to")
    try:
        return AutoConfig.from_pretrained(str(checkpoint))
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{checkpoint}/config.json cannot be read by transformers ({error}); pass model=") from error


def import_checkpoint(checkpoint: str | os.PathLike[str], *, format: str, model: Any = None) -> ImportResult:
    """Read ``checkpoint``'s KV scales (those tensors only, via ``safe_open``) into a frozen cache.

    ``model`` (a model or config) tells which attention modules exist; by default the
    checkpoint's own ``config.json`` does, without loading any weight. Layers without
    scales become excluded layers. ``result.cache.save(path)`` writes a normal state file.
    """
    fmt = get_format(format)
    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(f"checkpoint directory not found: {path}")
    model_or_config = model if model is not None else _config_of(path)
    probe = QuantizedCalibratingCache(model_or_config, KVQuantConfig(), warn_unmatched=False)
    if probe.kv_heads is None or probe.head_dim is None:
        raise InputError(f"cannot tell kv_heads and head_dim from {path}/config.json; pass model=")
    names = list(probe.layer_names)
    imported = fmt.read(path, names, tensor_locations(path), (probe.kv_heads, probe.head_dim))
    excluded = tuple(name for index, name in enumerate(names) if index not in imported.streams)
    config = KVQuantConfig(symmetric=imported.symmetric, exclude=excluded)
    cache = QuantizedCalibratingCache(model_or_config, config, warn_unmatched=False)
    state: dict[str, torch.Tensor] = {}
    for index, streams in imported.streams.items():
        for stream, (low, high, scale, zero_point) in streams.items():
            if scale is None or zero_point is None:
                scale, zero_point = compute_qparams(low, high, symmetric=imported.symmetric)
            prefix = f"layers.{index}.{stream}"
            state.update(
                {
                    f"{prefix}.min": low,
                    f"{prefix}.max": high,
                    f"{prefix}.scale": scale,
                    f"{prefix}.zero_point": zero_point,
                }
            )
    cache.load_state_dict(state, origin=f"imported from {fmt.name}")
    return ImportResult(cache, fmt.name, path, sorted(imported.streams), imported.symmetric, imported.note)
