"""How every file and directory quantcache writes comes into being: umask permissions, staging, write failures.

Outputs are built under a hidden name beside their destination (the same file system, so
the final rename is atomic) and renamed into place, so no reader ever sees half of one.
Three things follow from that, and live here so that every writer (state files, exports,
the command line's run directories and reports) gets them alike:

* Permissions. ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 and safetensors writes
  through a private temporary file, so a renamed-in output would be unreadable to anyone
  else (a serving engine running as another user). :func:`apply_umask` gives a file or a
  whole tree the permissions the process umask gives new files (0644/0755 under umask 022).
* Leftovers. A process killed outright (SIGKILL, a power cut) runs no cleanup and leaves
  its staging behind. Staging names carry a marker, the writing host and process id
  (:func:`staging_path`), so the next write to the same destination recognises those
  whose owner is gone (:func:`remove_stale_staging`) and removes them.
* Write failures. A full disk surfaces as ``OSError(ENOSPC)`` or, from safetensors, as a
  ``SafetensorError`` that names no path. :func:`reporting_write_failures` turns either
  into the project error the caller names, with the destination and the way out (exit 3
  on the command line), after the caller's own cleanup has removed the partial output.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantcache.errors import QuantcacheError

__all__ = [
    "STALE_AFTER_S",
    "apply_umask",
    "directory_mode",
    "file_mode",
    "make_staging_directory",
    "remove_stale_staging",
    "reporting_write_failures",
    "staging_path",
    "write_failure",
    "write_failure_error",
]

STALE_AFTER_S = 24 * 3600
"""Age after which staging is removed whatever its owner: one written on another host (whose
process ids mean nothing here), or one whose process id was reused by an unrelated process."""

_KINDS = ("staging", "tmp", "old", "probe")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGING = re.compile(
    r"^\.(?P<name>.+)\.quantcache-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>" + "|".join(_KINDS) + r")$"
)
# errno values that mean "this output cannot be written here", and what to do about each.
_WRITE_ERRNOS = {
    number: fix
    for number, fix in (
        (errno.ENOSPC, "free space on that file system or write somewhere else"),
        (getattr(errno, "EDQUOT", None), "free space within your disk quota or write somewhere else"),
        (errno.EFBIG, "write to a file system that takes files this large"),
        (errno.EROFS, "write somewhere else"),
    )
    if number is not None
}


# ---------------------------------------------------------------------------- permissions
def _umask() -> int:
    """The process umask: read from /proc where Linux shows it, else set and at once set back.

    Setting it changes it for every thread for an instant; a file another thread creates
    then would get the wrong permissions, so that is only the fallback.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions a new file gets under the process umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def directory_mode() -> int:
    """The permissions a new directory gets under the process umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions the umask gives new ones.

    Symbolic links are left alone (their permissions mean nothing, and following one could
    change a file outside the output).
    """
    files, directories = file_mode(), directory_mode()
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, files)
        return
    for root, names, entries in os.walk(path):
        for name in entries:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), files)
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), directories)
    os.chmod(path, directories)


# ---------------------------------------------------------------------------- staging
def staging_path(final: Path, kind: str) -> Path:
    """A fresh hidden name beside ``final`` for building it (``kind``: staging, tmp, old or probe).

    ``.NAME.quantcache-HOST-PID-TOKEN.KIND``: the marker and ``NAME`` say what it belongs
    to, ``HOST`` (a hash of the host name) and ``PID`` whose it is, so a later run can tell
    a live writer's staging from a dead one's.
    """
    if kind not in _KINDS:
        raise ValueError(f"staging kind {kind!r} is not one of {_KINDS}")
    return final.with_name(f".{final.name}.quantcache-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # signal 0 is not a probe elsewhere: keep it until it is old
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _stale(entry: Path, host: str, pid: int) -> bool:
    if host == _HOST and pid == os.getpid():
        return False  # this process's own: it removes it itself
    if host == _HOST and not _alive(pid):
        return True
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove what earlier writers of ``final`` left beside it when they died; returns what was removed.

    Only entries named by :func:`staging_path` for ``final`` are considered, and only those
    whose writer on this host is gone or that are older than :data:`STALE_AFTER_S`: a
    concurrent writer's staging is never touched. Failures to remove are ignored (the
    entry stays for a later run); nothing here may stop the write that called it.
    """
    removed: list[Path] = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match is None or match.group("name") != final.name:
            continue
        if not _stale(entry, match.group("host"), int(match.group("pid"))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def make_staging_directory(final: Path) -> Path:
    """Create an empty staging directory beside ``final`` (after removing dead writers' leftovers)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    while True:
        staging = staging_path(final, "staging")
        try:
            staging.mkdir(0o777)  # the umask applies
        except FileExistsError:
            continue
        return staging


# ---------------------------------------------------------------------------- failures
def write_failure(error: BaseException) -> str | None:
    """What went wrong if ``error`` means an output could not be written (a full disk ...), else ``None``.

    An error raised *because of* such a failure (a writer below already translated it)
    counts too, so an outer writer can name its own destination instead of a staging path.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        reason = _own_write_failure(cause)
        if reason is not None:
            return reason
        cause = cause.__cause__
    return None


def _own_write_failure(error: BaseException) -> str | None:
    if isinstance(error, OSError) and error.errno is not None and error.errno in _WRITE_ERRNOS:
        return f"{os.strerror(error.errno)}; {_WRITE_ERRNOS[error.errno]}"
    if type(error).__name__ == "SafetensorError":  # safetensors reports its I/O errors as this, without errno
        text = " ".join(str(error).split())[:200]
        if "StorageFull" in text or "No space left" in text:
            return f"{os.strerror(errno.ENOSPC)}; {_WRITE_ERRNOS[errno.ENOSPC]}"
        return f"safetensors could not write it ({text})"
    return None


def write_failure_error(
    error: BaseException, destination: Path, error_class: type[QuantcacheError], what: str
) -> QuantcacheError | None:
    """``error_class`` naming ``what``, ``destination`` and the way out when ``error`` is a failure to write."""
    reason = write_failure(error)
    if reason is None:
        return None
    return error_class(f"cannot write {what} {destination}: {reason} (the destination was left as it was)")


@contextmanager
def reporting_write_failures(destination: Path, error_class: type[QuantcacheError], what: str) -> Iterator[None]:
    """Turn a failure to write (see :func:`write_failure`) inside the block into ``error_class``.

    The message names ``what`` was being written, ``destination`` and the way out; every
    other exception passes unchanged. Cleanup of the partial output is the caller's (a
    ``finally`` inside the block runs before this translation).
    """
    try:
        yield
    except Exception as error:
        failure = write_failure_error(error, destination, error_class, what)
        if failure is None:
            raise
        raise failure from error
