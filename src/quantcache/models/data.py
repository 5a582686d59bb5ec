"""Where calibration and evaluation text comes from, and how it becomes token windows.

Quantization parameters are only as good as the activations they were measured on,
and a quality number is only comparable with another if both were measured on the
same tokens. This module therefore turns a *text source* (the built-in corpus, a local
text or JSON Lines file, or WikiText-2 through the optional ``datasets`` library) into
a fixed ``(num_samples, seq_len)`` tensor of token ids that depends only on the text,
the tokenizer, the window length and the seed: never on the machine, the number of
threads or the time of day.

The built-in corpus ships inside the package (``quantcache/corpus/*.txt``) so that the
default commands work offline; its calibration and evaluation splits share no text,
so a model is never evaluated on the text it was calibrated on.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import random
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from quantcache.errors import DataError

if TYPE_CHECKING:  # torch is imported where windows are built, so reading files stays light
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_JSONL_FIELD",
    "DOCUMENT_SEPARATOR",
    "DataError",
    "SourceKind",
    "Split",
    "TextSource",
    "builtin_corpus",
    "file_problem",
    "load_wikitext2",
    "read_jsonl",
    "read_text_file",
    "require_file",
    "token_windows",
]

Split = Literal["calibration", "evaluation"]
"""Which half of a source: calibration text is never used for evaluation."""

SourceKind = Literal["builtin", "text_file", "jsonl", "wikitext2"]
"""The kinds of text source :class:`TextSource` can describe."""

DEFAULT_JSONL_FIELD = "text"
"""The JSON Lines field read when none is named (the common convention of text datasets)."""

DOCUMENT_SEPARATOR = "\n\n"
"""Joins documents before tokenization, so a document never runs into the next mid-sentence."""

_SPLITS: tuple[str, ...] = get_args(Split)
_KINDS: tuple[str, ...] = get_args(SourceKind)
_WIKITEXT_SPLIT: dict[str, Literal["validation", "test"]] = {"calibration": "validation", "evaluation": "test"}

# Long text is tokenized in pieces of at most this many characters. Fast tokenizers
# encode a batch of pieces in parallel, and some (SentencePiece-style ones that treat
# the whole input as one word) are far slower on one huge string than on many small
# ones. Pieces are cut right after a run of line breaks, where tokenizers that keep line
# breaks with the text before them (Llama 3, Qwen) give exactly the ids of the whole
# text; others (GPT-2's pattern, SentencePiece with a dummy prefix) may differ by a
# token at each cut, about one token in two thousand. Either way the cut points depend
# on nothing but the text, so the ids are identical on every run and machine.
_CHUNK_CHARS = 8192
_LINE_BREAKS = re.compile(r"\n+")


def _display(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


# --------------------------------------------------------------------------- readers


def builtin_corpus(split: Split) -> str:
    """The package's own English text for ``split``, so that the default commands need no download.

    The corpus is original prose written for this project (Apache-2.0, like the code):
    encyclopedic articles, a short story with dialogue, news reports, instructions,
    a chat-style exchange, a little Python and a Markdown table, separated by
    ``= Title =`` lines. The two splits share no paragraph.
    """
    if split not in _SPLITS:
        raise DataError(f"unknown built-in corpus split {split!r}; use one of {', '.join(_SPLITS)}")
    return _read_builtin(split)


@cache
def _read_builtin(split: str) -> str:
    """Read once per process: the corpus cannot change while the package is imported."""
    resource = resources.files("quantcache") / "corpus" / f"{split}.txt"
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise DataError(
            f"the built-in corpus file corpus/{split}.txt is missing from the installed package; "
            "reinstall quantcache or pass --text-file"
        ) from error


_NOT_FOUND = "not found"


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a regular file, in a few words; ``None`` when it can.

    ``Path.exists()`` answers False for a symbolic link loop and raises for a path it may
    not look at, so messages built on it call every problem "not found". This opens the
    path once (non-blocking, so a named pipe cannot hang it) and names what it really
    is: ``"not found"``, ``"is a directory"``, ``"is a symbolic link loop"``,
    ``"is a broken symbolic link ..."``, ``"is not readable (permission denied)"`` ...
    """
    location = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(location, flags)
    except OSError as error:
        return _open_problem(location, error)
    try:
        mode = os.fstat(descriptor).st_mode
    finally:
        os.close(descriptor)
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, pipe or socket)"
    return None


