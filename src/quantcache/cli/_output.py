"""Output files of the commands: checked before the work, written so that no reader sees half of them.

A command that runs for minutes must not fail at its last step because ``-o`` points
into a read-only directory, so :func:`check_writable` refuses such a path first.
Every file is then written under a temporary name in its destination's directory (the
same file system, so the final rename is atomic) and renamed into place; a set of files
that belong together (a state and its summaries) goes through :func:`write_file_set`,
which never leaves a new state beside an old summary. Files get the permissions the
user's umask gives new files, whatever the library that wrote them chose; a full disk is
an error naming the output (exit 3), and what a killed earlier run left beside it is
removed (see :mod:`quantcache.outputs`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from quantcache.errors import InputError
from quantcache.outputs import apply_umask, remove_stale_staging, reporting_write_failures, staging_path

from ._common import STATE_FILE_NAME, note, state_path

__all__ = ["check_writable", "output_state_path", "write_file_set", "write_text", "write_with"]


def output_state_path(value: str) -> Path:
    """The state file ``-o`` names (a directory means DIR/kv_scales.safetensors); it must end in .safetensors."""
    path = state_path(value)
    if path.suffix != ".safetensors":
        raise InputError(
            f"-o {value}: the state is a .safetensors file; give a name ending in .safetensors or a directory "
            f"(then {STATE_FILE_NAME} inside it)"
        )
    return path


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(".")


def check_writable(value: str | Path | None, option: str) -> None:
    """Refuse, before any slow work, an output path that cannot become a file (``None`` and ``-`` pass).

    Checks what writing would need: the path is not a directory or a dangling link, its
    nearest existing ancestor is a directory we may create entries in (permissions, a
    read-only file system; tried with an empty file that is removed at once), and an
    existing file there may be replaced.
    """
    if value is None or str(value) == "-":
        return
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{option} {value}: is a directory; give a file name")
    if path.is_symlink() and not path.exists():
        raise InputError(f"{option} {value}: is a broken symbolic link or a link loop")
    ancestor = _nearest_existing(path)
    if not ancestor.is_dir():
        raise InputError(f"{option} {value}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(
            f"{option} {value}: cannot write into {ancestor} (permission denied or a read-only file system)"
        )
    refusal = _creation_refused(ancestor)
    if refusal is not None:
        raise InputError(f"{option} {value}: cannot write into {ancestor} ({refusal})")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {value}: the existing file is not writable (permission denied)")


def _creation_refused(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory``, found by creating (and removing) an empty one.

    ``os.access`` answers from the permission bits, which root is exempt from and which
    say nothing of pseudo file systems such as /proc; only trying tells for sure.
    """
    remove_stale_staging(directory / "quantcache-write-check")  # probes of killed runs
    probe = staging_path(directory / "quantcache-write-check", "probe")
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        return error.strerror or type(error).__name__
    os.close(descriptor)
    probe.unlink(missing_ok=True)
    return None


def write_with(destination: str | Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(path)`` write a temporary file beside ``destination``, then rename it into place.

    An interruption leaves the previous file (or none), never a half-written one; the
    file ends with the umask's permissions even if ``write`` created it 0600.
    """
    target = Path(destination)
    with reporting_write_failures(target, InputError, "the output"):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        partial = staging_path(target, "tmp")
        try:
            write(partial)
            apply_umask(partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def write_text(destination: str | Path, text: str, args: argparse.Namespace) -> None:
    """Write ``text`` (newline-terminated) to stdout for ``-``, else atomically to the file, with a note."""
    if not text.endswith("\n"):
        text += "\n"
    if str(destination) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = write_with(destination, lambda partial: partial.write_text(text, encoding="utf-8"))
    note(args, f"wrote {path}")


def write_file_set(directory: Path, primary: str, write: Callable[[Path], object]) -> list[Path]:
    """Let ``write(staging)`` create a set of files, then move them into ``directory`` as one.

    The files are written into a hidden staging directory beside or inside ``directory``
    (same file system). A ``directory`` that does not exist yet is created by renaming
    the staging directory, so the whole set appears at once. Into an existing one, the
    old companions of ``primary`` are removed first, then ``primary`` and its companions
    are renamed in: an interruption can leave a set without its summaries, never a new
    state beside an old summary or the other way round. Returns the final paths.
    """
    with reporting_write_failures(directory / primary, InputError, "the output set of"):
        return _write_file_set(directory, primary, write)


def _write_file_set(directory: Path, primary: str, write: Callable[[Path], object]) -> list[Path]:
    fresh = not os.path.lexists(directory)
    host = directory.parent if fresh else directory
    host.mkdir(parents=True, exist_ok=True)
    final = host / (directory.name if fresh else primary)
    remove_stale_staging(final)
    staging = staging_path(final, "staging")
    staging.mkdir(0o777)  # the umask applies, so a renamed-in directory has the user's permissions
    try:
        write(staging)
        names = sorted(entry.name for entry in staging.iterdir())
        if primary not in names:
            raise RuntimeError(f"the output set lacks its primary file {primary}")
        apply_umask(staging)
        if fresh:
            try:
                os.rename(staging, directory)
                return [directory / name for name in names]
            except OSError:  # the directory appeared meanwhile: move the files in one by one
                directory.mkdir(parents=True, exist_ok=True)
        companions = [name for name in names if name != primary]
        for name in companions:
            (directory / name).unlink(missing_ok=True)
        os.replace(staging / primary, directory / primary)
        for name in companions:
            os.replace(staging / name, directory / name)
        return [directory / name for name in names]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
