"""Progress output (quantcache.progress): a live bar on a terminal, a few plain lines anywhere else."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import PreTrainedModel

from quantcache.calibration.calibrate import calibrate
from quantcache.progress import PlainLineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def plain(stream: io.StringIO, total: int | None, **kwargs: float) -> PlainLineProgress:
    """A plain-line bar that considers printing on every update (no rate limiting by tqdm)."""
    return PlainLineProgress(
        total=total, desc="work", unit="tok", unit_scale=True, file=stream, mininterval=0, miniters=1, **kwargs
    )


def test_plain_lines_at_each_tenth_without_carriage_returns() -> None:
    stream = io.StringIO()
    bar = plain(stream, 1000)
    for _ in range(100):
        bar.update(10)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == [f"{percent}%" for percent in range(10, 101, 10)]
    assert lines[-1].startswith("work: 100% 1.00k/1.00k tok")


def test_close_prints_the_final_count_once() -> None:
    stream = io.StringIO()
    bar = plain(stream, 1000)
    bar.update(15)  # inside the first tenth: nothing yet
    assert stream.getvalue() == ""
    bar.close()
    assert stream.getvalue().splitlines() == [stream.getvalue().strip()]
    assert "15.0/1.00k" in stream.getvalue()


def test_a_long_quiet_stretch_still_prints_a_line() -> None:
    stream = io.StringIO()
    bar = plain(stream, None, line_seconds=0.0)  # unknown total: time is the only trigger
    for _ in range(3):
        bar.update(10)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("work: 30.0 tok")


def test_a_growing_total_keeps_reporting() -> None:
    stream = io.StringIO()
    bar = plain(stream, 100)
    bar.update(100)
    bar.total = 200  # one more pass, as suggest-exclude's search adds them
    bar.update(20)  # 60 % of the new total: the 50 % mark was never printed for it
    bar.close()
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["100%", "60%"]


def test_progress_bar_fits_the_stream() -> None:
    assert isinstance(progress_bar(10, "x", True, file=io.StringIO()), PlainLineProgress)
    live = progress_bar(10, "x", True, file=Terminal())
    assert not isinstance(live, PlainLineProgress)
    live.close()
    quiet = io.StringIO()
    disabled = progress_bar(10, "x", False, file=quiet)
    disabled.update(10)
    disabled.close()
    assert quiet.getvalue() == ""


def test_calibration_progress_in_a_log_is_a_few_plain_lines(
    llama: PreTrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    windows = torch.randint(3, 100, (12, 8), generator=torch.Generator().manual_seed(0))
    calibrate(llama, windows, progress=True).new_cache()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 11 and all(line.startswith("calibrate: ") for line in lines)
    assert lines[-1].startswith("calibrate: 100% 96.0/96.0 tok")