def _open_problem(location: Path, error: OSError) -> str:
    if error.errno == errno.ENOENT:
        if location.is_symlink():
            return f"is a broken symbolic link (its target {os.readlink(location)} does not exist)"
        return _NOT_FOUND
    if error.errno == errno.ELOOP:
        return "is a symbolic link loop (following its links never reaches a file)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "is not readable (permission denied)"
    if error.errno == errno.ENOTDIR:
        return f"{_NOT_FOUND} (a part of the path is a file, not a directory)"
    if error.errno == errno.EISDIR or location.is_dir():  # Windows refuses to open directories
        return "is a directory"
    return f"cannot be opened ({error.strerror or type(error).__name__})"


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is a readable regular file; otherwise a
    :class:`DataError` such as ``"config file kv.yaml is a directory"`` (``what`` names the role)."""
    problem = file_problem(path)
    if problem is None:
        return Path(path)
    if problem == _NOT_FOUND:
        raise DataError(f"{what} not found: {_display(path)}; check the path")
    if problem == "is a directory":
        raise DataError(f"{what} {_display(path)} is a directory; give the path of a file inside it")
    if problem.startswith("is not readable"):
        raise DataError(f"cannot read {what} {_display(path)}: permission denied; check its permissions")
    raise DataError(f"{what} {_display(path)} {problem}")


def _read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    """The file's bytes, with every way of not being a readable file turned into a DataError."""
    location = require_file(path, what)
    try:
        return location.read_bytes()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DataError(f"cannot read {what} {_display(path)}: {reason}; check its permissions") from error


def _decode(data: bytes, path: str | os.PathLike[str], what: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); the error names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{what} {_display(path)} is not UTF-8 text (undecodable byte at line {line}, byte offset "
            f"{error.start}); convert it to UTF-8 first"
        ) from error


def read_text_file(path: str | os.PathLike[str], *, what: str = "text file") -> str:
    """The UTF-8 text of ``path`` with line endings normalised to ``\\n``.

    Failing here, with the path in the message, is kinder than failing minutes later
    after the model has loaded, so every unusable file (missing, a directory, empty,
    not UTF-8) raises :class:`DataError`; ``what`` names the file's role in messages.
    """
    text = _decode(_read_bytes(path, what), path, what)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DataError(f"{what} {_display(path)} is empty; give a file with some text in it")
    return text


def read_jsonl(path: str | os.PathLike[str], field: str = DEFAULT_JSONL_FIELD) -> list[str]:
    """The string ``field`` of every record of a JSON Lines file, one document per record.

    Blank lines are skipped. Errors give the line number, because a bad record in a
    file of thousands is otherwise hard to find.
    """
    what = "JSON Lines file"
    text = _decode(_read_bytes(path, what), path, what)
    documents: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{_display(path)}, line {number}"
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg}); each line must be one JSON object") from error
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(record).__name__}; each line must be one JSON object"
            )
        if field not in record:
            keys = ", ".join(repr(key) for key in list(record)[:8]) or "none"
            raise DataError(f"{where}: no field {field!r} (fields: {keys}); name the text field with --jsonl-field")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {field!r} is {type(value).__name__}, not a string; "
                "name the field that holds the text with --jsonl-field"
            )
        documents.append(value)
    if not any(document.strip() for document in documents):
        raise DataError(f"{what} {_display(path)} has no text in field {field!r}; give a file with some records")
    return documents


def load_wikitext2(split: Literal["validation", "test"]) -> str:
    """The raw WikiText-2 ``split`` from the Hugging Face hub, through the optional ``datasets`` library.

    ``datasets`` is optional because the hub is often unreachable (air-gapped
    machines, CI); the error then points at offline alternatives rather than at a
    network stack trace.
    """
    if split not in ("validation", "test"):
        raise DataError(f"unknown WikiText-2 split {split!r}; use validation or test")
    offline = "or pass --text-file with a local copy of WikiText-2, or omit --dataset to use the built-in corpus"
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"--dataset wikitext2 needs the optional 'datasets' package, which is not installed: "
            f"pip install 'quantcache[datasets]', {offline}"
        ) from error
    try:
        dataset = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        lines = dataset["text"]
    except Exception as error:  # the hub fails in many ways: network, auth, cache, format
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise DataError(
            f"could not load WikiText-2 ({split}) from the Hugging Face hub ({reason}); "
            f"check the network and HF_DATASETS_OFFLINE, {offline}"
        ) from error
    # Each row of the raw release is one line of the article and keeps its own "\n".
    text = "".join(str(line) for line in lines)
    if not text.strip():
        raise DataError(f"WikiText-2 ({split}) came back empty; {offline}")
    return text


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class TextSource:
    """Where a command's text comes from: enough to load it again and to say so in a report.

    ``split`` picks the half of a source that has halves: for ``builtin`` the
    calibration or evaluation file, for ``wikitext2`` the validation split for
    calibration and the test split for evaluation. Files are used whole; keep
    calibration and evaluation text apart yourself.
    """

    kind: SourceKind = "builtin"
    path: Path | None = None
    field: str | None = None
    split: Split = "calibration"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise DataError(f"unknown text source kind {self.kind!r}; use one of {', '.join(_KINDS)}")
        if self.split not in _SPLITS:
            raise DataError(f"unknown split {self.split!r}; use one of {', '.join(_SPLITS)}")
        if self.kind in ("text_file", "jsonl"):
            if self.path is None or not os.fspath(self.path):
                raise DataError(f"a {self.kind} source needs a path; give the file to read")
            # Accept str for convenience; store a Path so equal sources compare equal.
            object.__setattr__(self, "path", Path(self.path))
        elif self.path is not None:
            raise DataError(f"a {self.kind} source takes no path (got {self.path}); use kind 'text_file' for a file")
        if self.field is not None and self.kind != "jsonl":
            raise DataError(f"field {self.field!r} only applies to JSON Lines sources; drop it or use kind 'jsonl'")

    @property
    def jsonl_field(self) -> str:
        """The JSON Lines field actually read (``field`` or the default ``"text"``)."""
        return DEFAULT_JSONL_FIELD if self.field is None else self.field

    def load(self) -> list[str]:
        """The source's documents: one for the built-in corpus, a text file or WikiText-2; one per JSONL record."""
        if self.kind == "builtin":
            return [builtin_corpus(self.split)]
        if self.kind == "wikitext2":
            return [load_wikitext2(_WIKITEXT_SPLIT[self.split])]
        assert self.path is not None  # guaranteed by __post_init__
        if self.kind == "text_file":
            return [read_text_file(self.path)]
        return read_jsonl(self.path, self.jsonl_field)

    def describe(self) -> str:
        """A short human-readable name for reports, e.g. ``built-in corpus, calibration split``."""
        if self.kind == "builtin":
            return f"built-in corpus, {self.split} split"
        if self.kind == "wikitext2":
            return f"WikiText-2, {_WIKITEXT_SPLIT[self.split]} split"
        if self.kind == "text_file":
            return f"text file {self.path}"
        return f"JSON Lines file {self.path}, field {self.jsonl_field!r}"


