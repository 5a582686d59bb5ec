"""What every writer leaves on disk: umask permissions, no partial output on a full disk, no dead staging.

Each output quantcache writes (state files, export checkpoints, import runs, the command
line's reports) is built under a hidden name and renamed into place. These tests hold
every writer to the same three rules: the result has the permissions the umask gives new
files and directories (a serving engine under another user must read an export), a full
disk is a one-line error naming the destination (exit 3) with nothing partial left, and
what a process killed outright left behind is removed by the next write to the same
destination, while a live writer's staging is never touched.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB
from safetensors import SafetensorError
from transformers import PreTrainedModel

from quantcache import QuantStateError, cli
from quantcache.calibration.calibrate import calibrate
from quantcache.errors import InputError
from quantcache.export import export_checkpoint
from quantcache.export.checkpoint import SCALE_SHARD
from quantcache.outputs import STALE_AFTER_S, remove_stale_staging, staging_path
from quantcache.state.file import read_state_file, write_state_file

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and signals")

ENOSPC_TEXT = "No space left on device; free space on that file system or write somewhere else"


@pytest.fixture(scope="module")
def run_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    windows = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    calibrate(llama, windows, progress=False).save(run / "kv_scales.safetensors")
    return run


@pytest.fixture(scope="module")
def model_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    llama.save_pretrained(path)
    return path


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test; the original comes back afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


def main(*argv: Any) -> int:
    return cli.main([str(arg) for arg in argv])


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``'s parent."""
    found = {root.name: stat.S_IMODE(root.stat().st_mode)}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root.parent))] = stat.S_IMODE(path.stat().st_mode)
    return found


def assert_umask_modes(root: Path, mask: int) -> None:
    for name, mode in modes(root).items():
        path = root.parent / name
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode == expected, f"{name}: {oct(mode)}, expected {oct(expected)} under umask {oct(mask)}"


# ================================================================================ 1. permissions
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exports_and_imports_get_the_permissions_the_umask_gives(
    mask: int,
    run_dir: Path,
    model_dir: Path,
    llama: PreTrainedModel,
    tmp_path: Path,
    umask: Callable[[int], None],
) -> None:
    """Not mkdtemp's 0700 nor safetensors' 0600: under umask 022 a serving process of another user reads it all."""
    umask(mask)
    scales = ["export", "--scales", run_dir, "-q"]
    assert main(*scales, "--model", model_dir, "--format", "vllm", "-o", tmp_path / "full") == 0
    assert main(*scales, "--format", "ascend", "--scales-only", "-o", tmp_path / "kv") == 0
    export_checkpoint(run_dir, tmp_path / "saved", format="ascend", model=llama)  # save_pretrained's weights
    assert main("import", "--format", "vllm", tmp_path / "full", "-o", tmp_path / "back", "-q") == 0
    for name in ("full", "kv", "saved", "back"):
        assert_umask_modes(tmp_path / name, mask)
    assert {SCALE_SHARD, "model.safetensors.index.json"} <= set(_entries(tmp_path / "full"))
    assert main(*scales, "--format", "ascend", "--scales-only", "-o", tmp_path / "kv", "--force") == 0
    assert_umask_modes(tmp_path / "kv", mask)  # a replaced export too


