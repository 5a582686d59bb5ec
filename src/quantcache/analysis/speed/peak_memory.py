"""The peak memory of a stretch of work: the CUDA allocator's, or the process's resident set on Linux."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from quantcache.analysis.speed.measure import synchronize

__all__ = ["PeakKind", "PeakMeter"]

PeakKind = Literal["cuda_max_allocated", "rss_high_water"]


class PeakMeter:
    """The peak memory of a stretch of work: the CUDA allocator's, the process's resident set on Linux, or none.

    ``start()`` resets the high-water mark, ``stop()`` reads it (bytes, or ``None`` where
    :attr:`kind` is ``None``). On a CPU the mark is the whole process's (model weights
    included); freed heap memory is returned to the system first (glibc ``malloc_trim``) so
    that what an earlier contender freed does not count as resident for the next one. The
    caller frees its garbage before :meth:`start`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind: PeakKind | None = None
        self._trim: Callable[[int], int] | None = None
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif device.type == "cpu" and self._reset_rss():
            self.kind = "rss_high_water"
            self._trim = _malloc_trim()

    @staticmethod
    def _reset_rss() -> bool:
        """Reset the process's resident high-water mark (Linux ``/proc/self/clear_refs``); False where impossible."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return _read_hwm() is not None

    def start(self) -> None:
        """Forget the peak so far (after handing freed heap memory back to the system)."""
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss_high_water":
            if self._trim is not None:
                self._trim(0)
            self._reset_rss()

    def stop(self) -> int | None:
        """The peak bytes since :meth:`start`, or ``None`` where it cannot be measured."""
        if self.kind == "cuda_max_allocated":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_high_water":
            return _read_hwm()
        return None


def _read_hwm() -> int | None:
    """The process's resident high-water mark in bytes (``VmHWM`` of ``/proc/self/status``)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (hands freed heap memory back to the system), or ``None`` without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim
