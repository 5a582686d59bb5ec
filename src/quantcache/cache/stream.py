"""One object per layer: the observers, parameters and quantization of its K and V streams.

A :class:`StreamQuantizer` owns one stream (the keys or the values of one attention layer): its
:class:`~quantcache.scheme.args.QuantArgs`, an observer while calibrating (:mod:`quantcache.ops.observers`), fixed
:class:`~quantcache.ops.quantize.QuantParams` once frozen (none for a dynamic scheme: those are computed per
token; a centred dynamic scheme has its calibrated per-channel ``center`` instead, a query-aware key stream
its ``channel_scale`` too, and query-aware rounding its query model; see :mod:`quantcache.ops.stream_space`).
A :class:`LayerQuantizer` pairs the two streams of one layer and knows its name, so every
error it raises says which layer is at fault (:mod:`quantcache.cache.layer`).

Hook: :meth:`StreamQuantizer.fake_quantize` and :meth:`StreamQuantizer.encode` take an optional
``hook``, called after the quantization as ``hook(stream, states, quantized, params)`` with the
incoming states, what the cache will keep (same shape and dtype) and the parameters used. It is an
argument, not state: one quantizer serves many caches at once, and only the cache that asked
(evaluation's measuring cache, see :attr:`~quantcache.cache.cache.QuantizedCalibratingCache.on_quantize`)
hears about its own states.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, NamedTuple

import torch

from quantcache.errors import CalibrationError, NonFiniteStateError
from quantcache.ops.engine_numerics import EngineStream
from quantcache.ops.granularity import Granularity
from quantcache.ops.observers import (
    CenterObserver,
    Observer,
    QueryAwareCenterObserver,
    QueryMomentObserver,
    RopeRadiusObserver,
    make_observer,
)
from quantcache.ops.packing import CodeView, bits_per_slot, pack_codes, unpack_slots
from quantcache.ops.quantize import (
    MID_RISE_ZERO_POINT,
    PreparedParams,
    QuantParams,
    all_finite,
    compute_qparams,
    dynamic_qparams,
    fake_quantize_prepared,
    log8_table,
    prepare_params,
    quantize_prepared,
    saturated,
    scale_from_bytes,
    scale_to_bytes,
)
from quantcache.ops.rounding import QueryModel, RowGrid, query_model
from quantcache.ops.stream_space import StreamSpace
from quantcache.scheme.args import QuantArgs, QuantMethod, QuantScope, Rotation, Rounding
from quantcache.scheme.number_formats import FormatKind, ScaleFormat

__all__ = ["DYNAMIC_MSE_GRID", "QuantizeHook", "StreamName", "StreamQuantizer"]

StreamName = Literal["key", "value"]
DYNAMIC_MSE_GRID = 8
"""Shrink steps a dynamic ``mse`` stream tries per token unless ``observer_options.grid`` says otherwise."""
QuantizeHook = Callable[["StreamQuantizer", torch.Tensor, torch.Tensor, "QuantParams | EngineStream"], None]
"""``hook(stream, states, quantized, params)``; ``params`` is an :class:`EngineStream` where a cache stores what a
serving engine would decode (:class:`~quantcache.cache.storage_layers.EngineLayerMixin`)."""


class _FixedOnDevice(NamedTuple):
    """A static stream's fixed parameters on one device, in the forms the hot paths read."""

    params: QuantParams  # as saved: float32 scale, int32 zero point
    prepared: PreparedParams  # float32, shaped to broadcast against the states
    subtrahend: torch.Tensor | float  # offset + zero point: what decoding subtracts from a stored code


