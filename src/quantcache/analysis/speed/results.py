"""What a speed run found: a row per context, batch size and cache, and the table printed from them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from quantcache.analysis.speed.contenders import ContenderKind
from quantcache.analysis.speed.peak_memory import PeakKind

__all__ = [
    "BUSY_SPREAD",
    "MIB",
    "TABLE_COLUMNS",
    "SpeedResult",
    "SpeedRow",
    "busy_machine_warning",
    "dynamic_base",
    "format_speed_table",
    "ratio",
    "spread",
]

MIB = 1 << 20
BUSY_SPREAD = 0.10
"""A ``DynamicCache`` whose decode repetitions spread by more than this (:func:`spread`) marks a machine whose speed
changed during the run: :func:`busy_machine_warning` says so under the table."""

TABLE_COLUMNS = (
    "context",
    "batch",
    "cache",
    "decode ms/token",
    "x dyn",
    "spread",
    "prefill tok/s",
    "x dyn",
    "KV MiB",
    "x dyn",
    "peak MiB",
)
"""The columns of :func:`format_speed_table`; each ``x dyn`` divides the figure to its left by DynamicCache's, and
``spread`` is the decode repetitions' (:func:`spread`)."""


@dataclass
class SpeedRow:
    """One contender at one context and batch size: medians of the repetitions, and the runs themselves.

    Every ``*_vs_dynamic`` is the figure divided by ``DynamicCache``'s of the same run (decode
    ms: above 1 is slower; prefill tokens/s: above 1 is faster; KV bytes: below 1 is smaller),
    ``None`` where either side failed. ``error`` says why a contender has no figures (it ran
    out of memory); ``peak_bytes`` is the highest of the repetitions, ``None`` where peak memory
    cannot be measured. ``kv_parts`` splits a quantized cache's ``kv_bytes`` (``None`` for the others).
    ``decode_spread`` is :func:`spread` of ``decode_seconds_runs``: how far apart the repetitions
    the median ``decode_ms`` comes from were.
    """

    context: int
    batch: int
    cache: str
    kind: ContenderKind
    decode_ms: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    kv_bytes: int | None = None
    kv_parts: dict[str, int] | None = None
    peak_bytes: int | None = None
    decode_ms_vs_dynamic: float | None = None
    decode_spread: float | None = None
    prefill_tokens_per_s_vs_dynamic: float | None = None
    kv_bytes_vs_dynamic: float | None = None
    decode_seconds_runs: list[float] = field(default_factory=list)
    prefill_seconds_runs: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class SpeedResult:
    """What :func:`bench_speed` measured: one row per context, batch and contender, in that order.

    ``peak_kind`` names what ``peak_bytes`` is (``"cuda_max_allocated"``, ``"rss_high_water"``
    or ``None``); ``settings`` the run's parameters and environment.
    """

    rows: list[SpeedRow]
    steps: int
    repeats: int
    peak_kind: PeakKind | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (``None`` for what was not measured)."""
        return asdict(self)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def spread(runs: Sequence[float]) -> float | None:
    """``(slowest - fastest) / median`` of a cache's repetitions (0 for one; ``None`` for none).

    The decode repetitions of one cache run minutes apart on a shared machine; where even
    ``DynamicCache``'s spread widely, the machine's speed changed during the run, and ratios that
    differ by less than that spread are not told apart by it.
    """
    if not runs:
        return None
    middle = statistics.median(runs)
    return (max(runs) - min(runs)) / middle if middle > 0 else None


def dynamic_base(rows: Sequence[SpeedRow]) -> SpeedRow | None:
    """The row every ratio of one context and batch size divides by: its first ``DynamicCache`` with figures (the
    eager one; a ``--compile`` twin follows it)."""
    return next((row for row in rows if row.kind == "dynamic" and row.error is None), None)


def busy_machine_warning(result: SpeedResult, limit: float = BUSY_SPREAD) -> str | None:
    """A line naming every context and batch at which the ``DynamicCache`` the ratios divide by
    (:func:`dynamic_base`) spread its decode repetitions by more than ``limit`` (:func:`spread`), or ``None`` where
    none did."""
    groups: dict[tuple[int, int], list[SpeedRow]] = {}
    for row in result.rows:
        groups.setdefault((row.context, row.batch), []).append(row)
    bases = [dynamic_base(rows) for rows in groups.values()]
    busy = [
        f"{base.context} x {base.batch}: {base.decode_spread:.0%}"
        for base in bases
        if base is not None and base.decode_spread is not None and base.decode_spread > limit
    ]
    if not busy:
        return None
    return (
        f"warning: DynamicCache's decode repetitions spread by more than {limit:.0%} ({', '.join(busy)}): this "
        "machine's speed changed during the run, so decode ratios there that differ by less than that may be "
        "noise; measure on a quiet machine, or with more --repeats"
    )


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_speed_table(result: SpeedResult) -> str:
    """The rows as a plain-text table (:data:`TABLE_COLUMNS`), with a footnote saying what each figure is."""
    lines: list[list[str]] = [list(TABLE_COLUMNS)]
    for row in result.rows:
        head = [str(row.context), str(row.batch), row.cache]
        if row.error is not None:
            lines.append([*head, "failed", row.error[:40], "", "", "", "", "", ""])
            continue
        lines.append(
            [
                *head,
                _cell(row.decode_ms, ".2f"),
                _cell(row.decode_ms_vs_dynamic, ".3f"),
                _cell(row.decode_spread, ".0%"),
                _cell(row.prefill_tokens_per_s, ".0f"),
                _cell(row.prefill_tokens_per_s_vs_dynamic, ".3f"),
                _cell(None if row.kv_bytes is None else row.kv_bytes / MIB, ".2f"),
                _cell(row.kv_bytes_vs_dynamic, ".3f"),
                _cell(None if row.peak_bytes is None else row.peak_bytes / MIB, ".0f"),
            ]
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(TABLE_COLUMNS))]
    text = [
        "  ".join(
            cell.ljust(width) if column == 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    peak = {
        "cuda_max_allocated": "the CUDA allocator's peak during fill and decode",
        "rss_high_water": "the process's resident high-water mark during fill and decode (model included)",
        None: "n/a: not measurable on this device",
    }[result.peak_kind]
    text.append(
        f"medians of {result.repeats} interleaved repetitions; decode: {result.steps} steps after a fill of the "
        "context, one new token per row each; x dyn: divided by DynamicCache's figure of the same run; "
        "spread: the slowest decode repetition minus the fastest, over their median; "
        f"KV: bytes of the tensors each cache holds after the steps; peak: {peak}"
    )
    warning = busy_machine_warning(result)
    if warning is not None:
        text.append(warning)
    return "\n".join(text)