# ================================================================================ 2. a full disk
def _no_space(*args: Any, **kwargs: Any) -> None:
    """A writer that starts the file, then finds the disk full (as safetensors and shutil do)."""
    for argument in (*args, *kwargs.values()):
        if isinstance(argument, (str, Path)) and str(argument).endswith(".safetensors"):
            Path(argument).write_bytes(b"\0" * 64)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_no_space(*args: Any, **kwargs: Any) -> None:
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("writer", [_no_space, _safetensors_no_space], ids=["OSError", "SafetensorError"])
def test_a_full_disk_while_writing_a_state_is_a_state_error_and_leaves_nothing(
    writer: Callable[..., None], run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = read_state_file(run_dir / "kv_scales.safetensors")
    monkeypatch.setattr("quantcache.state.file.save_file", writer)
    target = tmp_path / "kv.safetensors"
    with pytest.raises(QuantStateError) as refused:
        write_state_file(target, stored)
    assert str(refused.value) == f"cannot write the state {target}: {ENOSPC_TEXT} (the destination was left as it was)"
    assert _entries(tmp_path) == []


def test_a_full_disk_during_export_exits_3_and_leaves_the_previous_export(
    run_dir: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c8"
    assert main("export", "--scales", run_dir, "--model", model_dir, "--format", "ascend", "-o", out, "-q") == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    failing = [("save_file", _no_space), ("save_file", _safetensors_no_space), ("shutil.copyfile", _no_space)]
    for target, writer in failing:
        with monkeypatch.context() as patch:
            patch.setattr(f"quantcache.export.checkpoint.{target}", writer)
            for destination, force in ((out, ["--force"]), (tmp_path / "new", [])):
                arguments = ["--model", model_dir, "--format", "ascend", "-o", destination, "-q", *force]
                assert main("export", "--scales", run_dir, *arguments) == 3
                assert capsys.readouterr().err == (
                    f"quantcache: error: cannot write the export {destination}: {ENOSPC_TEXT} (the destination was "
                    "left as it was)\n"
                )
    assert _entries(tmp_path) == ["c8"]  # no staging, no half export
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_full_disk_during_import_exits_3_and_leaves_nothing(
    run_dir: Path,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint = tmp_path / "c8"
    assert main("export", "--scales", run_dir, "--model", model_dir, "--format", "ascend", "-o", checkpoint, "-q") == 0
    monkeypatch.setattr("quantcache.state.file.save_file", _no_space)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "run"
    assert main("import", "--format", "ascend", checkpoint, "-o", out, "-q") == 3
    assert capsys.readouterr().err == (
        f"quantcache: error: cannot write the output set of {out / 'kv_scales.safetensors'}: {ENOSPC_TEXT} (the "
        "destination was left as it was)\n"
    )
    assert _entries(tmp_path / "out") == []


def test_a_full_disk_while_writing_a_report_exits_3_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from quantcache.cli import _output

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        self.write_bytes(b"{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "reports" / "eval.json"
    with pytest.raises(InputError) as refused:
        _output.write_text(target, "{}", argparse.Namespace(quiet=True))
    assert str(refused.value) == f"cannot write the output {target}: {ENOSPC_TEXT} (the destination was left as it was)"
    assert _entries(target.parent) == []


def test_a_replacement_that_fails_at_its_last_move_puts_the_previous_export_back(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "kv"
    export_checkpoint(run_dir, out, format="ascend", scales_only=True)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    real_replace, moves = os.replace, []

    def replace(source: Any, target: Any) -> None:
        moves.append(Path(target).name)
        if len(moves) == 2:  # the old export is aside, the new one cannot move in
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        export_checkpoint(run_dir, out, format="ascend", scales_only=True, overwrite=True)
    assert moves[1:] == ["kv", "kv"]  # the failed move in, then the old export back
    assert _entries(tmp_path) == ["kv"] and {path.name: path.read_bytes() for path in out.iterdir()} == before


# ================================================================================ 3. what a killed writer left
KILLED_EXPORT = """
import os, signal, sys
from quantcache.export import api
api.commit = lambda staging, destination: os.kill(os.getpid(), signal.SIGKILL)  # killed at the final move
api.export_checkpoint(sys.argv[1], sys.argv[2], format="ascend", scales_only=True)
"""

KILLED_STATE = """
import os, signal, sys
from quantcache.state import file
real = file.save_file
def killed(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
file.save_file = killed
file.write_state_file(sys.argv[2], file.read_state_file(sys.argv[1]))
"""


def _killed(script: str, *arguments: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments)], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr


def test_the_staging_of_an_export_killed_at_its_final_move_is_removed_by_the_next_export(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "kv"
    _killed(KILLED_EXPORT, run_dir / "kv_scales.safetensors", out)
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".kv.quantcache-") and left.name.endswith(".staging") and (left / SCALE_SHARD).is_file()
    export_checkpoint(run_dir, out, format="ascend", scales_only=True)
    assert _entries(tmp_path) == ["kv"]


def test_the_temporary_file_of_a_killed_state_write_is_removed_by_the_next_write(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "kv.safetensors"
    _killed(KILLED_STATE, run_dir / "kv_scales.safetensors", target)
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".kv.safetensors.quantcache-") and left.name.endswith(".tmp")
    write_state_file(target, read_state_file(run_dir / "kv_scales.safetensors"))
    assert _entries(tmp_path) == ["kv.safetensors"]


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def _leftover(
    final: Path, *, pid: int, host: str | None = None, age_s: float = 0.0, directory: bool = True, kind: str = "tmp"
) -> Path:
    """A staging entry for ``final`` as a writer with ``pid`` on ``host`` (default: this one) made it ``age_s`` ago."""
    name = staging_path(final, "staging" if directory else kind).name
    prefix, _, rest = name.rpartition(".quantcache-")
    this_host, _, tail = rest.partition("-")
    tail = f"{pid}-" + tail.partition("-")[2]
    path = final.with_name(f"{prefix}.quantcache-{host or this_host}-{tail}")
    if directory:
        path.mkdir()
        (path / "kv_cache_scales.safetensors").write_bytes(b"x")
    else:
        path.write_bytes(b"x")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_only_dead_or_abandoned_writers_staging_is_removed(tmp_path: Path, dead_pid: int) -> None:
    final = tmp_path / "c8"
    old = STALE_AFTER_S + 60
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            dead = _leftover(final, pid=dead_pid)
            dead_file = _leftover(final, pid=dead_pid, directory=False)
            reused = _leftover(final, pid=live.pid, age_s=old)  # a live process, but far too old to be the writer
            elsewhere_old = _leftover(final, pid=live.pid, host="0123abcd", age_s=old)
            kept = [
                _leftover(final, pid=live.pid),  # a concurrent writer
                _leftover(final, pid=os.getpid()),  # this process's own
                _leftover(final, pid=dead_pid, host="0123abcd"),  # another host's: its pid means nothing here
                _leftover(tmp_path / "other", pid=dead_pid),  # another destination's
            ]
            unrelated = tmp_path / ".c8.tmp-abc123"
            unrelated.mkdir()
            removed = remove_stale_staging(final)
        finally:
            live.kill()
    assert sorted(removed) == sorted([dead, dead_file, reused, elsewhere_old])
    assert all(path.exists() for path in [*kept, unrelated])


def test_the_write_check_removes_probes_that_killed_runs_left(tmp_path: Path, dead_pid: int) -> None:
    from quantcache.cli._output import check_writable

    probe = _leftover(tmp_path / "quantcache-write-check", pid=dead_pid, directory=False, kind="probe")
    check_writable(tmp_path / "eval.json", "--json")
    assert _entries(tmp_path) == [] and not probe.exists()
