"""The values each scheme setting may take: the enums, observer options and how a value is read.

Kept apart from :mod:`quantcache.scheme.args`, which combines them into one stream's
:class:`~quantcache.scheme.args.QuantArgs`: a new enum value or observer option is one line here.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from quantcache.errors import ConfigError

__all__ = [
    "DYNAMIC_SCOPES",
    "OBSERVER_OPTIONS",
    "STREAM_KEYS",
    "TOKEN_SCOPES",
    "Engine",
    "ObserverOption",
    "QuantMethod",
    "QuantScope",
    "Rotation",
    "Rounding",
    "Storage",
    "checked_observer_options",
    "enum_value",
    "flag",
    "short_repr",
]


class QuantScope(str, Enum):
    """Granularity of the quantization parameters (see :mod:`quantcache.ops.granularity`).

    ``per_channel`` keeps one scale (and zero point) per (kv_head, head_dim channel),
    i.e. per column of ``states.transpose(1, 2).reshape(-1, kv_heads * head_dim)``
    (msModelSlim's layout).
    """

    PER_TENSOR = "per_tensor"
    PER_HEAD = "per_head"
    PER_CHANNEL = "per_channel"
    PER_TOKEN = "per_token"
    GROUP = "group"


class Storage(str, Enum):
    """What a cache keeps: dequantized states (``fake``, for measuring) or packed codes (``packed``).

    Chosen per cache (``quantizer.new_cache(storage=...)``), not part of a scheme: the same
    calibration serves both, and a config or state file does not record it.
    """

    FAKE = "fake"
    PACKED = "packed"


class Engine(str, Enum):
    """A serving engine whose KV-cache arithmetic a cache can reproduce (``quantizer.new_cache(engine=...)``).

    Chosen per cache, like :class:`Storage`, never part of a scheme: the same frozen state is
    measured under quantcache's own numerics or under an engine's (see
    :mod:`quantcache.ops.engine_numerics`). Each value is also the name of the export format
    that writes checkpoints for that engine (``quantcache export --format``), and each format
    names the engine it writes for, so ``evaluate --as`` and ``export --format`` cannot drift.
    """

    ASCEND = "ascend"
    VLLM = "vllm"
    MODELOPT = "modelopt"


class Rotation(str, Enum):
    """Orthogonal rotation of head_dim applied before quantization (see :mod:`quantcache.ops.rotation`)."""

    NONE = "none"
    HADAMARD = "hadamard"


class Rounding(str, Enum):
    """How a value becomes its code: the ``nearest`` one, or ``query_aware`` (keys; :mod:`quantcache.ops.rounding`)."""

    NEAREST = "nearest"
    QUERY_AWARE = "query_aware"


class QuantMethod(str, Enum):
    """How calibration statistics become a range (the observer, see :mod:`quantcache.ops.observers`)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


# Scopes whose parameters depend on the token: they can only be computed when the token arrives.
TOKEN_SCOPES = (QuantScope.PER_TOKEN,)
# Scopes that may be computed per token at run time (``dynamic: true``).
DYNAMIC_SCOPES = (QuantScope.PER_TOKEN, QuantScope.GROUP)

STREAM_KEYS = (
    "scope",
    "dtype",
    "symmetric",
    "method",
    "dynamic",
    "group_size",
    "observer_options",
    "rotation",
    "rotation_seed",
    "center",
    "scale_format",
    "zero_point_format",
    "query_aware",
    "rounding",
    "zero_level",
    "rope_radius",
)
"""Keys of one stream's arguments in the YAML ``qconfig`` (the first four are msModelSlim's)."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 3, 3, 60, 60


def short_repr(value: Any, limit: int = 100) -> str:
    """A bounded ``repr`` for error messages: a huge or deeply nested value never floods one."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def enum_value(enum_type: type[Enum], key: str, value: Any, *, section: str = "qconfig.") -> Any:
    """``value`` as a member of ``enum_type`` (case-insensitive name), or a ConfigError naming ``section + key``."""
    allowed = [member.value for member in enum_type]
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str) and value.lower() in allowed:
        return enum_type(value.lower())
    raise ConfigError(
        f"{section}{key}: unsupported value {short_repr(value)}; allowed: {', '.join(map(repr, allowed))}"
    )


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"qconfig.{key}: expected true or false, got {short_repr(value)}")
    return value


@dataclass(frozen=True)
class ObserverOption:
    """One ``observer_options`` entry an observer reads, and the values it accepts.

    The config checks options against this table when it is built, before any model
    is loaded, so a bad value is a ConfigError naming the option instead of an error
    in the middle of calibration. The observers (:mod:`quantcache.ops.observers`) read
    their option names from here too.

    Attributes:
        name: the key under ``observer_options``.
        meaning: what the value sets, for the error message.
        integer: whole numbers only (otherwise any finite real number).
        low, high: the accepted range; ``low`` itself is excluded when ``low_open``.
    """

    name: str
    meaning: str
    integer: bool
    low: float
    high: float
    low_open: bool = False

    @property
    def range_text(self) -> str:
        """The accepted range as an interval: ``(50, 100]`` or ``[1, 1024]``."""
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def check(self, value: Any) -> int | float:
        """``value`` if it is a number this option accepts; otherwise a ConfigError naming the option and range."""
        kind = "a whole number" if self.integer else "a number"
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        # An int is finite however large (and math.isfinite would overflow converting a huge one).
        good = number is not None and (isinstance(number, int) or (not self.integer and math.isfinite(number)))
        if good and number is not None:
            good = (number > self.low if self.low_open else number >= self.low) and number <= self.high
        if not good:
            raise ConfigError(
                f"qconfig.observer_options.{self.name}: expected {kind} in {self.range_text} ({self.meaning}), "
                f"got {short_repr(value)}"
            )
        return int(value) if self.integer else value


OBSERVER_OPTIONS: dict[QuantMethod, tuple[ObserverOption, ...]] = {
    QuantMethod.MINMAX: (),
    QuantMethod.PERCENTILE: (
        ObserverOption(
            "percentile",
            "the quantile of each batch the range reaches, in percent; the low end takes 100 minus it",
            integer=False,
            low=50.0,
            high=100.0,
            low_open=True,
        ),
    ),
    QuantMethod.MSE: (
        ObserverOption(
            "grid", "how many shrunk ranges the error search tries per range", integer=True, low=1, high=1024
        ),
    ),
}
"""The ``observer_options`` each method reads (the same for a centred dynamic stream, whose per-token
search is its method's), and their accepted values."""


def checked_observer_options(method: QuantMethod, options: Any) -> tuple[tuple[str, Any], ...]:
    """``options`` (a mapping or ``(name, value)`` pairs) checked against ``method``'s table, sorted by name."""
    if isinstance(options, Mapping):
        options = tuple(options.items())
    if not isinstance(options, tuple) or not all(isinstance(item, tuple) and len(item) == 2 for item in options):
        raise ConfigError("qconfig.observer_options: expected a mapping of option names to values")
    known = {option.name: option for option in OBSERVER_OPTIONS[method]}
    checked: dict[str, Any] = {}
    for name, value in options:
        if name not in known:
            allowed = ", ".join(known) or "none"
            raise ConfigError(
                f"qconfig.observer_options: {short_repr(name)} is not an option of method {method.value!r} "
                f"(options: {allowed})"
            )
        if name in checked:
            raise ConfigError(f"qconfig.observer_options: {name!r} is given twice")
        checked[name] = known[name].check(value)
    return tuple(sorted(checked.items()))
