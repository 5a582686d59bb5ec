"""Progress bars that suit where stderr goes: live on a terminal, a few plain lines in a log.

tqdm redraws its bar with carriage returns several times a second. On a terminal that
is one line that updates in place; in a file or a CI log every redraw stays, so a
calibration leaves hundreds of ``\\r``-joined updates behind. :func:`progress_bar`
therefore returns a normal tqdm bar when stderr is a terminal (or a notebook widget in
Jupyter) and otherwise a :class:`PlainLineProgress`, which writes one ordinary line at
every tenth of the work and at least every :data:`PLAIN_LINE_SECONDS` seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm.asyncio import tqdm_asyncio
from tqdm.auto import tqdm

__all__ = ["PLAIN_LINE_SECONDS", "PlainLineProgress", "progress_bar", "stream_is_terminal"]

PLAIN_LINE_SECONDS = 30.0
"""Longest quiet time between two plain progress lines when the total is large or unknown."""

_PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"
_PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]"


def stream_is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and captured output)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class PlainLineProgress(tqdm_asyncio):  # type: ignore[type-arg]
    """A tqdm bar that prints whole lines, at each tenth of the total and every 30 s, never ``\\r``.

    The bar keeps tqdm's counting, rate and ETA; only how it is shown differs, so code
    that calls ``update``/``close`` works with either kind.
    """

    def __init__(self, *args: Any, line_seconds: float = PLAIN_LINE_SECONDS, **kwargs: Any) -> None:
        self._line_seconds = line_seconds
        self._printed_n: float = -1
        self._printed_at = time.monotonic()
        # Printed lines stay whatever ``leave`` says; tqdm's own leave=True would add an empty line.
        super().__init__(*args, **{**kwargs, "leave": False})

    def _tenth(self, count: float) -> int:
        """Which tenth of the total ``count`` lies in; computed afresh, since a caller may grow the total."""
        if not self.total or count <= 0:
            return 0
        return min(10, int(10 * count / self.total))

    def _write_line(self) -> None:
        bar_format = _PLAIN_FORMAT if self.total else _PLAIN_FORMAT_NO_TOTAL
        line = self.format_meter(**{**self.format_dict, "bar_format": bar_format, "ncols": None})
        self.fp.write(line.rstrip() + "\n")
        self.fp.flush()
        self._printed_n = self.n
        self._printed_at = time.monotonic()

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        """Called by tqdm on every refresh: print a line only when a tenth was crossed or time passed.

        Returning nothing (falsy) also keeps tqdm's ``close`` from writing its ``\\r``.
        """
        if msg is not None or self.n == self._printed_n:  # tqdm clearing the bar, or nothing new
            return
        due = time.monotonic() - self._printed_at >= self._line_seconds
        if self.n > 0 and (self._tenth(self.n) > self._tenth(self._printed_n) or due):
            self._write_line()

    def close(self) -> None:
        """Print the final count (unless it was the last line printed), then close as tqdm does."""
        if not self.disable and self.n > 0 and self.n != self._printed_n:
            self._write_line()
        super().close()


def progress_bar(
    total: int | None,
    desc: str,
    enabled: bool,
    *,
    unit: str = "tok",
    unit_scale: bool = True,
    file: IO[str] | None = None,
    iterable: Iterable[Any] | None = None,
) -> tqdm[Any]:
    """A progress bar on ``file`` (default: stderr) that fits it: live on a terminal, plain lines elsewhere.

    ``enabled=False`` gives a disabled bar, so callers update it unconditionally.
    Counts use SI prefixes (``1.2k tok``) unless ``unit_scale=False``; the bar is removed on
    close on a terminal.
    With ``iterable`` the bar iterates over it, counting items, as ``tqdm(iterable)`` does.
    """
    stream = sys.stderr if file is None else file
    options: dict[str, Any] = {"total": total, "unit": unit, "unit_scale": unit_scale, "desc": desc, "file": stream}
    if iterable is not None:
        options["iterable"] = iterable
    in_notebook = tqdm is not tqdm_asyncio  # tqdm.auto picked its notebook widget
    if not enabled or in_notebook or stream_is_terminal(stream):
        bar: tqdm[Any] = tqdm(**options, disable=not enabled, leave=False)
        return bar
    return PlainLineProgress(**options)
