"""Quantization math: small pure tensor functions, written once for every format and granularity.

Shapes: key/value states arrive as ``(batch, kv_heads, seq, head_dim)``. Parameters
have the shape their :class:`~quantcache.ops.granularity.Granularity` gives; the default,
``per_channel``, is ``(kv_heads, head_dim)``: one per column of
``states.transpose(1, 2).reshape(-1, kv_heads * head_dim)``, which is msModelSlim's
layout. All arithmetic is done in float32 whatever the model dtype, so fp16/bf16
models get the same parameters as fp32 ones; results come back in the input dtype.

The formulas, for an integer format with codes ``[qmin, qmax]`` (INT8: -128, 127):

* symmetric: ``min := min(min, 0)``, ``max := max(max, 0)``,
  ``scale = max(-min, max) / qmax`` floored at float32 eps, ``zero_point = 0``;
* asymmetric: ``scale = (max - min) / (qmax - qmin)`` (same floor, and at least
  ``max(|min|, |max|) / 2**20`` so that a constant channel far from zero keeps an exact,
  finite zero point), ``zero_point = round(-min / scale) + qmin``;
* quantize: ``q = clamp(round(x / scale + zero_point), qmin, qmax)``;
* dequantize: ``(q - zero_point) * scale``.

The mid-rise grid (``zero_level: false``, dynamic symmetric integer schemes) is the same
formulas with ``zero_point = -1/2`` and ``scale = max|x| / (levels / 2)``: levels at
``(q + 1/2) * scale``, symmetric about zero, every code used, zero not among them.

Float8 formats are symmetric: ``scale = absmax / finfo.max`` (what serving engines
expect), ``q = clamp(x / scale, -finfo.max, finfo.max)`` cast to the float8 type.

Non-finite states stay non-finite: a NaN or Inf element comes back as it went in
(element-wise, with no host synchronisation), never as a finite code.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import torch

from quantcache.ops.granularity import Granularity
from quantcache.scheme.number_formats import (
    FORMATS,
    FormatKind,
    NumberFormat,
    QuantDtype,
    ScaleFormat,
    ZeroPointFormat,
)

__all__ = [
    "INT8_MAX",
    "INT8_MIN",
    "PreparedParams",
    "QuantParams",
    "all_finite",
    "channel_minmax",
    "compute_qparams",
    "dequantize",
    "dynamic_qparams",
    "fake_quantize",
    "fake_quantize_prepared",
    "log8_table",
    "prepare_params",
    "quantize",
    "quantize_prepared",
    "saturated",
    "stream_minmax",
]

INT8 = FORMATS[QuantDtype.INT8]
INT8_MIN = int(INT8.qmin)
INT8_MAX = int(INT8.qmax)
PER_CHANNEL = Granularity()
_EPS = torch.finfo(torch.float32).eps
# Largest |x / scale| an asymmetric scale allows: float32 still resolves 1/8 of a step there.
_ASYMMETRIC_MAX_OFFSET = float(2**20)
DYNAMIC_MAX_OFFSET = float(2**10)
MID_RISE_ZERO_POINT = -0.5
"""The mid-rise grid's zero point: code ``q`` decodes to ``(q + 1/2) * scale``."""


class QuantParams(NamedTuple):
    """Fixed quantization parameters of one stream, shaped as the granularity says.

    ``scale`` is float32; ``zero_point`` holds integers as int32 (an asymmetric
    channel whose whole range lies far from zero can need a zero point outside the
    code range), or ``-1/2`` as float32 for the mid-rise grid.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def to(self, device: torch.device | str) -> QuantParams:
        """The same parameters on ``device``."""
        return QuantParams(self.scale.to(device), self.zero_point.to(device))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no element of ``tensors`` (all on one device) is NaN or Inf.

    Calibration raises on a non-finite statistic, so the answer must reach the host: it
    does so once for all the tensors (one host synchronisation per call, not one per
    tensor). Frozen caches never call this.
    """
    flags = [torch.isfinite(tensor).all() for tensor in tensors]
    return not flags or bool(torch.stack(flags).all())


