"""The tensors of one stream in a state: which fields it has, and everything that can be wrong with them.

A stream's fields are its observer's statistics (``min``, ``max`` for ``minmax``; ``low``,
``high``, ``weight`` for the averaged observers; ``center_sum``, ``center_count`` for a
centred dynamic stream, and ``key_square_sum``, ``query_square_sum``, ``query_count`` for a
query-aware one) and, once frozen, its parameters (``scale``, ``zero_point``, or a
centred dynamic stream's ``center``, and a query-aware one's ``channel_scale``). The
loader (:mod:`quantcache.cache_state`) and the file validator
(:func:`quantcache.serialization.validate_state`) both check streams here, so a state is
judged the same way wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import KVQuantConfig
from .granularity import Granularity
from .observers import OBSERVERS, QueryAwareCenterObserver, make_observer
from .quantization import compute_qparams
from .scheme import QuantArgs

__all__ = [
    "CENTER_FIELDS",
    "PARAMETER_FIELDS",
    "missing_fields",
    "parameter_fields",
    "statistic_fields",
    "stream_problems",
]

PARAMETER_FIELDS = ("scale", "zero_point")
CENTER_FIELDS = ("center",)
QUERY_AWARE_FIELDS = (*CENTER_FIELDS, "channel_scale")
_EPS = torch.finfo(torch.float32).eps
# |zero_point - code range| an asymmetric scale can need (its relative floor, see quantization.py).
_ZERO_POINT_REACH = 2**20 + 1


def _field_dtype(field: str) -> torch.dtype:
    """Documented dtype of a state tensor: int32 zero points, float32 for everything else."""
    return torch.int32 if field == "zero_point" else torch.float32


def statistic_fields(config: KVQuantConfig, stream: str, module_name: str | None = None) -> tuple[str, ...]:
    """The statistics the stream's observer saves (``min``, ``max`` for ``minmax``), in layer ``module_name``."""
    args = config.stream_args(stream, module_name)
    return make_observer(args).fields if args.calibrates else ()


def parameter_fields(args: QuantArgs) -> tuple[str, ...]:
    """The fields a frozen stream adds: ``scale``, ``zero_point`` (static), ``center`` (centred dynamic), or none.

    A query-aware key stream adds ``channel_scale`` to its ``center``.
    """
    if not args.dynamic:
        return PARAMETER_FIELDS
    if args.query_aware:
        return QUERY_AWARE_FIELDS
    return CENTER_FIELDS if args.center else ()


# ---------------------------------------------------------------------------- validation
def stream_problems(
    prefix: str,
    fields: Mapping[str, torch.Tensor],
    config: KVQuantConfig,
    stream: str,
    kv_heads: int | None,
    head_dim: int | None,
    *,
    derived: bool = True,
    module_name: str | None = None,
) -> list[str]:
    """Everything wrong with one stream's tensors (``prefix`` is ``layers.{i}.{stream}``, in ``module_name``).

    Checks the documented dtype of each field, the shape the scheme's granularity
    gives, finiteness, ``min <= max``, scales at or above the float32-eps floor,
    zero points inside the reach of the format (and 0 when symmetric), and, when
    both statistics and parameters are present and ``derived`` (a state we calibrated),
    that the parameters are exactly what the statistics imply.
    """
    args = config.stream_args(stream, module_name)
    problems: list[str] = []
    allowed = (*statistic_fields(config, stream, module_name), *parameter_fields(args))
    unknown = [name for name in fields if name not in allowed]
    if unknown:
        return [f"{prefix}.{unknown[0]} is not a field of method {args.method.value!r} (fields: {', '.join(allowed)})"]
    if args.dynamic:
        return problems + _center_problems(prefix, fields, kv_heads, head_dim, derived=derived)
    for name, tensor in fields.items():
        expected = _field_dtype(name)
        if tensor.dtype != expected:
            problems.append(f"{prefix}.{name} is {tensor.dtype}, expected {expected}")
    if problems:
        return problems
    shapes = {name: tuple(tensor.shape) for name, tensor in fields.items()}
    expected_shape: tuple[int, ...] | None = None
    if kv_heads is not None and head_dim is not None and not args.dynamic:
        try:
            expected_shape = Granularity.of(args).param_shape(kv_heads, head_dim)
        except ValueError as error:
            return [f"{prefix}: {error}"]
    if len(set(shapes.values())) > 1 or (expected_shape is not None and set(shapes.values()) != {expected_shape}):
        return [
            f"{prefix} tensors have shapes {shapes}, but this model's (kv_heads, head_dim) is "
            f"{(kv_heads, head_dim)} (parameters {expected_shape}); the state was made for another model"
        ]
    for name, tensor in fields.items():
        if name != "zero_point" and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{prefix}.{name} contains NaN or Inf")
    if problems:
        return problems
    statistics = {name: tensor for name, tensor in fields.items() if name not in PARAMETER_FIELDS}
    implied_range = None
    if statistics and set(statistics) == set(OBSERVERS[args.method].fields):
        if "weight" in statistics and bool((statistics["weight"] <= 0).any()):
            return [f"{prefix}.weight holds zero or negative values; statistics are corrupted"]
        observer = make_observer(args)
        observer.load(statistics)
        low, high = observer.range()
        if bool((low > high).any()):
            count = int((low > high).sum())
            problems.append(f"{prefix}: min > max in {count} element(s); statistics are corrupted")
        implied_range = (low, high)
    if "scale" in fields and bool((fields["scale"] < _EPS).any()):
        problems.append(f"{prefix}.scale holds zero, negative or values below the float32-eps floor")
    if "zero_point" in fields:
        zero_point = fields["zero_point"]
        fmt = args.format
        if args.symmetric and bool((zero_point != 0).any()):
            problems.append(f"{prefix}.zero_point is not 0 although the scheme is symmetric")
        elif bool(((zero_point < fmt.qmin - _ZERO_POINT_REACH) | (zero_point > fmt.qmax + _ZERO_POINT_REACH)).any()):
            problems.append(f"{prefix}.zero_point holds values outside what {fmt.name} can need")
    if derived and not problems and implied_range is not None and all(name in fields for name in PARAMETER_FIELDS):
        implied = compute_qparams(*implied_range, symmetric=args.symmetric, fmt=args.format)
        if not torch.equal(implied.scale, fields["scale"]) or not torch.equal(implied.zero_point, fields["zero_point"]):
            problems.append(f"{prefix}: scale/zero_point differ from what its min/max imply; the state was altered")
    return problems


