"""The tensors of one stream in a state: which fields it has, and everything that can be wrong with them.

A stream's fields are its observer's statistics (``min``, ``max`` for ``minmax``; ``low``,
``high``, ``weight`` for the averaged observers; ``center_sum``, ``center_count`` for a
centred dynamic stream, and ``key_square_sum``, ``query_square_sum``, ``query_count`` for a
query-aware one, and ``query_moment_sum`` for one that rounds query-aware) and, once frozen,
its parameters (``scale``, ``zero_point``, or a centred dynamic stream's ``center``, a
query-aware one's ``channel_scale``, and ``query_diag``, ``query_factor`` for query-aware
rounding). The
loader (:mod:`quantcache.cache.state`) and the file validator
(:func:`quantcache.state.file.validate_state`) both check streams here, so a state is
judged the same way wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quantcache.ops.granularity import Granularity
from quantcache.ops.observers import OBSERVERS, QueryAwareCenterObserver, QueryMomentObserver, make_observer
from quantcache.ops.quantize import compute_qparams
from quantcache.ops.rounding import QUERY_MODEL_RANK, query_model
from quantcache.scheme.args import QuantArgs, Rounding
from quantcache.scheme.config import KVQuantConfig

__all__ = [
    "CENTER_FIELDS",
    "PARAMETER_FIELDS",
    "QUERY_MODEL_FIELDS",
    "missing_fields",
    "parameter_fields",
    "statistic_fields",
    "stream_problems",
]

PARAMETER_FIELDS = ("scale", "zero_point")
CENTER_FIELDS = ("center",)
QUERY_AWARE_FIELDS = (*CENTER_FIELDS, "channel_scale")
QUERY_MODEL_FIELDS = ("query_diag", "query_factor")
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

    A query-aware key stream adds ``channel_scale`` to its ``center``, and ``query_diag``,
    ``query_factor`` when it rounds query-aware.
    """
    if not args.dynamic:
        return PARAMETER_FIELDS
    if args.rounding is Rounding.QUERY_AWARE:
        return (*QUERY_AWARE_FIELDS, *QUERY_MODEL_FIELDS)
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
        if not args.stores_zero_point and bool((zero_point != 0).any()):
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
    # Every field is (kv_heads, head_dim) but the query moment's (..., head_dim) and the factor's (..., rank).
    trailing = {"query_moment_sum": head_dim, "query_factor": QUERY_MODEL_RANK}
    shapes = {name: tuple(tensor.shape) for name, tensor in fields.items()}
    if kv_heads is not None and head_dim is not None:
        extra = {name: (trailing[name],) if name in trailing else () for name in shapes}
        consistent = all(shape == (kv_heads, head_dim, *extra[name]) for name, shape in shapes.items())
    else:  # no model to check against: the fields must agree among themselves
        ranks = all(len(shape) == 2 + (name in trailing) for name, shape in shapes.items())
        consistent = ranks and len({shape[:2] for shape in shapes.values()}) <= 1
    if not consistent:
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
    for name in ("query_count", "key_square_sum", "query_square_sum", "channel_scale", "query_diag"):
        if name in fields and bool((fields[name] < 0).any()):
            return [f"{prefix}.{name} holds negative values; the state is corrupted"]
    if "channel_scale" in fields and bool((fields["channel_scale"] == 0).any()):
        return [f"{prefix}.channel_scale holds zeros, which no key could be read back through"]
    complete = all(name in fields for name in ("center_sum", "center_count", "center"))
    if derived and complete and not torch.equal(fields["center_sum"] / fields["center_count"], fields["center"]):
        problems.append(f"{prefix}: center differs from center_sum / center_count; the state was altered")
    if derived and all(name in fields for name in (*QUERY_MODEL_FIELDS, "query_moment_sum", "query_count")):
        moment = QueryMomentObserver.query_moment_from(fields)
        # Compared as the matrices they model: an eigenvector's sign may differ on another device.
        diag, factor = (tensor.to(moment.device) for tensor in query_model(moment))
        tolerance = float(moment.diagonal(dim1=-2, dim2=-1).abs().max()) * 1e-4
        saved_diag, saved_factor = fields["query_diag"], fields["query_factor"]
        low_rank, saved_low_rank = factor @ factor.mT, saved_factor @ saved_factor.mT
        if not (
            torch.allclose(diag, saved_diag, rtol=1e-4, atol=tolerance)
            and torch.allclose(low_rank, saved_low_rank, rtol=1e-4, atol=tolerance)
        ):
            problems.append(f"{prefix}: query_diag/query_factor differ from what its query_moment_sum implies")
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
