"""Number formats of a quantized cache, from one table.

Every format the config may name is one row here: its code range, how codes are
stored and how many fit in a byte. The math (:mod:`quantcache.ops.quantize`), the
config validation and the effective-bit count all read this table, so a new format
is one row (plus its rounding rule when it is not a plain integer grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FORMATS", "FormatKind", "NumberFormat", "QuantDtype", "ScaleFormat", "ZeroPointFormat", "format_spec"]


class QuantDtype(str, Enum):
    """Number format of the quantized cache (the config's ``dtype``)."""

    INT8 = "int8"
    INT4 = "int4"
    INT3 = "int3"
    INT2 = "int2"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"


def _torch_dtype(name: str) -> torch.dtype:
    """``torch.<name>``, imported only when asked for: the rest of this module does without torch."""
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


class ScaleFormat(str, Enum):
    """How a dynamic scheme stores each token's scale in its packed row (the config's ``scale_format``).

    ``float16``: two bytes, rounded up to the next float16. ``log8``: one byte, the scale
    rounded up to the next power of ``2 ** (1 / 8)`` between ``2 ** -16`` and ``2 ** 15.75``
    (a step at most 9 % coarser than the exact one, which the ``mse`` search already
    varies by more), so every per-token parameter costs half the bits.
    """

    FLOAT16 = "float16"
    LOG8 = "log8"

    @property
    def bits(self) -> int:
        """Bits one stored scale takes."""
        return 16 if self is ScaleFormat.FLOAT16 else 8


class ZeroPointFormat(str, Enum):
    """How a dynamic asymmetric scheme stores each token's zero point (the config's ``zero_point_format``).

    ``int16``: two bytes, the zero point of the group's own ``[min, max]`` range, which
    need not hold zero (a group far from zero gets a zero point far outside the codes).
    ``int8``: one byte, the usual asymmetric convention: the range is widened to take in
    zero, so the zero point is itself one of the codes (``[qmin, qmax]``). A group of
    centred states almost always holds values of both signs, and then its range, and
    with it every code, is the same as ``int16``'s, for half the bytes.
    """

    INT16 = "int16"
    INT8 = "int8"

    @property
    def storage_dtype(self) -> torch.dtype:
        """The integer type a packed row stores the zero point in."""
        return _torch_dtype(self.value)

    @property
    def bits(self) -> int:
        """Bits one stored zero point takes."""
        return 16 if self is ZeroPointFormat.INT16 else 8


class FormatKind(str, Enum):
    """``integer``: uniform grid of ``[qmin, qmax]``; ``float``: a torch float8 type."""

    INTEGER = "integer"
    FLOAT = "float"


@dataclass(frozen=True)
class NumberFormat:
    """One row of the table.

    Attributes:
        name: the config's spelling (``int8``).
        kind: integer grid or float8.
        bits: bits per code.
        qmin, qmax: the representable range of a code (integers: the grid's ends;
            float8: ``-finfo.max``, ``finfo.max``).
        storage: name of the torch dtype codes are kept in before any bit packing
            (kept as a name so the config imports without torch).
        codes_per_byte: how many codes share one byte when packed.
    """

    name: str
    kind: FormatKind
    bits: int
    qmin: float
    qmax: float
    storage: str
    codes_per_byte: float

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype of unpacked codes."""
        return _torch_dtype(self.storage)

    @property
    def levels(self) -> int:
        """Number of distinct integer codes (``qmax - qmin + 1``); integer formats only."""
        return int(self.qmax - self.qmin) + 1

    @property
    def symmetric_max(self) -> float:
        """The code a symmetric scale maps ``max |x|`` onto (127 for int8)."""
        return self.qmax


_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_E5M2_MAX = 57344.0  # torch.finfo(torch.float8_e5m2).max

FORMATS: dict[QuantDtype, NumberFormat] = {
    QuantDtype.INT8: NumberFormat("int8", FormatKind.INTEGER, 8, -128, 127, "int8", 1),
    QuantDtype.INT4: NumberFormat("int4", FormatKind.INTEGER, 4, -8, 7, "int8", 2),
    QuantDtype.INT3: NumberFormat("int3", FormatKind.INTEGER, 3, -4, 3, "int8", 8 / 3),
    QuantDtype.INT2: NumberFormat("int2", FormatKind.INTEGER, 2, -2, 1, "int8", 4),
    QuantDtype.FP8_E4M3: NumberFormat("fp8_e4m3", FormatKind.FLOAT, 8, -_E4M3_MAX, _E4M3_MAX, "float8_e4m3fn", 1),
    QuantDtype.FP8_E5M2: NumberFormat("fp8_e5m2", FormatKind.FLOAT, 8, -_E5M2_MAX, _E5M2_MAX, "float8_e5m2", 1),
}


def format_spec(dtype: QuantDtype | str) -> NumberFormat:
    """The table row of ``dtype`` (an enum member or its name)."""
    return FORMATS[QuantDtype(dtype)]