def _center_problems(
    prefix: str, fields: Mapping[str, torch.Tensor], kv_heads: int | None, head_dim: int | None, *, derived: bool
) -> list[str]:
    """Everything wrong with a centred dynamic stream's ``center_sum``, ``center_count`` and ``center``."""
    problems = [
        f"{prefix}.{name} is {tensor.dtype}, expected torch.float32"
        for name, tensor in fields.items()
        if tensor.dtype != torch.float32
    ]
    if problems:
        return problems
    shapes = {name: tuple(tensor.shape) for name, tensor in fields.items()}
    expected = (kv_heads, head_dim) if kv_heads is not None and head_dim is not None else None
    if len(set(shapes.values())) > 1 or (expected is not None and set(shapes.values()) != {expected}):
        return [
            f"{prefix} tensors have shapes {shapes}, but this model's (kv_heads, head_dim) is "
            f"{(kv_heads, head_dim)}; the state was made for another model"
        ]
    problems = [f"{prefix}.{name} contains NaN or Inf" for name, t in fields.items() if not torch.isfinite(t).all()]
    if problems:
        return problems
    if "center_count" in fields and bool((fields["center_count"] <= 0).any()):
        return [f"{prefix}.center_count holds zero or negative values; statistics are corrupted"]
    # query_count may be 0: a calibrating state saved before any query was observed.
    for name in ("query_count", "key_square_sum", "query_square_sum", "channel_scale"):
        if name in fields and bool((fields[name] < 0).any()):
            return [f"{prefix}.{name} holds negative values; the state is corrupted"]
    if "channel_scale" in fields and bool((fields["channel_scale"] == 0).any()):
        return [f"{prefix}.channel_scale holds zeros, which no key could be read back through"]
    complete = all(name in fields for name in ("center_sum", "center_count", "center"))
    if derived and complete and not torch.equal(fields["center_sum"] / fields["center_count"], fields["center"]):
        problems.append(f"{prefix}: center differs from center_sum / center_count; the state was altered")
    if derived and "channel_scale" in fields and all(name in fields for name in QueryAwareCenterObserver.fields):
        implied = QueryAwareCenterObserver.channel_scale_from(fields)
        # Recomputed on another device the fourth root may differ in its last bits; an edit does not.
        if not torch.allclose(implied, fields["channel_scale"].to(implied.device), rtol=1e-5, atol=0.0):
            problems.append(f"{prefix}: channel_scale differs from what its statistics imply; the state was altered")
    return problems


def missing_fields(
    prefix: str,
    fields: Mapping[str, torch.Tensor],
    statistic_fields: tuple[str, ...],
    *,
    frozen: bool,
    parameter_fields: tuple[str, ...] = PARAMETER_FIELDS,
) -> list[str]:
    """Names of the fields a stream lacks.

    A calibrating stream needs its statistics; a frozen one needs its parameters and
    either all of its statistics or none (a state imported from another tool carries
    parameters only).
    """
    needed = list(parameter_fields) if frozen else []
    if not frozen or any(field in fields for field in statistic_fields):
        needed = list(statistic_fields) + needed
    return [f"{prefix}.{field}" for field in needed if field not in fields]
