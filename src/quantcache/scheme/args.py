"""How one stream (the keys or the values) is quantized: validated, serialisable arguments.

:class:`QuantArgs` is the unit the rest of the package reads: the math takes its
number format and granularity, the observer registry its ``method``, the state file
stores its :meth:`~QuantArgs.to_dict`. :class:`~quantcache.scheme.config.KVQuantConfig`
holds one for the keys and one for the values (the same one unless told otherwise),
plus which layers take part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quantcache.errors import ConfigError
from quantcache.scheme.number_formats import (
    FORMATS,
    FormatKind,
    NumberFormat,
    QuantDtype,
    ScaleFormat,
    ZeroPointFormat,
)
from quantcache.scheme.settings import (
    DYNAMIC_SCOPES,
    OBSERVER_OPTIONS,
    STREAM_KEYS,
    TOKEN_SCOPES,
    ObserverOption,
    QuantMethod,
    QuantScope,
    Rotation,
    Rounding,
    Storage,
    checked_observer_options,
    enum_value,
    flag,
    short_repr,
)

__all__ = [
    "OBSERVER_OPTIONS",
    "STREAM_KEYS",
    "LayerOverride",
    "ObserverOption",
    "QuantArgs",
    "QuantDtype",
    "QuantMethod",
    "QuantScope",
    "Rotation",
    "Rounding",
    "ScaleFormat",
    "Storage",
    "ZeroPointFormat",
    "enum_value",
    "short_repr",
]


@dataclass(frozen=True)
class QuantArgs:
    """The quantization of one ``(batch, kv_heads, seq, head_dim)`` stream.

    Attributes:
        dtype: number format (a row of :data:`quantcache.scheme.number_formats.FORMATS`).
        scope: parameter granularity.
        symmetric: zero point 0 and a range symmetric about zero, or an asymmetric
            ``[min, max]`` range with a zero point (integer formats only).
        dynamic: parameters computed from each token as it arrives (``per_token``,
            ``group``) instead of calibrated once.
        method: the observer that turns calibration data into a range (static only).
        group_size: channels per group along head_dim (``group`` scope only).
        observer_options: the observer's own settings, as ``(name, value)`` pairs sorted by name, each
            checked against :data:`OBSERVER_OPTIONS` (``percentile: 99.9``; ``grid: 20``).
        rotation: ``hadamard`` rotates every head's vectors by a fixed randomized
            Hadamard matrix before quantizing and back after (keys and values alike:
            what the cache returns is in the model's own space).
        rotation_seed: the seed of the rotation's random signs (saved with the config).
        center: subtract a calibrated mean of every (kv_head, head_dim channel) before
            quantizing and add it back after (dynamic schemes). Keys and values carry a
            large constant offset per channel that would otherwise set every token's
            range; for keys it even cancels in attention (``q . mean`` is the same for
            every key), so the mean only has to be roughly right. Calibration collects it.
        scale_format: how a dynamic scheme stores each token's scale: ``float16`` (two
            bytes) or ``log8`` (one byte, a power of ``2 ** (1 / 8)``; see
            :class:`~quantcache.scheme.number_formats.ScaleFormat`). Static scales are float32 in the state.
        zero_point_format: how a dynamic asymmetric scheme stores each token's zero point:
            ``int16`` (two bytes, the group's own range) or ``int8`` (one byte, the range
            widened to take in zero; see :class:`~quantcache.scheme.number_formats.ZeroPointFormat`).
        query_aware: keys only, with ``center``: scale every centred key channel by
            ``(query energy / key variance) ** (1 / 4)`` before quantizing and back after,
            both calibrated (the energy summed over the query heads that read the kv head
            and, like the variance, averaged over each RoPE pair of channels ``j`` and
            ``j + head_dim / 2``, which the position mixes). Quantization error then lands
            where queries look least: of all per-channel scalings, this one minimises the
            expected squared error of the attention logits ``q . k`` that the keys' error
            causes (a per-token range is set by the scaled channels' total energy, the
            logit error by the energy-weighted error). Calibration must see the queries
            (:func:`quantcache.calibration.calibrate` computes them).
        rounding: ``nearest`` code per element, or ``query_aware`` (keys only, with
            ``query_aware``, and the cache's ``pre_rope_keys``): each key's codes chosen
            together for the least expected error of the logits, under the calibrated
            queries' second moment seen through RoPE (:mod:`quantcache.ops.rounding`). Codes,
            row parameters and decoding keep their format; the moment's model is stored
            (``(1 + rank) * head_dim`` float32 per kv head, counted in the effective bits).
        zero_level: whether zero is one of the levels. ``false`` (symmetric dynamic integer
            schemes) is the mid-rise grid: levels at ``(code + 1/2) * scale``, every code
            used (int2: ``+-scale / 2``, ``+-3 * scale / 2``, where the zero-level grid has
            three levels or, asymmetric, a zero point to store). For the near-Gaussian
            coordinates a rotation makes, four mid-rise levels give about a tenth less
            squared error than four around a zero, and store no zero point.
        rope_radius: keys only, static, symmetric, ``minmax``, keys after RoPE (the cache's
            ``pre_rope_keys`` off): each RoPE channel pair ``(i, i + rotary/2)`` of a head takes
            the range ``+-max sqrt(k_i^2 + k_{i+rotary/2}^2)`` over the calibration tokens. RoPE
            turns every pair by an angle that grows with the position and never changes its
            radius, so no position can leave that range; a plain per-channel ``[min, max]`` only
            holds for the angles calibration reached (the slow pairs turn a few degrees in a few
            hundred tokens). The parameters keep the seed's format, so engines load them as they
            are; channels RoPE does not turn keep their ``[min, max]``.
    """

    dtype: QuantDtype = QuantDtype.INT8
    scope: QuantScope = QuantScope.PER_CHANNEL
    symmetric: bool = True
    method: QuantMethod = QuantMethod.MINMAX
    dynamic: bool = False
    group_size: int | None = None
    observer_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    rotation: Rotation = Rotation.NONE
    rotation_seed: int = 0
    center: bool = False
    scale_format: ScaleFormat = ScaleFormat.FLOAT16
    zero_point_format: ZeroPointFormat = ZeroPointFormat.INT16
    query_aware: bool = False
    rounding: Rounding = Rounding.NEAREST
    zero_level: bool = True
    rope_radius: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "rope_radius", flag("rope_radius", self.rope_radius))
        set_(self, "zero_level", flag("zero_level", self.zero_level))
        set_(self, "rounding", enum_value(Rounding, "rounding", self.rounding))
        set_(self, "zero_point_format", enum_value(ZeroPointFormat, "zero_point_format", self.zero_point_format))
        set_(self, "query_aware", flag("query_aware", self.query_aware))
        set_(self, "scale_format", enum_value(ScaleFormat, "scale_format", self.scale_format))
        set_(self, "rotation", enum_value(Rotation, "rotation", self.rotation))
        set_(self, "center", flag("center", self.center))
        seed = self.rotation_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"qconfig.rotation_seed: expected a non-negative integer, got {short_repr(seed)}")
        set_(self, "dtype", enum_value(QuantDtype, "dtype", self.dtype))
        set_(self, "scope", enum_value(QuantScope, "scope", self.scope))
        set_(self, "method", enum_value(QuantMethod, "method", self.method))
        set_(self, "symmetric", flag("symmetric", self.symmetric))
        set_(self, "dynamic", flag("dynamic", self.dynamic))
        set_(self, "observer_options", checked_observer_options(self.method, self.observer_options))
        self._check_combination()

    def _check_combination(self) -> None:
        if self.scope is QuantScope.GROUP:
            size = self.group_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"qconfig.group_size: scope 'group' needs a positive integer, got {short_repr(size)}")
        elif self.group_size is not None:
            raise ConfigError(f"qconfig.group_size is only used with scope 'group' (scope is {self.scope.value!r})")
        if self.scope in TOKEN_SCOPES and not self.dynamic:
            raise ConfigError(
                f"qconfig.scope {self.scope.value!r} needs dynamic: true (per-token parameters cannot be calibrated)"
            )
        if self.dynamic and self.scope not in DYNAMIC_SCOPES:
            allowed = ", ".join(repr(scope.value) for scope in DYNAMIC_SCOPES)
            raise ConfigError(f"qconfig.dynamic: true works with scope {allowed}, not {self.scope.value!r}")
        if self.center and not self.dynamic:
            raise ConfigError(
                "qconfig.center: true needs dynamic: true (a static range would have to be calibrated on "
                "states centred by a mean that the same calibration is still collecting)"
            )
        if self.query_aware and not self.center:
            raise ConfigError(
                "qconfig.query_aware: true needs dynamic: true and center: true (each key channel's scale "
                "weighs its variance around the calibrated mean; a static per-channel range would absorb it)"
            )
        if self.rounding is Rounding.QUERY_AWARE and not self.query_aware:
            raise ConfigError(
                "qconfig.rounding 'query_aware' weighs each key's rounding error by the calibrated queries: it "
                "needs query_aware: true on the keys (with dynamic: true and center: true)"
            )
        if self.dynamic and self.method is QuantMethod.PERCENTILE:
            raise ConfigError(
                "qconfig.method 'percentile' is for static ranges; a dynamic scheme takes 'minmax' (each "
                "token's own range) or 'mse' (each token's range clipped to the least error)"
            )
        if self.scale_format is not ScaleFormat.FLOAT16 and not self.dynamic:
            raise ConfigError(
                f"qconfig.scale_format {self.scale_format.value!r} is how a dynamic scheme stores each token's "
                "scale; a static scheme's scales are calibrated once and kept in float32: set dynamic: true "
                "or leave scale_format out"
            )
        if self.format.kind is FormatKind.FLOAT and not self.symmetric:
            raise ConfigError(f"qconfig.symmetric: {self.dtype.value} is a float format and is symmetric only")
        if self.zero_point_format is not ZeroPointFormat.INT16 and (self.symmetric or not self.dynamic):
            raise ConfigError(
                f"qconfig.zero_point_format {self.zero_point_format.value!r} is how a dynamic asymmetric scheme "
                "stores each token's zero point; this stream "
                + ("is symmetric and stores none" if self.symmetric else "is static (its zero points are calibrated)")
                + ": leave zero_point_format out, or set "
                + ("symmetric: false" if self.symmetric else "dynamic: true")
            )
        if not self.zero_level and not (self.symmetric and self.dynamic and self.format.kind is FormatKind.INTEGER):
            raise ConfigError(
                "qconfig.zero_level: false (the mid-rise grid) is for symmetric dynamic integer schemes, which "
                "store no zero point; this stream is "
                + ", ".join(
                    reason
                    for reason, bad in (
                        (f"{self.dtype.value} (a float format)", self.format.kind is FormatKind.FLOAT),
                        ("asymmetric", not self.symmetric),
                        ("static", not self.dynamic),
                    )
                    if bad
                )
                + ": set symmetric: true and dynamic: true with an integer dtype, or leave zero_level out"
            )

        if self.rope_radius:
            wrong = [
                reason
                for reason, bad in (
                    ("dynamic (set dynamic: false)", self.dynamic),
                    ("asymmetric (set symmetric: true: a radius bounds both signs alike)", not self.symmetric),
                    (f"method {self.method.value} (set method: minmax)", self.method is not QuantMethod.MINMAX),
                    ("rotated (set rotation: none)", self.rotation is not Rotation.NONE),
                )
                if bad
            ]
            if wrong:
                raise ConfigError(
                    "qconfig.rope_radius: true sets a static, symmetric min/max range in the model's own space "
                    "from each RoPE pair's radius; this stream is " + "; ".join(wrong)
                )

    @property
    def length_safe(self) -> bool:
        """Whether this stream's ranges hold at positions calibration never reached, as keys after RoPE.

        Dynamic ranges follow every token; a ``rope_radius`` range is one RoPE cannot leave. A
        plain static key range is calibrated on the angles the calibration positions reached
        (keys quantized before RoPE, the cache's ``pre_rope_keys``, are safe whatever this says).
        """
        return self.dynamic or self.rope_radius

    @property
    def calibrates(self) -> bool:
        """Whether calibration teaches this stream anything: a static range, or a centred dynamic stream's mean
        (and, query-aware, its channel scales, which need ``center``).

        A stream that calibrates holds tensors in a saved state; one that does not saves nothing.
        """
        return not self.dynamic or self.center

    @property
    def stores_zero_point(self) -> bool:
        """Whether the stream keeps zero points: an asymmetric (hence integer) stream does, per packed row
        when dynamic and calibrated once when static; a symmetric, mid-rise or float8 stream's zero point is
        zero (or a constant) and is never stored, counted or exported."""
        return not self.symmetric and self.format.kind is FormatKind.INTEGER

    @property
    def decodes_with_zero_point(self) -> bool:
        """Whether decoding subtracts a zero point from the codes: a stored one (asymmetric), or the mid-rise
        grid's constant ``-1/2`` (``zero_level: false``); symmetric zero-level and float8 codes need none."""
        return self.format.kind is FormatKind.INTEGER and not (self.symmetric and self.zero_level)

    @property
    def row_parameter_bits(self) -> int:
        """Bits of parameters a packed row stores per group of a dynamic stream: its scale (``scale_format``)
        and, when it stores one, its zero point (``zero_point_format``). A static stream's rows store none
        (its parameters are calibrated once: :attr:`calibrated_parameter_bits`)."""
        if not self.dynamic:
            return 0
        return self.scale_format.bits + (self.zero_point_format.bits if self.stores_zero_point else 0)

    @property
    def calibrated_parameter_bits(self) -> int:
        """Bits of one calibrated parameter of a static stream: a float32 scale and, when it stores one, an
        int32 zero point. A dynamic stream calibrates no scale (0; its centre and channel scales are counted
        per channel by :mod:`quantcache.ops.bits`)."""
        if self.dynamic:
            return 0
        return 32 + (32 if self.stores_zero_point else 0)

    def export_problems(self) -> list[str]:
        """Why serving engines cannot take this stream's parameters; empty when they can.

        The exporters (:mod:`quantcache.export`) read a static INT8 per-channel ``[min, max]``
        range in the model's own space (the seed scheme): vLLM-Ascend takes its scale and
        zero point, the FP8 formats its absolute maximum. Whether the zero points survive
        is the format's question (:attr:`stores_zero_point`).
        """
        problems = []
        if self.dynamic:
            problems.append("dynamic (parameters computed per token as it arrives; engines load calibrated scales)")
        if self.dtype is not QuantDtype.INT8:
            problems.append(f"dtype {self.dtype.value} (the exporters read INT8 ranges)")
        if self.scope is not QuantScope.PER_CHANNEL:
            problems.append(f"scope {self.scope.value} (the exporters read per-channel ranges)")
        if self.method is not QuantMethod.MINMAX:
            problems.append(f"method {self.method.value} (the exporters read min/max statistics)")
        if self.rotation is not Rotation.NONE:
            problems.append(f"rotation {self.rotation.value} (engines quantize in the model's own space)")
        return problems

    @property
    def engine_exportable(self) -> bool:
        """Whether serving engines can take this stream's parameters (see :meth:`export_problems`)."""
        return not self.export_problems()

    @property
    def format(self) -> NumberFormat:
        """The number format's row of the table."""
        return FORMATS[self.dtype]

    @property
    def options(self) -> dict[str, Any]:
        """The observer options as a dict."""
        return dict(self.observer_options)

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        """Plain data in msModelSlim's ``qconfig`` shape; keys beyond its four only when not default.

        ``full`` writes every key, so the mapping means the same whatever it is merged onto
        (a per-stream override of a config's shared arguments).
        """
        if full:
            return {
                **self.to_dict(),
                "dynamic": self.dynamic,
                "group_size": self.group_size,
                "observer_options": self.options,
                "rotation": self.rotation.value,
                "rotation_seed": self.rotation_seed,
                "center": self.center,
                "scale_format": self.scale_format.value,
                "zero_point_format": self.zero_point_format.value,
                "query_aware": self.query_aware,
                "rounding": self.rounding.value,
                "zero_level": self.zero_level,
                "rope_radius": self.rope_radius,
            }
        data: dict[str, Any] = {
            "scope": self.scope.value,
            "dtype": self.dtype.value,
            "symmetric": self.symmetric,
            "method": self.method.value,
        }
        if self.dynamic:
            data["dynamic"] = True
        if self.group_size is not None:
            data["group_size"] = self.group_size
        if self.observer_options:
            data["observer_options"] = self.options
        if self.rotation is not Rotation.NONE:
            data["rotation"] = self.rotation.value
            data["rotation_seed"] = self.rotation_seed
        if self.center:
            data["center"] = True
        if self.scale_format is not ScaleFormat.FLOAT16:
            data["scale_format"] = self.scale_format.value
        if self.zero_point_format is not ZeroPointFormat.INT16:
            data["zero_point_format"] = self.zero_point_format.value
        if self.query_aware:
            data["query_aware"] = True
        if self.rounding is not Rounding.NEAREST:
            data["rounding"] = self.rounding.value
        if not self.zero_level:
            data["zero_level"] = False
        if self.rope_radius:
            data["rope_radius"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "qconfig") -> QuantArgs:
        """Read one stream's arguments; unknown keys are errors that list the allowed ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = [key for key in data if key not in STREAM_KEYS]
        if unknown:
            raise ConfigError(f"unknown key '{where}.{str(unknown[0])[:80]}'; allowed: {', '.join(STREAM_KEYS)}")
        return cls(**{key: data[key] for key in STREAM_KEYS if key in data})


@dataclass(frozen=True)
class LayerOverride:
    """Other arguments for the attention modules that ``include`` matches: mixed precision by layer.

    ``key`` and ``value`` are complete :class:`QuantArgs`, resolved when the config is
    read (:meth:`from_dict` merges what the override names onto the config's own
    stream arguments), so an override means the same whatever else changes later.
    """

    include: tuple[str, ...]
    key: QuantArgs
    value: QuantArgs

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": list(self.include),
            "qconfig": {"key": self.key.to_dict(full=True), "value": self.value.to_dict(full=True)},
        }

    @classmethod
    def from_dict(cls, data: Any, *, key: QuantArgs, value: QuantArgs, where: str) -> LayerOverride:
        """Read one ``layers`` item: ``{include: [...], qconfig: {...flat keys..., key: {...}, value: {...}}}``.

        Flat keys apply to both streams, a stream's own mapping wins over them, and
        what is not named keeps ``key``/``value`` (the config's own stream arguments).
        ``include`` is checked by the config, which owns pattern syntax.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'include' and 'qconfig', got {type(data).__name__}")
        unknown = [name for name in data if name not in ("include", "qconfig")]
        if unknown:
            raise ConfigError(f"unknown key '{where}.{str(unknown[0])[:80]}'; allowed: include, qconfig")
        if "include" not in data or "qconfig" not in data:
            raise ConfigError(f"{where}: needs both 'include' (module patterns) and 'qconfig' (what to change)")
        qconfig = data["qconfig"]
        if not isinstance(qconfig, Mapping):
            raise ConfigError(f"{where}.qconfig: expected a mapping, got {type(qconfig).__name__}")
        allowed = (*STREAM_KEYS, "key", "value")
        unknown = [name for name in qconfig if name not in allowed]
        if unknown:
            raise ConfigError(f"unknown key '{where}.qconfig.{str(unknown[0])[:80]}'; allowed: {', '.join(allowed)}")
        flat = {name: qconfig[name] for name in STREAM_KEYS if name in qconfig}
        merged: dict[str, QuantArgs] = {}
        for stream, base in (("key", key), ("value", value)):
            own = qconfig.get(stream) or {}
            if not isinstance(own, Mapping):
                raise ConfigError(f"{where}.qconfig.{stream}: expected a mapping, got {type(own).__name__}")
            merged[stream] = QuantArgs.from_dict(
                {**base.to_dict(full=True), **flat, **own}, where=f"{where}.qconfig.{stream}"
            )
        return cls(data["include"], merged["key"], merged["value"])