# --------------------------------------------------------------------------- windows


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, preferably right after a run of line breaks.

    A cut after the line breaks keeps them with the line they end, as the pre-tokenizers
    of Llama 3 and Qwen group them. A line longer than ``size`` is cut before a space
    instead (where byte-level tokenizers start a word anyway), and only text without
    either is cut at exactly ``size`` characters.
    """
    if len(text) <= size:
        return [text]
    boundaries = [match.end() for match in _LINE_BREAKS.finditer(text) if match.end() < len(text)]
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        limit = start + size
        index = bisect.bisect_right(boundaries, limit) - 1
        if index >= 0 and boundaries[index] > start:
            cut = boundaries[index]
        else:
            space = text.rfind(" ", start + 1, limit + 1)
            cut = space if space > start else limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, tokenized in deterministic pieces (see ``_chunks``)."""
    encoded = tokenizer(
        _chunks(text),
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # the pieces may exceed model_max_length; windows are cut later
    )
    ids: list[int] = []
    for piece in encoded["input_ids"]:
        ids.extend(int(token) for token in piece)
    return ids


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    add_bos: bool = True,
) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` token ids from ``documents``: an int64 ``(num_samples, seq_len)`` tensor.

    The documents are joined with blank lines, tokenized without special tokens and cut
    into consecutive, non-overlapping windows from the start (a short tail is dropped).
    If ``add_bos`` and the tokenizer has a BOS token, each window holds ``seq_len - 1``
    text tokens after that BOS token, as the model saw text in training; otherwise
    ``seq_len`` text tokens. ``num_samples`` windows are drawn without replacement with
    ``random.Random(seed)`` and returned **in text order** (sorted by position), so the
    same arguments always give the same tensor, and windows never overlap, so no token
    is counted twice. A single string is taken as one document.
    """
    import torch

    if num_samples < 1:
        raise DataError(f"number of samples must be at least 1, got {num_samples}; pass --samples 1 or more")
    if seq_len < 1:
        raise DataError(f"sequence length must be at least 1, got {seq_len}; pass --seq-len 1 or more")
    bos_token_id = tokenizer.bos_token_id if add_bos else None
    width = seq_len - (0 if bos_token_id is None else 1)
    if width < 1:
        raise DataError(
            f"sequence length {seq_len} leaves no room for text after the BOS token; pass --seq-len 2 or more"
        )
    if isinstance(documents, str):
        documents = [documents]
    text = DOCUMENT_SEPARATOR.join(document for document in documents if document.strip())
    if not text:
        raise DataError("no text to cut into windows: every document is empty; give a source with some text")
    ids = _encode(tokenizer, text)
    available = len(ids) // width
    if available < num_samples:
        raise DataError(
            f"the text has {len(ids)} tokens, enough for {available} window(s) of {seq_len} tokens but "
            f"{num_samples} were asked for; pass a smaller --seq-len or --samples, or give more text"
        )
    chosen = sorted(random.Random(seed).sample(range(available), num_samples))
    tokens = torch.tensor(ids[: available * width], dtype=torch.int64).view(available, width)
    windows = tokens[chosen]
    if bos_token_id is not None:
        bos = torch.full((num_samples, 1), int(bos_token_id), dtype=torch.int64)
        windows = torch.cat([bos, windows], dim=1)
    return windows.contiguous()
