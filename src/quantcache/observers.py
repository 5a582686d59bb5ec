"""Observers: calibration statistics behind a small registry keyed by the config's ``method``.

An observer owns what calibration collects for one stream of one layer: how a batch
of states is measured, how two measurements merge (the same merge serves a new batch
and the all-reduce of distributed calibration), how the statistics are saved and
loaded, and the range they imply. It never quantizes: turning the range into
parameters is :func:`quantcache.quantization.compute_qparams`.

``minmax`` (the seed's) is the first; a new observer is a subclass registered with
:func:`register_observer` under its :class:`~quantcache.scheme.QuantMethod` value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from .granularity import Granularity
from .quantization import stream_minmax
from .scheme import QuantArgs, QuantMethod

__all__ = ["OBSERVERS", "MinMaxObserver", "Observer", "make_observer", "register_observer"]

Statistics = dict[str, torch.Tensor]


class Observer:
    """Statistics of one stream; subclasses define what is measured and how it merges.

    ``statistics`` maps a field name (``min``, ``max`` ...) to a float32 tensor of the
    granularity's parameter shape, or is empty before anything was observed. Merging
    holds a lock, so threads calibrating the same layer never lose an update.
    """

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: QuantArgs) -> None:
        self.args = args
        self.granularity = Granularity.of(args)
        self.statistics: Statistics = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what subclasses define
    def measure(self, states: torch.Tensor) -> Statistics:
        """Statistics of one batch of ``(batch, kv_heads, seq, head_dim)`` states (nothing stored)."""
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


class MinMaxObserver(Observer):
    """Running minimum and maximum of every element that shares a parameter (msModelSlim's ``minmax``)."""

    fields = ("min", "max")

    def measure(self, states: torch.Tensor) -> Statistics:
        low, high = stream_minmax(states, self.granularity)
        return {"min": low, "max": high}

    def combine(self, mine: Statistics, theirs: Statistics) -> Statistics:
        return {
            "min": torch.minimum(mine["min"], theirs["min"].to(mine["min"].device)),
            "max": torch.maximum(mine["max"], theirs["max"].to(mine["max"].device)),
        }

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.statistics["min"], self.statistics["max"]


OBSERVERS: dict[QuantMethod, type[Observer]] = {QuantMethod.MINMAX: MinMaxObserver}


def register_observer(method: QuantMethod) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make ``method`` build this observer."""

    def register(cls: type[Observer]) -> type[Observer]:
        OBSERVERS[method] = cls
        return cls

    return register


def make_observer(args: QuantArgs) -> Observer:
    """The observer ``args.method`` names."""
    return OBSERVERS[args.method](args)