class StreamQuantizer:
    """Calibration statistics, fixed parameters and quantization of one stream.

    States are ``(batch, kv_heads, seq, head_dim)``; statistics and parameters have the
    shape of the scheme's granularity (``(kv_heads, head_dim)`` for the seed's
    per-channel INT8), float32, on the device of the first states observed.
    """

    def __init__(
        self, label: str, args: QuantArgs | None = None, expected_shape: tuple[int, int] | None = None
    ) -> None:
        self.label = label
        self.args = args = args if args is not None else QuantArgs()
        self.expected_shape = expected_shape
        self.granularity = Granularity.of(self.args)
        self.format = self.args.format
        self.observer: Observer = make_observer(self.args)
        self.params: QuantParams | None = None
        self.strict_finite = False
        """Raise :class:`~quantcache.errors.NonFiniteStateError` on NaN or Inf states instead of passing them
        through. Off by default: it is a check, and checking costs a host synchronisation at every update."""
        self._frozen = False
        self._fixed_by_device: dict[torch.device, _FixedOnDevice] = {}
        # The dynamic ``mse`` method: shrink steps tried per token (see quantization.dynamic_qparams); QuantArgs
        # validated the option.
        self._search = int(self.args.options.get("grid", DYNAMIC_MSE_GRID)) if self._searches else 0
        rotated = self.args.rotation is not Rotation.NONE
        if rotated and expected_shape is None:
            raise CalibrationError(f"{label}: a rotation needs the model's head_dim")
        self.space = StreamSpace(expected_shape[1] if expected_shape else None, args.rotation_seed if rotated else None)

    def __deepcopy__(self, memo: dict[int, Any]) -> StreamQuantizer:
        fresh = copy.copy(self)
        fresh.observer = copy.deepcopy(self.observer, memo)
        fresh.params = copy.deepcopy(self.params, memo)
        fresh.space = self.space.copy()
        fresh._fixed_by_device = {}
        return fresh

    def set_rope_pairs(self, pairs: int) -> None:
        """Tell a ``rope_radius`` stream the model's RoPE pairs (channel ``i`` with ``i + pairs``)."""
        if not isinstance(self.observer, RopeRadiusObserver):
            raise CalibrationError(f"{self.label}: only a rope_radius stream takes RoPE pairs")
        self.observer.set_rope_pairs(pairs)

    # ------------------------------------------------------------------ statistics
    @property
    def dynamic(self) -> bool:
        return self.args.dynamic

    @property
    def _searches(self) -> bool:
        return self.args.dynamic and self.args.method is QuantMethod.MSE

    @property
    def calibrates(self) -> bool:
        """Whether this stream learns anything from calibration (see :attr:`QuantArgs.calibrates`)."""
        return self.args.calibrates

    @property
    def statistics(self) -> dict[str, torch.Tensor]:
        return self.observer.statistics

    @property
    def min(self) -> torch.Tensor | None:
        return self.observer.statistics.get("min")

    @property
    def max(self) -> torch.Tensor | None:
        return self.observer.statistics.get("max")

    @property
    def observed(self) -> bool:
        """Whether freezing can give parameters: always for a dynamic scheme with nothing to calibrate."""
        return not self.calibrates or self.observer.observed

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(kv_heads, head_dim)`` of the states this stream accepts (what the model config declares)."""
        return self.expected_shape

    def _check_shape(self, states: torch.Tensor) -> None:
        expected = self.expected_shape
        if states.dim() != 4 or (expected is not None and (states.shape[1], states.shape[3]) != expected):
            raise CalibrationError(
                f"{self.label}: states of shape {tuple(states.shape)} do not fit this layer's "
                f"(kv_heads, head_dim) = {expected}; the cache was built or calibrated for another model shape"
            )

    @property
    def center(self) -> torch.Tensor | None:
        """A centred dynamic stream's calibrated ``(kv_heads, head_dim)`` mean once frozen, else None."""
        return self.space.center

    @property
    def channel_scale(self) -> torch.Tensor | None:
        """A query-aware key stream's calibrated ``(kv_heads, head_dim)`` channel scale once frozen, else None."""
        return self.space.channel_scale

    @torch.no_grad()
    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """The observer's statistics of ``states`` after validation, without touching the running ones.

        ``mask``: bool ``(batch, seq)``, True where ``states`` hold a real token (not padding).
        """
        if states.numel() == 0 or not self.calibrates:
            return None
        self._check_shape(states)
        # A center is the mean of the model's own states; a range is measured where the codes live.
        space = states if self.dynamic else self.space.forward(states)
        return self._finite(self.observer.measure(space, mask), "states")

    @torch.no_grad()
    def measure_queries(
        self, queries: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | None:
        """A query-aware key stream's statistics of ``(batch, heads, seq, head_dim)`` queries (nothing stored).

        ``heads`` must be a multiple of the layer's kv heads (query heads ``g * heads / kv_heads``
        onwards read kv head ``g``); ``mask`` leaves padding out, as in :meth:`measure`.
        """
        if not self.args.query_aware:
            raise CalibrationError(f"{self.label}: only a query-aware key stream (query_aware: true) observes queries")
        expected = self.expected_shape
        if queries.dim() != 4 or (
            expected is not None and (queries.shape[3] != expected[1] or queries.shape[1] % expected[0] != 0)
        ):
            raise CalibrationError(
                f"{self.label}: queries of shape {tuple(queries.shape)} do not fit this layer's (kv_heads, head_dim) "
                f"= {expected}; expected (batch, heads, seq, head_dim) with heads a multiple of kv_heads"
            )
        if queries.numel() == 0:
            return None
        assert isinstance(self.observer, QueryAwareCenterObserver)
        kv_heads = expected[0] if expected is not None else queries.shape[1]
        return self._finite(self.observer.measure_queries(queries, kv_heads, mask), "queries")

    def _finite(self, measured: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor] | None:
        """``measured`` (None when it is empty), or an error naming NaN or Inf among the calibration ``what``."""
        if not measured:
            return None
        if not all_finite(measured.values()):
            raise CalibrationError(
                f"{self.label}: calibration {what} contain NaN or Inf; check the model's dtype "
                "(fp16 overflow is common: try bfloat16 or float32) or exclude this layer"
            )
        return measured

    def merge(self, measured: Mapping[str, torch.Tensor] | None) -> None:
        """Fold a :meth:`measure` result into the running statistics (thread-safe)."""
        if measured:
            self.observer.merge(measured)

    def observe(self, states: torch.Tensor) -> None:
        """Fold the statistics of ``states`` into the running ones."""
        self.merge(self.measure(states))

    # ------------------------------------------------------------------ parameters
    def freeze(self) -> None:
        """Turn the statistics into fixed parameters (a dynamic scheme needs none)."""
        if self.dynamic:
            center = None
            if self.args.center:
                if not self.observer.observed:
                    raise CalibrationError(
                        f"{self.label}: no calibration statistics (center: true learns each channel's mean "
                        "from calibration text; calibrate before freezing)"
                    )
                assert isinstance(self.observer, CenterObserver)
                center = self.observer.center()
            channel_scale = model = None
            if self.args.query_aware:
                assert isinstance(self.observer, QueryAwareCenterObserver)
                if not self.observer.queries_observed:
                    raise CalibrationError(
                        f"{self.label}: query_aware: true weighs each key channel by the queries that read it, and "
                        "calibration saw no queries: calibrate with quantcache.calibrate(model, ...), which "
                        "computes them, or call quantcache.calibration.queries.observe_queries after each forward pass"
                    )
                channel_scale = self.observer.channel_scale()
                if isinstance(self.observer, QueryMomentObserver):
                    model = query_model(self.observer.query_moment())
            self.freeze_centered(center, channel_scale, model)
            return
        if not self.observer.observed:
            raise CalibrationError(f"{self.label}: no calibration statistics")
        low, high = self.observer.range()
        self.set_params(compute_qparams(low, high, symmetric=self.args.symmetric, fmt=self.format))

    def set_params(self, params: QuantParams | None) -> None:
        """Fix the parameters (frozen) or drop them (``None``: back to calibration)."""
        self.params = params
        self._frozen = params is not None
        self._fixed_by_device = {}
        if params is None:
            self.set_center(None)

    def freeze_centered(
        self, center: torch.Tensor | None, channel_scale: torch.Tensor | None = None, model: QueryModel | None = None
    ) -> None:
        """Freeze a dynamic stream with its ``(kv_heads, head_dim)`` center and, query-aware, channel scale.

        Both are ``None`` for a stream that does not centre; ``model`` is the query model
        of query-aware rounding (:func:`quantcache.ops.rounding.query_model`).
        """
        if not self.dynamic:
            raise CalibrationError(f"{self.label}: a static stream freezes with parameters, not a center")
        if self.args.center and center is None:
            raise CalibrationError(f"{self.label}: center: true needs its calibrated center to freeze")
        if self.args.query_aware and channel_scale is None:
            raise CalibrationError(f"{self.label}: query_aware: true needs its calibrated channel_scale to freeze")
        if (self.args.rounding is Rounding.QUERY_AWARE) != (model is not None):
            raise CalibrationError(f"{self.label}: a query model is what rounding: query_aware needs, and only it")
        self.set_params(None)
        self.set_center(center, channel_scale, model)
        self._frozen = True

    def set_center(
        self, center: torch.Tensor | None, channel_scale: torch.Tensor | None = None, model: QueryModel | None = None
    ) -> None:
        """Fix a centred dynamic stream's ``(kv_heads, head_dim)`` mean, channel scale, query model (``None``: drop)."""
        if center is not None and not self.args.center:
            raise CalibrationError(f"{self.label}: the scheme does not centre (center: false)")
        if channel_scale is not None and not self.args.query_aware:
            raise CalibrationError(f"{self.label}: the scheme is not query-aware (query_aware: false)")
        self.space.set(center, channel_scale, model)

    def unfreeze(self) -> None:
        self.set_params(None)

    def reset(self) -> None:
        """Forget statistics and parameters."""
        self.observer.reset()
        self.set_params(None)

    def params_for(self, quant_space: torch.Tensor) -> QuantParams:
        """The parameters for states already in the quantizer's space: fixed ones on their device, or per token."""
        if self.dynamic:
            return dynamic_qparams(
                quant_space,
                self.granularity,
                symmetric=self.args.symmetric,
                fmt=self.format,
                search=self._search,
                scale_format=self.args.scale_format,
                zero_point_format=self.args.zero_point_format,
                zero_level=self.args.zero_level,
            )
        return self._fixed_on(quant_space.device).params

    def prepared_for(self, quant_space: torch.Tensor, params: QuantParams) -> PreparedParams:
        """``params`` (from :meth:`params_for`) ready to broadcast; fixed ones are prepared once per device."""
        if self.dynamic:
            zero_point = self.args.decodes_with_zero_point
            return prepare_params(params, self.granularity, quant_space.device, zero_point=zero_point)
        return self._fixed_on(quant_space.device).prepared

    def _fixed_on(self, device: torch.device) -> _FixedOnDevice:
        """The fixed parameters on ``device`` in every form the hot paths use, made once per device."""
        if self.params is None:
            raise CalibrationError(f"{self.label}: not frozen")
        fixed = self._fixed_by_device.get(device)
        if fixed is None:
            params = self.params.to(device)
            prepared = prepare_params(params, self.granularity, device, zero_point=self.args.decodes_with_zero_point)
            offset = float(-self.format.qmin)
            subtrahend = offset if prepared.zero_point is None else prepared.zero_point + offset
            fixed = self._fixed_by_device[device] = _FixedOnDevice(params, prepared, subtrahend)
        return fixed

    def ready_on(self, device: torch.device) -> None:
        """Make on ``device`` now every tensor quantizing and decoding derive from the frozen parameters (fixed
        parameters prepared, the space's center, scales, rotation and feedback matrix, the ``log8`` table), so that
        no later call makes one: a compiled kernel whose first call made one is guarded on its absence, and would
        compile again on the next call. Nothing to do while calibrating."""
        if not self._frozen:
            return
        if self.params is not None:
            self._fixed_on(device)
        self.space.ready_on(device)
        if self.args.scale_format is ScaleFormat.LOG8:
            log8_table(device)

    def _check_frozen(self, states: torch.Tensor) -> None:
        """Refuse states a frozen stream cannot quantize: not frozen, the wrong shape, or (``strict_finite``) NaN/Inf.

        Only the shape and flags are read, on the host, unless :attr:`strict_finite` is set:
        that opt-in check reads whether every element is finite, a host synchronisation per
        update (the device's work must finish first), which is why it is off by default.
        """
        if not self._frozen:
            raise CalibrationError(f"{self.label}: not frozen")
        self._check_shape(states)
        if self.strict_finite and not bool(torch.isfinite(states).all()):
            raise NonFiniteStateError(
                f"{self.label}: states contain NaN or Inf (strict_finite is set); check the model's dtype "
                "(fp16 overflow is common: try bfloat16 or float32)"
            )

    # ------------------------------------------------------------------ quantization
    @torch.no_grad()
    def fake_quantize(self, states: torch.Tensor, hook: QuantizeHook | None = None) -> torch.Tensor:
        """Quantize-dequantize ``states`` (new tokens only); non-finite elements stay non-finite."""
        space, params, prepared = self._to_quantize(states)
        restored = fake_quantize_prepared(space, prepared, self.granularity, self.format)
        if self.space.identity:
            quantized = restored  # already in the states' dtype, non-finite elements kept
        else:  # a rotation spreads a non-finite element over its row: put the originals back
            quantized = torch.where(torch.isfinite(states), self.space.inverse(restored, states.dtype), states)
        if hook is not None:
            hook(self, states, quantized, params)
        return quantized

    def _to_quantize(self, states: torch.Tensor) -> tuple[torch.Tensor, QuantParams, PreparedParams]:
        """What fake and packed storage both quantize: frozen-checked ``states`` in the quantizer's space (moved by
        query-aware rounding for the codes it chooses; NaN and Inf stay where they were), and their parameters."""
        self._check_frozen(states)
        space = self.space.forward(states)
        params = self.params_for(space)
        prepared = self.prepared_for(space, params)
        fmt = self.format
        round_trip: Callable[[torch.Tensor], torch.Tensor] | RowGrid
        if self.granularity.one_step_per_row and fmt.kind is not FormatKind.FLOAT:
            offset = 0.0 if prepared.zero_point is None else prepared.zero_point
            round_trip = RowGrid(prepared.scale, offset, float(fmt.qmin), float(fmt.qmax))
        else:
            round_trip = partial(fake_quantize_prepared, prepared=prepared, granularity=self.granularity, fmt=fmt)
        return self.space.with_feedback(space, round_trip), params, prepared

    def saturated(self, states: torch.Tensor, params: QuantParams) -> torch.Tensor:
        """Mask of the elements of ``states`` that clip (counted in the quantizer's own space)."""
        return saturated(self.space.forward(states), params, self.granularity, self.format)

    # ------------------------------------------------------------------ packed rows (see packing.py)
    def code_bytes(self, head_dim: int) -> int:
        """Bytes of codes in one packed row of ``head_dim`` elements."""
        fmt = self.format
        if fmt.kind is FormatKind.FLOAT:
            return head_dim
        slot = bits_per_slot(fmt.bits)
        if slot < 8 and head_dim % 8:
            raise CalibrationError(f"{self.label}: packed {fmt.name} needs head_dim divisible by 8, got {head_dim}")
        return head_dim * slot // 8

    def row_bytes(self) -> int:
        """Bytes of one packed row (:meth:`encode`): its codes, then a dynamic stream's scales (and zero points)
        per group, or a static stream's flag byte."""
        if self.expected_shape is None:
            raise CalibrationError(f"{self.label}: packed storage needs the model's (kv_heads, head_dim)")
        head_dim = self.expected_shape[1]
        if not self.dynamic:
            return self.code_bytes(head_dim) + 1
        return self.code_bytes(head_dim) + self.args.row_parameter_bits // 8 * self.granularity.groups(head_dim)

    @torch.no_grad()
    def encode(self, states: torch.Tensor, hook: QuantizeHook | None = None) -> torch.Tensor:
        """``(batch, kv_heads, seq, head_dim)`` states -> packed ``uint8`` rows ``(batch, kv_heads, seq, row_bytes)``.

        Decoding the rows gives exactly what :meth:`fake_quantize` returns for finite
        states. A static scheme adds a flag byte that makes a row with a NaN or Inf
        element decode to NaN; a dynamic scheme's row parameters carry the NaN or Inf
        themselves. ``hook`` hears what the rows decode to (see the module docstring).
        """
        space, params, prepared = self._to_quantize(states)
        codes = quantize_prepared(space, prepared, self.granularity, self.format)
        fmt = self.format
        if fmt.kind is FormatKind.FLOAT:
            parts = [codes.view(torch.uint8)]
        else:
            parts = [pack_codes(codes, fmt.bits, int(-fmt.qmin))]
        if self.dynamic:  # (b, h, s, 1) per token, (b, h, s, groups, 1) per group -> (b, h, s, groups)
            # a group holding NaN or Inf stores a NaN scale: it decodes to NaN, as the flag byte does for static rows
            finite = self.granularity.reduce((~torch.isfinite(space)).to(torch.float32), torch.amax) == 0
            per_row = [scale_to_bytes(torch.where(finite, params.scale, torch.nan), self.args.scale_format)]
            if self.args.stores_zero_point:
                zero_point_dtype = self.args.zero_point_format.storage_dtype
                per_row.append(params.zero_point.to(zero_point_dtype).contiguous().view(torch.uint8))
            for tensor in per_row:
                parts.append(tensor.flatten(-2) if tensor.dim() == 5 else tensor)
        else:
            parts.append((~torch.isfinite(states).all(dim=-1, keepdim=True)).to(torch.uint8))
        rows = torch.cat(parts, dim=-1)
        if hook is not None:
            hook(self, states, self.decode(rows, states.dtype), params)
        return rows

    def code_view(self, rows: torch.Tensor, *, in_bytes: bool = False) -> CodeView:
        """What packed ``rows`` ``(batch, kv_heads, seq, row_bytes)`` hold, as the parts decoding combines.

        The stored codes are returned unconverted; everything else is float32. Both
        :meth:`decode` and attention computed from the codes
        (:mod:`quantcache.ops.code_attention`) read rows through this one view. ``in_bytes``
        leaves 2- and 4-bit codes of ungrouped streams in their bytes (``CodeView.per_byte``),
        for readers that take them slot by slot instead of unpacking them.
        """
        if self.expected_shape is None:
            raise CalibrationError(f"{self.label}: packed storage needs the model's (kv_heads, head_dim)")
        head_dim = self.expected_shape[1]
        code_bytes = self.code_bytes(head_dim)
        fmt = self.format
        offset = float(-fmt.qmin)
        subtrahend: torch.Tensor | float | None = None
        slot = bits_per_slot(fmt.bits)
        if in_bytes and fmt.kind is not FormatKind.FLOAT and slot in (2, 4) and self.args.scope is not QuantScope.GROUP:
            codes, per_byte = rows[..., :code_bytes], 8 // slot
        elif fmt.kind is FormatKind.FLOAT:  # float8 codes need no offset or zero point
            codes, per_byte = self.granularity.grouped(rows[..., :code_bytes].view(fmt.storage_dtype).float()), 1
        else:
            codes, per_byte = self.granularity.grouped(unpack_slots(rows[..., :code_bytes], fmt.bits, head_dim)), 1
        if self.dynamic:  # the row's own scale (and zero point) per group follow its codes
            grouped = self.args.scope is QuantScope.GROUP
            groups = self.granularity.groups(head_dim)
            start = code_bytes + self.args.scale_format.bits // 8 * groups
            scale = scale_from_bytes(rows[..., code_bytes:start], self.args.scale_format)
            scale = scale.unsqueeze(-1) if grouped else scale
            if fmt.kind is not FormatKind.FLOAT:
                subtrahend = offset + (0.0 if self.args.zero_level else MID_RISE_ZERO_POINT)
                if self.args.stores_zero_point:
                    stored_as = self.args.zero_point_format
                    zero_point = rows[..., start : start + stored_as.bits // 8 * groups].contiguous()
                    zero_point = zero_point.view(stored_as.storage_dtype).float()
                    subtrahend = (zero_point.unsqueeze(-1) if grouped else zero_point) + offset
            return CodeView(codes, subtrahend, scale, None, head_dim, per_byte)
        fixed = self._fixed_on(rows.device)
        if fmt.kind is not FormatKind.FLOAT:
            subtrahend = fixed.subtrahend
        flagged = rows[..., -1].bool()
        # NaN for a flagged row, -0.0 (which leaves every value, a signed zero too, as it is) for the others
        poison = torch.where(flagged, torch.nan, -0.0)
        return CodeView(codes, subtrahend, fixed.prepared.scale, poison, head_dim, per_byte)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Packed rows -> ``(batch, kv_heads, seq, head_dim)`` states in ``dtype`` (see :meth:`encode`).

        This runs over the whole history at every decode step when attention reads states:
        :meth:`CodeView.in_space`, then the space's inverse (rotation undone, channel scale
        and center restored).
        """
        return self.space.inverse(self.code_view(rows).in_space(), dtype)