def stream_minmax(states: torch.Tensor, granularity: Granularity = PER_CHANNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``(batch, kv_heads, seq, head_dim)`` states over what shares a parameter.

    Returns two float32 tensors of the granularity's parameter shape. The reduction
    runs in the input dtype (a min or max is one of its inputs, so this is exact) and
    only the small result is converted.
    """
    if states.dim() != 4:
        raise ValueError(f"expected states of shape (batch, kv_heads, seq, head_dim), got {tuple(states.shape)}")
    if states.shape[0] == 0 or states.shape[2] == 0:
        raise ValueError("cannot take min/max over an empty batch or sequence")
    detached = states.detach()
    return granularity.reduce(detached, torch.amin).float(), granularity.reduce(detached, torch.amax).float()


def channel_minmax(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max, each ``(kv_heads, head_dim)`` (the seed's statistics)."""
    return stream_minmax(states, PER_CHANNEL)


def compute_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    *,
    symmetric: bool,
    fmt: NumberFormat = INT8,
    max_offset: float = _ASYMMETRIC_MAX_OFFSET,
) -> QuantParams:
    """Turn a range into parameters for ``fmt`` (see the module docstring).

    ``max_offset`` is the asymmetric relative floor's ``2**20``: the largest
    ``|x / scale|`` allowed, which bounds the zero point.
    """
    min_val = min_val.float()
    max_val = max_val.float()
    if symmetric or fmt.kind is FormatKind.FLOAT:
        min_neg = torch.clamp(min_val, max=0.0)
        max_pos = torch.clamp(max_val, min=0.0)
        scale = torch.clamp(torch.maximum(-min_neg, max_pos) / float(fmt.symmetric_max), min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        # The relative floor only matters for a (near-)constant channel far from zero: there the
        # eps floor alone would make ``-min / scale`` overflow int32 and float32 precision.
        magnitude = torch.maximum(min_val.abs(), max_val.abs())
        floor = torch.clamp(magnitude / max_offset, min=_EPS)
        scale = torch.maximum((max_val - min_val) / float(fmt.qmax - fmt.qmin), floor)
        zero_point = (torch.round(-min_val / scale) + fmt.qmin).to(torch.int32)
    return QuantParams(scale, zero_point)


class PreparedParams(NamedTuple):
    """Parameters ready to broadcast against the grouped states: float32 on the states' device.

    ``zero_point`` is ``None`` when it is known to be all zeros (symmetric and float
    formats), which saves the add and subtract. A quantizer prepares its fixed
    parameters once per device (:func:`prepare_params`) instead of at every update.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None


def prepare_params(
    params: QuantParams, granularity: Granularity, device: torch.device, *, zero_point: bool = True
) -> PreparedParams:
    """``params`` as float32 on ``device``, shaped to broadcast (``zero_point=False``: it is all zeros)."""
    scale = _broadcast(params.scale, granularity, device)
    return PreparedParams(scale, _broadcast(params.zero_point, granularity, device) if zero_point else None)


def _broadcast(param: torch.Tensor, granularity: Granularity, device: torch.device) -> torch.Tensor:
    """One parameter tensor as float32 on ``device``, shaped to broadcast against the grouped states."""
    return granularity.broadcast(param.to(device=device, dtype=torch.float32), param)


def quantize(
    states: torch.Tensor, params: QuantParams, granularity: Granularity = PER_CHANNEL, fmt: NumberFormat = INT8
) -> torch.Tensor:
    """``(batch, kv_heads, seq, head_dim)`` float states -> codes of the same shape in ``fmt.storage_dtype``."""
    return quantize_prepared(states, prepare_params(params, granularity, states.device), granularity, fmt)


def quantize_prepared(
    states: torch.Tensor, prepared: PreparedParams, granularity: Granularity, fmt: NumberFormat
) -> torch.Tensor:
    """:func:`quantize` with parameters already prepared."""
    codes = _levels(granularity.grouped(states), prepared, fmt).to(fmt.storage_dtype)
    return granularity.ungrouped(codes, states.shape[-1])


def _levels(view: torch.Tensor, prepared: PreparedParams, fmt: NumberFormat) -> torch.Tensor:
    """A new float32 tensor of the codes as values: ``clamp(round(x / scale + zero_point))`` (float: unrounded)."""
    scaled = view.float() / prepared.scale
    if fmt.kind is FormatKind.FLOAT:
        return scaled.clamp_(fmt.qmin, fmt.qmax)
    if prepared.zero_point is not None:
        scaled.add_(prepared.zero_point)
    return scaled.round_().clamp_(fmt.qmin, fmt.qmax)


def dequantize(
    codes: torch.Tensor,
    params: QuantParams,
    dtype: torch.dtype = torch.float32,
    granularity: Granularity = PER_CHANNEL,
) -> torch.Tensor:
    """Codes -> float states ``(codes - zero_point) * scale`` in ``dtype``."""
    restored = granularity.grouped(codes).to(torch.float32) - _broadcast(params.zero_point, granularity, codes.device)
    restored.mul_(_broadcast(params.scale, granularity, codes.device))
    return granularity.ungrouped(restored, codes.shape[-1]).to(dtype)


def fake_quantize(
    states: torch.Tensor, params: QuantParams, granularity: Granularity = PER_CHANNEL, fmt: NumberFormat = INT8
) -> torch.Tensor:
    """Quantize then dequantize, in the states' dtype: what a quantized cache gives back.

    NaN and Inf elements are returned unchanged (a code cannot hold them, and a cache
    that turned an overflow into a finite value would hide the fault).
    """
    return fake_quantize_prepared(states, prepare_params(params, granularity, states.device), granularity, fmt)


def fake_quantize_prepared(
    states: torch.Tensor, prepared: PreparedParams, granularity: Granularity, fmt: NumberFormat
) -> torch.Tensor:
    """:func:`fake_quantize` with parameters already prepared: the hot path of a frozen cache.

    Equal, bit for bit, to ``dequantize(quantize(states))``: integer levels are already
    whole numbers inside the code range, so the round trip through the storage type is
    skipped (adding ``0.0`` turns a ``-0.0`` left by rounding into the ``+0.0`` that a
    stored integer code gives back); float8 levels do go through their type. NaN
    propagates through every step; only an infinite element needs putting back, and it is
    put back by a mask applied every time: asking first whether there is any would make
    the host wait for the device at every decode step.
    """
    restored = _round_trip(granularity.grouped(states), prepared, fmt)
    restored = granularity.ungrouped(restored, states.shape[-1]).to(states.dtype)
    return torch.where(torch.isinf(states), states, restored)


def _round_trip(view: torch.Tensor, prepared: PreparedParams, fmt: NumberFormat) -> torch.Tensor:
    """A new float32 tensor of the grouped ``view`` quantized and dequantized (see :func:`fake_quantize_prepared`)."""
    levels = _levels(view, prepared, fmt)
    if fmt.kind is FormatKind.FLOAT:
        levels = levels.to(fmt.storage_dtype).to(torch.float32)
    else:
        if prepared.zero_point is not None:
            levels.sub_(prepared.zero_point)
        levels.add_(0.0)
    return levels.mul_(prepared.scale)


def saturated(
    states: torch.Tensor, params: QuantParams, granularity: Granularity = PER_CHANNEL, fmt: NumberFormat = INT8
) -> torch.Tensor:
    """Boolean mask of the elements that clip: ``x / scale + zero_point`` rounds outside the code range."""
    view = granularity.grouped(states).float()
    levels = view / _broadcast(params.scale, granularity, states.device)
    levels = levels + _broadcast(params.zero_point, granularity, states.device)
    half_step = 0.0 if fmt.kind is FormatKind.FLOAT else 0.5
    return granularity.ungrouped((levels < fmt.qmin - half_step) | (levels > fmt.qmax + half_step), states.shape[-1])


def dynamic_qparams(
    states: torch.Tensor,
    granularity: Granularity,
    *,
    symmetric: bool,
    fmt: NumberFormat,
    search: int = 0,
    scale_format: ScaleFormat = ScaleFormat.FLOAT16,
    zero_point_format: ZeroPointFormat = ZeroPointFormat.INT16,
    zero_level: bool = True,
) -> QuantParams:
    """Per-token parameters of ``(batch, kv_heads, seq, head_dim)`` states, as a packed row stores them.

    Scales are rounded up to what ``scale_format`` stores (so the row's extreme still
    maps inside the code range; see :func:`stored_scale`). Asymmetric zero points fit
    ``zero_point_format``: for ``int16`` the asymmetric relative floor is ``2**10`` here,
    which only limits a (near-)constant group far from zero to 0.1 % precision; for
    ``int8`` each range is first widened to take in zero, so the zero point is a code.
    ``zero_level=False`` (symmetric only) gives the mid-rise grid's parameters.
    NaN and Inf elements are left out of the range, so they do not spoil their neighbours.

    ``search > 0`` (the dynamic ``mse`` method) also tries each group's range shrunk by
    ``1 - i / (2 * search)`` for ``0 < i < search`` and keeps, per group, the candidate
    whose stored parameters give the least squared error over its finite elements: a
    few clipped extremes buy a finer step for everything else, which matters most at
    2 to 4 bits. The stored form is the same, so decoding does not change.
    """
    finite = torch.isfinite(states)  # a NaN or Inf element must not spoil its finite neighbours' scale
    low = granularity.reduce(torch.where(finite, states, torch.inf).detach(), torch.amin).float()
    high = granularity.reduce(torch.where(finite, states, -torch.inf).detach(), torch.amax).float()
    zero_in_codes = zero_point_format is ZeroPointFormat.INT8 and not symmetric  # the zero point is one of the codes
    if zero_in_codes:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    stored = functools.partial(
        _stored_dynamic_params, symmetric=symmetric, fmt=fmt, scale_format=scale_format, zero_in_codes=zero_in_codes
    )
    if not zero_level:
        if not symmetric or fmt.kind is not FormatKind.INTEGER:
            raise ValueError(f"the mid-rise grid (zero_level=False) is symmetric and integer: {fmt.name}, {symmetric=}")
        stored = functools.partial(_stored_mid_rise_params, fmt=fmt, scale_format=scale_format)
    if search <= 0:
        return stored(low, high)
    # Every candidate at once, along a new leading axis: a handful of tensor operations per update.
    shrink = 1.0 - torch.arange(search, device=low.device, dtype=torch.float32) / (2.0 * search)
    candidates = stored(*(bound * shrink.view(search, *([1] * low.dim())) for bound in (low, high)))
    view = granularity.grouped(torch.where(finite, states, 0.0).detach().float())
    # The first of equals; ``min``'s indices, not ``argmin``, whose kernel reduces a leading axis 20x slower on CPU.
    best = _group_error(view.unsqueeze(0), candidates, fmt).min(dim=0, keepdim=True).indices
    return QuantParams(candidates.scale.gather(0, best).squeeze(0), candidates.zero_point.gather(0, best).squeeze(0))


def _stored_dynamic_params(
    low: torch.Tensor,
    high: torch.Tensor,
    *,
    symmetric: bool,
    fmt: NumberFormat,
    scale_format: ScaleFormat,
    zero_in_codes: bool = False,
) -> QuantParams:
    """Parameters of a ``[low, high]`` range as a packed row stores them: its scale and zero point.

    The zero point is int16-sized, or with ``zero_in_codes`` (a range that holds zero) one
    of the codes: clamped to them, which only bites where ``log8`` clamped a huge scale.
    """
    params = compute_qparams(low, high, symmetric=symmetric, fmt=fmt, max_offset=DYNAMIC_MAX_OFFSET)
    scale = stored_scale(params.scale, scale_format)
    if not symmetric:  # the zero point follows the stored scale
        zero_point = torch.round(-low / scale) + fmt.qmin
        if zero_in_codes:
            zero_point = zero_point.clamp(fmt.qmin, fmt.qmax)
        return QuantParams(scale, zero_point.to(torch.int32))
    return QuantParams(scale, params.zero_point)


def _stored_mid_rise_params(
    low: torch.Tensor, high: torch.Tensor, *, fmt: NumberFormat, scale_format: ScaleFormat
) -> QuantParams:
    """The mid-rise grid's parameters of a ``[low, high]`` range as a packed row stores them.

    ``max(|low|, |high|)`` is the outer edge of the outermost level's interval, half a
    step beyond it, so the extreme's error is at most half a step, like any other element.
    """
    half_levels = fmt.levels / 2.0
    scale = stored_scale(torch.clamp(torch.maximum(low.abs(), high.abs()) / half_levels, min=_EPS), scale_format)
    return QuantParams(scale, torch.full_like(scale, MID_RISE_ZERO_POINT))


def _group_error(view: torch.Tensor, params: QuantParams, fmt: NumberFormat) -> torch.Tensor:
    """Squared quantization error of every group of the grouped ``view`` under ``params`` (kept dims)."""
    prepared = PreparedParams(params.scale, params.zero_point.float() if fmt.kind is FormatKind.INTEGER else None)
    return _round_trip(view, prepared, fmt).sub_(view).square_().sum(dim=-1, keepdim=True)


# ``log8`` scale codes: ``scale = 2 ** ((code - LOG8_BIAS) / LOG8_STEPS)`` for codes 0..254; 255 marks a NaN row.
LOG8_STEPS = 8
LOG8_BIAS = 128
LOG8_NAN = 255
# Every code's scale, made once: decoding looks scales up instead of computing ``exp2``, whose last bit can
# differ between the vectorised and the scalar kernels, so a row decodes to the same bits whatever its batch.
_LOG8_POWERS = torch.exp2((torch.arange(LOG8_NAN, dtype=torch.float64) - LOG8_BIAS) / LOG8_STEPS).float()
_LOG8_TABLE = torch.cat([_LOG8_POWERS, torch.tensor([torch.nan])])


def stored_scale(scale: torch.Tensor, scale_format: ScaleFormat) -> torch.Tensor:
    """``scale`` (float32) rounded up to the nearest value ``scale_format`` can store, as float32.

    float16: up by a relative ``2**-10`` first, so rounding to nearest lands at or above
    it, and where it still lands below, the next float16 up (subnormal float16 values,
    under ``2**-14``, are spaced ``2**-24`` apart, which no relative nudge covers). log8:
    up to the next power of ``2 ** (1 / 8)``, clamped to ``[2**-16, 2**15.75]``; a scale
    above the top (states beyond about ``5e4 * qmax``) is stored as the top, and its
    extremes saturate, as they would overflow a float16 scale.
    """
    if scale_format is ScaleFormat.FLOAT16:
        nudged, above = _float16_nearest(scale * (1.0 + 2.0**-10))
        return torch.where(nudged < scale, above, nudged)
    return log8_decode(log8_encode(scale))


FLOAT16_MAX = 65504.0
_FLOAT16_DIGITS = 11  # significant bits of a float16, the implicit one included
_FLOAT16_LOWEST_STEP = -24  # log2 of the spacing of subnormal float16 values


def _float16_nearest(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``values`` rounded to the nearest float16 value (ties to even), kept in float32, and for positive
    values the next float16 value above that one: ``values.to(torch.float16).float()`` for every input (past
    :data:`FLOAT16_MAX` to infinity, subnormal and NaN alike), and ``torch.nextafter`` of it in float16.

    Arithmetic rather than a conversion and back: inductor (``torch.compile``) drops such a pair of casts
    as a no-op unless told to emulate them, and a compiled cache would then compute its codes with a scale
    other than the one its rows store. Scaling by powers of two is exact, so the rounding is ``round``'s.
    """
    _, exponent = torch.frexp(values)  # values = m * 2**exponent, 0.5 <= |m| < 1
    step = torch.exp2((exponent - _FLOAT16_DIGITS).clamp(min=_FLOAT16_LOWEST_STEP).to(values.dtype))
    nearest = torch.round(values / step) * step
    # rounding down keeps the binade, so the spacing above is the step's; past the largest float16 is infinity
    nearest, above = (torch.where(t.abs() > FLOAT16_MAX, t * torch.inf, t) for t in (nearest, nearest + step))
    return nearest, above


_LOG8_TABLES: dict[torch.device, torch.Tensor] = {}


def log8_table(device: torch.device) -> torch.Tensor:
    """The code -> scale table on ``device``, copied there once (decoding runs at every step).

    Kept in a plain dict rather than behind ``functools.cache``, whose wrapper ``torch.compile``
    cannot see into (it traces through it, with a warning).
    """
    table = _LOG8_TABLES.get(device)
    if table is None:
        table = _LOG8_TABLES[device] = _LOG8_TABLE.to(device)
    return table


def log8_encode(scale: torch.Tensor) -> torch.Tensor:
    """Positive float32 scales -> ``uint8`` codes of the smallest stored scale not below each (NaN -> 255)."""
    powers = log8_table(scale.device)[:LOG8_NAN]
    if torch.compiler.is_compiling():  # searchsorted's answer as a count, which the graph computes in its own loop
        code = (powers < scale.float().unsqueeze(-1)).sum(-1).clamp_(max=LOG8_NAN - 1)
    else:
        code = torch.searchsorted(powers, scale.float().contiguous()).clamp_(max=LOG8_NAN - 1)
    return torch.where(torch.isnan(scale), LOG8_NAN, code).to(torch.uint8)


def log8_decode(code: torch.Tensor) -> torch.Tensor:
    """``uint8`` codes -> float32 scales (:data:`LOG8_NAN` -> NaN)."""
    return log8_table(code.device)[code.long()]


def scale_to_bytes(scale: torch.Tensor, scale_format: ScaleFormat) -> torch.Tensor:
    """Stored float32 scales ``(..., 1)`` -> the ``uint8`` bytes a packed row keeps, ``(..., scale_format.bits // 8)``
    (NaN stays NaN: it marks a row that held NaN or Inf)."""
    if scale_format is ScaleFormat.LOG8:
        return log8_encode(scale)
    return scale.to(torch.float16).contiguous().view(torch.uint8)


def scale_from_bytes(raw: torch.Tensor, scale_format: ScaleFormat) -> torch.Tensor:
    """Inverse of :func:`scale_to_bytes`: ``uint8`` ``(..., groups * bytes)`` -> float32 scales ``(..., groups)``."""
    if scale_format is ScaleFormat.LOG8:
        return log8_decode(raw)
    return raw.contiguous().view(torch.float16).float()
