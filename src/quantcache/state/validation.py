"""The one judge of a calibration state: every problem it has, for writing, reading and ``inspect`` alike.

:func:`validate_state` lists a state's problems; :func:`check_state` raises naming the first
ones. Writing (:func:`~quantcache.state.file.write_state_file`), reading
(:func:`~quantcache.state.file.read_state_file`), ``quantcache inspect`` and a strict
in-memory load ask it, so a state that one of them accepts is never refused by another.
"""

from __future__ import annotations

import os

import torch

from quantcache.errors import QuantStateError
from quantcache.state.fields import (
    missing_fields,
    parameter_fields,
    statistic_fields,
    stream_problems,
)
from quantcache.state.schema import CALIBRATED, IMPORTED_PREFIX, StateFile, parse_state_key

__all__ = ["check_state", "validate_state"]


def validate_state(stored: StateFile) -> list[str]:
    """Every problem of a state (empty when it is valid): the one decision behind writing, reading and ``inspect``.

    Besides each stream's own tensors (:func:`~quantcache.state.fields.stream_problems`) it
    judges the state as a whole: every layer it should quantize is there (a cache refuses to
    load a state that leaves a quantized layer without statistics or parameters, so such a
    state must not be written either), a calibrated frozen state carries the statistics its
    parameters are checked against, and the origin is one this reader knows.
    """
    problems = _origin_problems(stored.origin)
    if stored.calibration is not None:
        problems += stored.calibration.problems()
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in stored.tensors.items():
        parsed = parse_state_key(name)
        if parsed is None:
            problems.append(f"unexpected tensor {name[:80]!r}")
            continue
        index, stream, field = parsed
        if index >= stored.num_layers:
            problems.append(f"{name}: layer {index} is beyond the model's {stored.num_layers} layers")
            continue
        module = stored.layer_names[index]
        args = stored.config.stream_args(stream, module)
        if not args.calibrates:
            problems.append(f"unexpected tensor {name[:80]!r}: the {stream} stream is dynamic and saves nothing")
            continue
        if field not in (*statistic_fields(stored.config, stream, module), *parameter_fields(args)):
            problems.append(f"unexpected tensor {name[:80]!r}")
            continue
        grouped.setdefault((index, stream), {})[field] = tensor
    frozen = stored.mode == "frozen"
    calibrated = stored.origin == CALIBRATED
    for index in sorted({index for index, _ in grouped}):
        name = stored.layer_names[index]
        if not stored.config.is_quantized(name):
            problems.append(f"layer {index} ({name}) has tensors but the stored config does not quantize it")
        for stream in ("key", "value"):
            args = stored.config.stream_args(stream, name)
            if not args.calibrates:
                continue
            prefix = f"layers.{index}.{stream}"
            fields = grouped.get((index, stream), {})
            if not frozen and any(field in fields for field in parameter_fields(args)):
                problems.append(f"{prefix}: parameters present although mode is 'calibrate'")
            statistics = statistic_fields(stored.config, stream, name)
            missing = missing_fields(
                prefix, fields, statistics, frozen=frozen, parameter_fields=parameter_fields(args)
            )
            if missing:
                short = ", ".join(name.rsplit(".", 1)[1] for name in missing)
                problems.append(f"layer {index} {stream} lacks {short} (missing {missing}, mode {stored.mode})")
                continue
            if frozen and calibrated and statistics and not any(field in fields for field in statistics):
                problems.append(
                    f"{prefix}: frozen parameters without the statistics they were calibrated from "
                    f"({', '.join(statistics)}), so nothing can show that they are what calibration made; save the "
                    "state from the cache that calibrated it, or recalibrate (parameters taken from another tool "
                    f"belong in an imported state: quantcache import, or load_state_dict(..., origin='{IMPORTED_PREFIX}"
                    "TOOL'))"
                )
                continue
            problems += stream_problems(
                prefix,
                fields,
                stored.config,
                stream,
                stored.kv_heads,
                stored.head_dim,
                derived=calibrated,
                module_name=name,
            )
    if not grouped and any(args.calibrates for args in stored.config.all_stream_args()):
        problems.append("the state holds no layer")
    else:
        problems += _coverage_problems(stored, {index for index, _ in grouped})
    return problems


def _origin_problems(origin: str) -> list[str]:
    if origin == CALIBRATED or (origin.startswith(IMPORTED_PREFIX) and origin.strip() != IMPORTED_PREFIX.strip()):
        return []
    return [f"origin {origin[:80]!r} is neither {CALIBRATED!r} nor '{IMPORTED_PREFIX}FORMAT'"]


def _coverage_problems(stored: StateFile, present: set[int]) -> list[str]:
    """What is wrong with the set of layers a state covers: recorded layers it cannot hold, quantized layers it lacks.

    A layer counts as covered when it has tensors; a quantized layer whose streams calibrate
    nothing (uncentred dynamic ones) has none to have.
    """
    by_config = [index for index, name in enumerate(stored.layer_names) if stored.config.is_quantized(name)]
    expected = by_config
    if stored.quantized_layers is not None:
        recorded = stored.quantized_layers
        valid = all(type(index) is int and 0 <= index < stored.num_layers for index in recorded)
        if not valid or recorded != sorted(set(recorded)):
            return [
                f"model.quantized_layers {str(recorded)[:80]} is not an ascending list of layer indices below "
                f"{stored.num_layers}"
            ]
        foreign = [index for index in recorded if index not in by_config]
        if foreign:
            return [
                f"model.quantized_layers names layers {foreign[:8]} ({stored.layer_names[foreign[0]]} ...) that the "
                "stored config does not quantize"
            ]
        expected = recorded
    absent = [
        index
        for index in expected
        if index not in present
        and any(stored.config.stream_args(stream, stored.layer_names[index]).calibrates for stream in ("key", "value"))
    ]
    if not absent:
        return []
    return [
        f"quantized layers {absent[:8]}{' ...' if len(absent) > 8 else ''} ({stored.layer_names[absent[0]]} ...) "
        "have no tensors, and a cache cannot load a state that leaves a quantized layer without statistics; "
        "run the calibration text through the whole model (every layer observes it), or exclude those layers"
    ]


def check_state(stored: StateFile, where: str | os.PathLike[str]) -> None:
    """Raise :class:`QuantStateError` naming ``where`` and the first problems :func:`validate_state` finds.

    What writing, reading and ``quantcache inspect`` call, so that they accept and refuse
    the same states with the same words.
    """
    problems = validate_state(stored)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise QuantStateError(f"{where}: invalid state: {'; '.join(problems[:3])}{more}")
