"""Observers: calibration statistics behind a small registry keyed by the config's ``method``.

An observer owns what calibration collects for one stream of one layer: how a batch
of states is measured, how two measurements merge (the same merge serves a new batch
and the all-reduce of distributed calibration), how the statistics are saved and
loaded, and the range they imply. It never quantizes: turning the range into
parameters is :func:`quantcache.ops.quantize.compute_qparams`.

``minmax`` (the seed's) is the first; a new observer is a subclass registered with
:func:`register_observer` under its :class:`~quantcache.scheme.args.QuantMethod` value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from quantcache.ops.granularity import Granularity
from quantcache.ops.quantize import stream_minmax
from quantcache.scheme.args import QuantArgs, QuantMethod, Rounding

__all__ = [
    "OBSERVERS",
    "AveragedRangeObserver",
    "CenterObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QueryAwareCenterObserver",
    "QueryMomentObserver",
    "RopeRadiusObserver",
    "SummedObserver",
    "make_observer",
    "query_aware_scale",
    "register_observer",
]

Statistics = dict[str, torch.Tensor]


class Observer:
    """Statistics of one stream; subclasses define what is measured and how it merges.

    ``statistics`` maps a field name (``min``, ``max`` ...) to a float32 tensor of the
    granularity's parameter shape, or is empty before anything was observed. Merging
    holds a lock, so threads calibrating the same layer never lose an update.
    """

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: QuantArgs) -> None:
        # ``args.observer_options`` were checked against the method's table when ``args`` was built
        # (quantcache.scheme.args.OBSERVER_OPTIONS): an observer reads them without checking again.
        self.args = args
        self.granularity = Granularity.of(args)
        self.statistics: Statistics = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what subclasses define
    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        """Statistics of one batch of ``(batch, kv_heads, seq, head_dim)`` states (nothing stored).

        ``mask`` (bool ``(batch, seq)``, True for real tokens) leaves padding out; when it
        leaves nothing, the result is empty.
        """
        raise NotImplementedError

    def combine(self, mine: Statistics, theirs: Statistics) -> Statistics:
        """The statistics of the union of two sets of observations."""
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(low, high)`` range the statistics imply, each of the parameter shape."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    @property
    def observed(self) -> bool:
        return bool(self.statistics)

    def merge(self, measured: Mapping[str, torch.Tensor]) -> None:
        """Fold a :meth:`measure` result (or another observer's statistics) into this one."""
        if not measured:
            return
        with self._lock:
            if not self.statistics:
                self.statistics = {name: tensor for name, tensor in measured.items()}
            else:
                self.statistics = self.combine(self.statistics, dict(measured))

    def load(self, statistics: Mapping[str, torch.Tensor]) -> None:
        """Replace the statistics (from a saved state); fields must be exactly :attr:`fields`."""
        if set(statistics) != set(self.fields):
            raise ValueError(f"expected statistics {sorted(self.fields)}, got {sorted(statistics)}")
        with self._lock:
            self.statistics = {name: statistics[name].detach().to(torch.float32).clone() for name in self.fields}

    def reset(self) -> None:
        with self._lock:
            self.statistics = {}

    def __getstate__(self) -> dict[str, Any]:  # locks cannot be copied or pickled
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


OBSERVERS: dict[QuantMethod, type[Observer]] = {}


def register_observer(method: QuantMethod) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make ``method`` build this observer."""

    def register(cls: type[Observer]) -> type[Observer]:
        OBSERVERS[method] = cls
        return cls

    return register


@register_observer(QuantMethod.MINMAX)
class MinMaxObserver(Observer):
    """Running minimum and maximum of every element that shares a parameter (msModelSlim's ``minmax``)."""

    fields = ("min", "max")

    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        if mask is None:
            low, high = stream_minmax(states, self.granularity)
            return {"min": low, "max": high}
        if not bool(mask.any()):
            return {}
        keep = mask[:, None, :, None].to(states.device)
        low = self.granularity.reduce(torch.where(keep, states, torch.inf), torch.amin).float()
        high = self.granularity.reduce(torch.where(keep, states, -torch.inf), torch.amax).float()
        return {"min": low, "max": high}

    def combine(self, mine: Statistics, theirs: Statistics) -> Statistics:
        return {
            "min": torch.minimum(mine["min"], theirs["min"].to(mine["min"].device)),
            "max": torch.maximum(mine["max"], theirs["max"].to(mine["max"].device)),
        }

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.statistics["min"], self.statistics["max"]


class RopeRadiusObserver(MinMaxObserver):
    """``minmax`` whose RoPE channel pairs take ``+-`` the largest radius seen (``rope_radius``).

    RoPE turns each pair ``(i, i + pairs)`` of a head by an angle that grows with the
    position; the radius ``sqrt(k_i^2 + k_{i+pairs}^2)`` is the one thing about the pair no
    position changes, so ``[-r_max, r_max]`` on both channels holds at every position while a
    per-channel ``[min, max]`` holds only for the angles calibration reached. Channels past
    ``2 * pairs`` (partial rotary) keep their own ``[min, max]``. The statistics are the
    seed's ``min``/``max`` fields, merged the same way, so states, exports and distributed
    calibration read them unchanged. ``pairs`` (``rotary_dim / 2``) is the model's: the
    quantizer sets it with :meth:`set_rope_pairs` before the first batch.
    """

    def __init__(self, args: QuantArgs) -> None:
        super().__init__(args)
        self.rope_pairs: int | None = None

    def set_rope_pairs(self, pairs: int) -> None:
        """Pair channel ``i`` with ``i + pairs`` (the rotate-half layout; ``pairs = rotary_dim / 2``)."""
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
            raise ValueError(f"rope pairs must be a positive integer, got {pairs!r}")
        self.rope_pairs = pairs

    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        if self.rope_pairs is None:
            raise RuntimeError("rope_radius ranges need the model's RoPE pairs: the quantizer sets them")
        pairs = self.rope_pairs
        if 2 * pairs > states.shape[-1]:
            raise ValueError(f"{2 * pairs} RoPE channels do not fit head_dim {states.shape[-1]}")
        if mask is not None and not bool(mask.any()):
            return {}
        x = states.detach().float()
        radius = torch.hypot(x[..., :pairs], x[..., pairs : 2 * pairs])
        rest = x[..., 2 * pairs :]
        low = torch.cat([-radius, -radius, rest], dim=-1)
        high = torch.cat([radius, radius, rest], dim=-1)
        if mask is not None:
            keep = mask[:, None, :, None].to(states.device)
            low = torch.where(keep, low, torch.inf)
            high = torch.where(keep, high, -torch.inf)
        return {"min": self.granularity.reduce(low, torch.amin), "max": self.granularity.reduce(high, torch.amax)}


class SummedObserver(Observer):
    """Statistics that are sums: merging two sets of observations (or ranks) adds them field by field."""

    def combine(self, mine: Statistics, theirs: Statistics) -> Statistics:
        return {name: mine[name] + theirs[name].to(mine[name].device) for name in self.fields}


class AveragedRangeObserver(SummedObserver):
    """A range estimated on each batch, averaged over batches (weighted by their token count).

    Fields: ``low`` and ``high`` (the weighted sums of the per-batch ranges) and
    ``weight`` (the total weight), so merging is a plain sum and the all-reduce of
    distributed calibration is a SUM. Subclasses define :meth:`batch_range`.
    """

    fields = ("low", "high", "weight")

    def batch_range(self, states: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        if mask is not None and not bool(mask.any()):
            return {}
        keep = None if mask is None else mask[:, None, :, None].to(states.device)
        tokens = states.shape[0] * states.shape[2] if mask is None else int(mask.sum())
        low, high = self.batch_range(states.detach().float(), keep)
        weight = torch.full_like(low, float(tokens))
        return {"low": low * weight, "high": high * weight, "weight": weight}

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.statistics["weight"]
        return self.statistics["low"] / weight, self.statistics["high"] / weight


def _grouped_values(granularity: Granularity, states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """States rearranged to ``param_shape + (elements,)``: every element sharing a parameter in the last dim.

    Padding (``keep`` False) becomes NaN, which the quantile and the error search ignore.
    """
    if keep is not None:
        states = torch.where(keep, states, torch.nan)
    view = granularity.grouped(states)
    dims = {  # reduction dims of the grouped view, as granularity.py defines them
        "per_tensor": (0, 1, 2, 3),
        "per_head": (0, 2, 3),
        "per_channel": (0, 2),
        "group": (0, 2, 4),
    }[granularity.scope.value]
    kept = [dim for dim in range(view.dim()) if dim not in dims]
    return view.permute(*kept, *dims).reshape(*(view.shape[dim] for dim in kept), -1)


@register_observer(QuantMethod.PERCENTILE)
class PercentileObserver(AveragedRangeObserver):
    """The ``percentile`` (option, default 99.99, in ``(50, 100]``) and ``100 - percentile`` quantiles of each batch."""

    def batch_range(self, states: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        percentile = float(self.args.options.get("percentile", 99.99))
        values = _grouped_values(self.granularity, states, keep)
        quantiles = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=values.device)
        low, high = torch.nanquantile(values, quantiles, dim=-1)
        return low, high


@register_observer(QuantMethod.MSE)
class MSEObserver(AveragedRangeObserver):
    """The clipping of each batch's range that minimises its quantization error (grid of ``grid`` shrink steps).

    For every parameter group it tries ranges ``[min, max] * (1 - i / (2 * grid))`` for
    ``i < grid`` and keeps the one whose fake-quantized values have the least squared
    error; the number format and symmetry are the stream's own.
    """

    def batch_range(self, states: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        from quantcache.ops.quantize import compute_qparams

        grid = int(self.args.options.get("grid", 20))
        values = _grouped_values(self.granularity, states, keep)
        low = torch.nan_to_num(values, nan=torch.inf).amin(dim=-1)
        high = torch.nan_to_num(values, nan=-torch.inf).amax(dim=-1)
        best_error = torch.full_like(low, torch.inf)
        best_low, best_high = low.clone(), high.clone()
        fmt = self.args.format
        for step in range(grid):
            shrink = 1.0 - step / (2.0 * grid)
            params = compute_qparams(low * shrink, high * shrink, symmetric=self.args.symmetric, fmt=fmt)
            scale, zero_point = params.scale.unsqueeze(-1), params.zero_point.unsqueeze(-1).float()
            codes = torch.clamp(torch.round(values / scale + zero_point), fmt.qmin, fmt.qmax)
            error = torch.nansum(((codes - zero_point) * scale - values).square(), dim=-1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_low = torch.where(better, low * shrink, best_low)
            best_high = torch.where(better, high * shrink, best_high)
        return best_low, best_high


def _real_tokens(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float] | None:
    """``(batch, heads, seq, head_dim)`` float ``values`` with padding zeroed, and how many real tokens they hold.

    ``mask`` (bool ``(batch, seq)``, True for real tokens) says which are padding; a mask that
    leaves nothing gives None.
    """
    if mask is None:
        return values, float(values.shape[0] * values.shape[2])
    if not bool(mask.any()):
        return None
    return torch.where(mask[:, None, :, None].to(values.device), values, 0.0), float(mask.sum())


class CenterObserver(SummedObserver):
    """The mean of every (kv_head, head_dim channel) over all real tokens: a dynamic stream's ``center``.

    Fields ``center_sum`` and ``center_count``, each ``(kv_heads, head_dim)`` float32:
    merging (and the all-reduce of distributed calibration) is a plain sum. Measured in
    the model's space, before any rotation, so the mean is the model's own.
    """

    fields: ClassVar[tuple[str, ...]] = ("center_sum", "center_count")

    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        real = _real_tokens(states.detach().float(), mask)
        if real is None:
            return {}
        total = real[0].sum(dim=(0, 2))
        return {"center_sum": total, "center_count": torch.full_like(total, real[1])}

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("a center observer collects a mean, not a range")

    def center(self) -> torch.Tensor:
        """The ``(kv_heads, head_dim)`` float32 mean."""
        return self.statistics["center_sum"] / self.statistics["center_count"]


QUERY_AWARE_SCALE_LIMIT = 8.0
"""How far a query-aware channel scale may stray from its head's RMS scale, either way."""


def query_aware_scale(key_variance: torch.Tensor, query_energy: torch.Tensor) -> torch.Tensor:
    """Per-channel key scales ``(kv_heads, head_dim)`` that minimise the logit error of per-token quantization.

    A dynamic scheme's per-token range, after a rotation, is set by the scaled keys'
    total energy ``sum_j s_j^2 v_j``; the error a query sees is ``sum_j Q_j e_j^2 / s_j^2``
    for the (then white) quantization error ``e``. Their product is least for
    ``s_j^2 = sqrt(Q_j / v_j)`` (Cauchy-Schwarz), i.e. ``s_j = (Q_j / v_j) ** (1 / 4)``.
    Both are averaged over each RoPE pair (channels ``j`` and ``j + head_dim / 2``, which
    the position turns into each other). Each head's scales are divided by their RMS (a
    per-token range makes only their ratios matter) and kept within
    :data:`QUERY_AWARE_SCALE_LIMIT` of it either way, so that a channel that calibration
    queries hardly read still gets a usable step on other text.

    Args:
        key_variance: ``(kv_heads, head_dim)`` variance of the keys about their means.
        query_energy: ``(kv_heads, head_dim)`` mean squared query, summed over the query
            heads that read each kv head.
    """
    variance, energy = key_variance.double().clamp(min=0), query_energy.double().clamp(min=0)
    if variance.shape[-1] % 2 == 0:
        half = variance.shape[-1] // 2
        variance = 0.5 * (variance + variance.roll(half, -1))
        energy = 0.5 * (energy + energy.roll(half, -1))
    tiny = torch.finfo(torch.float32).tiny
    variance = variance + 1e-4 * variance.mean(-1, keepdim=True) + tiny
    energy = energy + 1e-4 * energy.mean(-1, keepdim=True) + tiny
    scale = (energy / variance).pow(0.25)
    scale = scale / scale.square().mean(-1, keepdim=True).sqrt()
    return scale.clamp(1 / QUERY_AWARE_SCALE_LIMIT, QUERY_AWARE_SCALE_LIMIT).to(torch.float32)


class QueryAwareCenterObserver(CenterObserver):
    """A query-aware key stream's statistics: its channel means and what its channel scales weigh.

    Fields beside the center's, each ``(kv_heads, head_dim)`` float32 and a sum:
    ``key_square_sum`` (squared keys, over the tokens ``center_count`` counts),
    ``query_square_sum`` (squared queries, summed over the query heads that read the kv
    head) and ``query_count`` (query tokens). A measurement of keys carries zero query
    sums and one of queries zero key sums, so a merge, and the all-reduce of distributed
    calibration, stays a plain SUM of every field.
    """

    fields = (*CenterObserver.fields, "key_square_sum", "query_square_sum", "query_count")

    @property
    def observed(self) -> bool:
        """Whether keys were observed (queries alone give no center)."""
        return bool(self.statistics) and bool((self.statistics["center_count"] > 0).all())

    @property
    def queries_observed(self) -> bool:
        return bool(self.statistics) and bool((self.statistics["query_count"] > 0).all())

    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        measured = super().measure(states, mask)
        real = _real_tokens(states.detach().float().square(), mask)
        if real is None:
            return measured
        squares = real[0].sum(dim=(0, 2))
        zeros = torch.zeros_like(squares)
        return {**measured, "key_square_sum": squares, "query_square_sum": zeros, "query_count": zeros.clone()}

    def measure_queries(self, queries: torch.Tensor, kv_heads: int, mask: torch.Tensor | None = None) -> Statistics:
        """Statistics of ``(batch, heads, seq, head_dim)`` queries.

        The ``heads / kv_heads`` query heads from ``g * heads / kv_heads`` on read kv head ``g``;
        ``mask`` (bool ``(batch, seq)``) leaves padding out, as for keys.
        """
        real = _real_tokens(queries.detach().float().square(), mask)
        if real is None:
            return {}
        squares, tokens = real
        batch, heads, seq, head_dim = squares.shape
        energy = squares.reshape(batch, kv_heads, heads // kv_heads, seq, head_dim).sum(dim=(0, 2, 3))
        zeros = torch.zeros_like(energy)
        return {
            "center_sum": zeros,
            "center_count": zeros.clone(),
            "key_square_sum": zeros.clone(),
            "query_square_sum": energy,
            "query_count": torch.full_like(energy, tokens),
        }

    def channel_scale(self) -> torch.Tensor:
        """The ``(kv_heads, head_dim)`` float32 key scales (:func:`query_aware_scale`) the statistics imply."""
        return self.channel_scale_from(self.statistics)

    @staticmethod
    def channel_scale_from(statistics: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`channel_scale` of saved ``statistics`` (the fields of this observer)."""
        count = statistics["center_count"].double()
        mean = statistics["center_sum"].double() / count
        variance = statistics["key_square_sum"].double() / count - mean.square()
        energy = statistics["query_square_sum"].double() / statistics["query_count"].double()
        return query_aware_scale(variance, energy)


class QueryMomentObserver(QueryAwareCenterObserver):
    """A query-aware key stream's statistics when it also rounds query-aware (``rounding: query_aware``).

    One field beside :class:`QueryAwareCenterObserver`'s: ``query_moment_sum``,
    ``(kv_heads, head_dim, head_dim)`` float32, the sum of ``q q^T`` over the query
    tokens and the query heads that read each kv head (its diagonal is
    ``query_square_sum``), merged by a plain SUM like the others.
    """

    fields = (*QueryAwareCenterObserver.fields, "query_moment_sum")

    def measure(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Statistics:
        measured = super().measure(states, mask)
        if not measured:
            return measured
        heads, head_dim = measured["center_sum"].shape
        return {**measured, "query_moment_sum": measured["center_sum"].new_zeros(heads, head_dim, head_dim)}

    def measure_queries(self, queries: torch.Tensor, kv_heads: int, mask: torch.Tensor | None = None) -> Statistics:
        measured = super().measure_queries(queries, kv_heads, mask)
        if not measured:
            return measured
        real = _real_tokens(queries.detach().float(), mask)
        assert real is not None  # the energy above found real tokens
        batch, heads, seq, head_dim = real[0].shape
        grouped = real[0].reshape(batch, kv_heads, heads // kv_heads * seq, head_dim).transpose(0, 1)
        grouped = grouped.reshape(kv_heads, -1, head_dim)
        return {**measured, "query_moment_sum": grouped.transpose(1, 2) @ grouped}

    def query_moment(self) -> torch.Tensor:
        """The ``(kv_heads, head_dim, head_dim)`` mean ``q q^T`` per query token (summed over the heads)."""
        return self.query_moment_from(self.statistics)

    @staticmethod
    def query_moment_from(statistics: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`query_moment` of saved ``statistics``."""
        return statistics["query_moment_sum"] / statistics["query_count"][:, :1, None]


def make_observer(args: QuantArgs) -> Observer:
    """The observer ``args.method`` names (a centred dynamic stream's: its :class:`CenterObserver`)."""
    if args.dynamic and args.center:
        if args.rounding is Rounding.QUERY_AWARE:
            return QueryMomentObserver(args)
        return QueryAwareCenterObserver(args) if args.query_aware else CenterObserver(args)
    if args.rope_radius:
        return RopeRadiusObserver(args)
    return OBSERVERS[args.method](args)

