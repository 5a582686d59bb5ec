"""Text sources and token windows: readers, the built-in corpus, deterministic windows.

No hub is reachable, so the tokenizers are built here with the ``tokenizers`` library:
a byte-level tokenizer (ids are ``byte + 3``, with a BOS token) whose output cannot
change between library versions, which lets the windows of the built-in corpus be
pinned by digest, and a small word-level tokenizer without a BOS token.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quantcache.models import data
from quantcache.models.data import (
    DataError,
    TextSource,
    builtin_corpus,
    load_wikitext2,
    read_jsonl,
    read_text_file,
    token_windows,
)

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"

# Pinned so that any edit of the shipped corpus is deliberate: update these together with the text.
CORPUS_SHA256 = {
    "calibration": "e280775660259d857050ab40d7ab86c208c6a9c7ac997ff46e8987732ca6389c",
    "evaluation": "a36175751e27e7c79cc59e72faaf643ab9d20e17425622b889c08b3ee43d10af",
}
# sha256 of the little-endian int64 bytes of token_windows(byte tokenizer, built-in calibration
# split, num_samples=4, seq_len=256, seed=0): the same tokens on every run and machine.
BUILTIN_WINDOWS_SHA256 = "dd83ec33826d4ffa21d686f7629eef6493f4e8cb73381a81732bdc7ef031506b"

BYTE_OFFSET = 3  # <pad>, <s>, </s> come first in the byte tokenizer
BOS_ID = 1
WORDS = [
    *("the", "of", "and", "to", "a", "in", "is", "was", "it", "that", "on", "for", "with", "as", "by"),
    *("at", "from", "this", "be", "are", "his", "her", "their", "quick", "brown", "fox", "jumps", "over"),
    *("lazy", "dog"),
]


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte that byte-level pre-tokenization produces, in byte order."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (id = byte + 3), with <s> as BOS; no merges, so nothing version-dependent."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with no BOS token (like Qwen's): unknown words become [UNK]."""
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in [*WORDS, ".", ","]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def byte_ids(text: str) -> list[int]:
    return [byte + BYTE_OFFSET for byte in text.encode("utf-8")]


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().astype("<i8").tobytes()).hexdigest()


def paragraphs(text: str) -> list[str]:
    return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


def one_line(error: pytest.ExceptionInfo[DataError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- built-in corpus


@pytest.mark.parametrize(("split", "low", "high"), [("calibration", 40_000, 60_000), ("evaluation", 25_000, 45_000)])
def test_builtin_corpus_is_shipped_and_substantial(split: data.Split, low: int, high: int) -> None:
    text = builtin_corpus(split)
    assert low <= len(text) <= high
    assert "\r" not in text and text.endswith("\n")
    titles = re.findall(r"^= (.+) =$", text, flags=re.MULTILINE)
    assert len(titles) >= 10
    assert len(set(titles)) == len(titles)
    assert text.startswith(f"= {titles[0]} =\n\n")
    # Diverse like real inputs: code, a Markdown table, dialogue, numbered steps, numbers and dates.
    assert "```python" in text
    assert re.search(r"^\|[- :|]+\|$", text, flags=re.MULTILINE)
    assert re.search(r'^"[^"\n]+," said', text, flags=re.MULTILINE)
    assert re.search(r"^1\. .+\n\n2\. ", text, flags=re.MULTILINE)
    assert re.search(r"\b1[5-9]\d\d\b", text) and re.search(r"\b20[0-2]\d\b", text)


def test_builtin_splits_differ_and_share_no_paragraph() -> None:
    calibration, evaluation = builtin_corpus("calibration"), builtin_corpus("evaluation")
    assert calibration != evaluation
    assert not set(paragraphs(calibration)) & set(paragraphs(evaluation))
    long_lines = {line for line in calibration.splitlines() if len(line) > 40}
    assert not long_lines & set(evaluation.splitlines())


@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_builtin_corpus_digest_is_pinned(split: data.Split) -> None:
    assert hashlib.sha256(builtin_corpus(split).encode("utf-8")).hexdigest() == CORPUS_SHA256[split]


def test_builtin_corpus_rejects_unknown_split() -> None:
    with pytest.raises(DataError, match="calibration, evaluation"):
        builtin_corpus("training")  # type: ignore[arg-type]


def test_builtin_windows_are_pinned_and_seeded(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    documents = TextSource(kind="builtin", split="calibration").load()
    first = token_windows(byte_tokenizer, documents, num_samples=4, seq_len=256, seed=0)
    again = token_windows(byte_tokenizer, documents, num_samples=4, seq_len=256, seed=0)
    other = token_windows(byte_tokenizer, documents, num_samples=4, seq_len=256, seed=1)
    assert first.shape == (4, 256) and first.dtype == torch.int64
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert digest(first) == BUILTIN_WINDOWS_SHA256


# --------------------------------------------------------------------------- windows


def window_offsets(ids: list[int], rows: torch.Tensor, width: int) -> list[int]:
    """Where each row's text tokens start in ``ids`` (asserting they are one of the aligned windows)."""
    offsets = []
    for row in rows.tolist():
        matches = [start for start in range(0, len(ids) - width + 1, width) if ids[start : start + width] == row]
        assert len(matches) == 1, "each row must be exactly one aligned, non-overlapping window of the text"
        offsets.append(matches[0])
    return offsets


def test_windows_shape_dtype_bos_and_alignment(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    text = builtin_corpus("evaluation")[:5000]
    windows = token_windows(byte_tokenizer, [text], num_samples=5, seq_len=64, seed=3)
    assert windows.shape == (5, 64) and windows.dtype == torch.int64
    assert windows.is_contiguous()
    assert (windows[:, 0] == BOS_ID).all()
    assert (windows[:, 1:] >= BYTE_OFFSET).all()  # no special tokens inside the text
    offsets = window_offsets(byte_ids(text), windows[:, 1:], width=63)
    assert offsets == sorted(offsets) and len(set(offsets)) == 5  # text order, no repeats


def test_windows_without_bos_token(word_tokenizer: PreTrainedTokenizerFast) -> None:
    assert word_tokenizer.bos_token_id is None
    chooser = random.Random(5)
    text = " ".join(chooser.choice(WORDS) for _ in range(600))
    windows = token_windows(word_tokenizer, [text], num_samples=3, seq_len=16)
    assert windows.shape == (3, 16) and windows.dtype == torch.int64
    ids = word_tokenizer(text, add_special_tokens=False)["input_ids"]
    window_offsets(ids, windows, width=16)


def test_add_bos_false_keeps_only_text(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    text = "abcdefgh" * 4
    windows = token_windows(byte_tokenizer, [text], num_samples=4, seq_len=8, add_bos=False)
    assert windows.tolist() == [byte_ids("abcdefgh")] * 4


def test_windows_are_deterministic_and_depend_on_seed(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    text = "".join(f"line {number:04d}\n" for number in range(400))  # every window is distinct
    selections = {
        seed: token_windows(byte_tokenizer, [text], num_samples=3, seq_len=20, seed=seed) for seed in range(5)
    }
    assert torch.equal(selections[0], token_windows(byte_tokenizer, [text], num_samples=3, seq_len=20, seed=0))
    assert len({digest(windows) for windows in selections.values()}) > 1


def test_exact_fit_returns_every_window_in_order(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    text = "0123456789" * 3  # 30 bytes: exactly three windows of 9 text tokens, three bytes left over
    windows = token_windows(byte_tokenizer, [text], num_samples=3, seq_len=10, seed=7)
    ids = byte_ids(text)
    assert windows[:, 1:].tolist() == [ids[0:9], ids[9:18], ids[18:27]]


def test_documents_are_joined_with_a_blank_line(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    joined = "first doc\n\nsecond"
    windows = token_windows(byte_tokenizer, ["first doc", "", "  ", "second"], num_samples=1, seq_len=len(joined) + 1)
    assert windows[0, 1:].tolist() == byte_ids(joined)


def test_a_single_string_is_one_document(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    as_string = token_windows(byte_tokenizer, "hello world", num_samples=1, seq_len=12)
    assert torch.equal(as_string, token_windows(byte_tokenizer, ["hello world"], num_samples=1, seq_len=12))


def test_long_text_tokenizes_as_a_whole(word_tokenizer: PreTrainedTokenizerFast) -> None:
    """Text far longer than one tokenization piece gives exactly the ids of the whole text."""
    lines = [" ".join(WORDS[(number * 7) % len(WORDS) :] + WORDS[: (number * 7) % len(WORDS)]) for number in range(600)]
    text = "\n".join(lines) + "\n\n" + " ".join(WORDS * 400)  # newline cuts, then one very long line
    assert len(text) > 5 * data._CHUNK_CHARS
    ids = word_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    width = 50
    available = len(ids) // width
    windows = token_windows(word_tokenizer, [text], num_samples=available, seq_len=width)
    assert windows.flatten().tolist() == ids[: available * width]


def test_chunks_cover_the_text_and_cut_at_line_breaks_then_spaces() -> None:
    text = "para one.\n\npara two is longer.\nline\n" + "word " * 20 + "x" * 30
    pieces = data._chunks(text, size=24)
    assert "".join(pieces) == text
    assert all(len(piece) <= 24 for piece in pieces)
    assert pieces[0] == "para one.\n\n"  # after the whole run of line breaks
    assert any(piece.startswith(" word") for piece in pieces)  # a long line is cut before a space
    assert pieces == data._chunks(text, size=24)
    assert data._chunks("short", size=24) == ["short"]


def test_too_little_text_says_what_is_available(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError) as error:
        token_windows(byte_tokenizer, ["x" * 100], num_samples=4, seq_len=33)  # 100 // 32 = 3 windows
    message = one_line(error)
    assert "100 tokens" in message and "3 window(s) of 33 tokens" in message and "4 were asked" in message
    assert "--seq-len" in message and "--samples" in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_samples": 0, "seq_len": 8}, "--samples"),
        ({"num_samples": -2, "seq_len": 8}, "--samples"),
        ({"num_samples": 1, "seq_len": 0}, "--seq-len"),
        ({"num_samples": 1, "seq_len": 1}, "BOS"),
    ],
)
def test_invalid_sizes_are_rejected(
    byte_tokenizer: PreTrainedTokenizerFast, kwargs: dict[str, Any], expected: str
) -> None:
    with pytest.raises(DataError, match=expected):
        token_windows(byte_tokenizer, ["plenty of text here"], **kwargs)


def test_one_token_windows_work_without_bos(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    windows = token_windows(byte_tokenizer, ["abc"], num_samples=3, seq_len=1, add_bos=False)
    assert windows.tolist() == [[ids] for ids in byte_ids("abc")]


def test_no_text_at_all_is_rejected(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match="empty"):
        token_windows(byte_tokenizer, ["", "  \n"], num_samples=1, seq_len=4)


# --------------------------------------------------------------------------- readers


def test_read_text_file_normalises_newlines_and_drops_bom(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffline one\r\nline two\rline three\n".encode())
    assert read_text_file(path) == "line one\nline two\nline three\n"
    assert read_text_file(str(path)) == read_text_file(path)


def test_read_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as error:
        read_text_file(tmp_path / "missing.txt")
    assert "missing.txt" in one_line(error)
    with pytest.raises(DataError, match="is a directory"):
        read_text_file(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_text_file(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n\t\n")
    with pytest.raises(DataError, match="is empty"):
        read_text_file(blank)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\nsecond line, caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 .*line 2.*convert it to UTF-8") as error:
        read_text_file(latin)
    one_line(error)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_reads_one_document_per_record(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [json.dumps({"text": "first", "id": 1}), "", "   ", json.dumps({"text": "second\nline"}), '{"text": ""}'],
    )
    assert read_jsonl(path, "text") == ["first", "second\nline", ""]
    other = write_jsonl(tmp_path / "other.jsonl", [json.dumps({"body": "x"}), json.dumps({"body": "y"})])
    assert read_jsonl(other, field="body") == ["x", "y"]


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (['{"text": "ok"}', "", '{"text": "broken"', '{"text": "fine"}'], r"line 3: invalid JSON"),
        (['{"text": "ok"}', '["a", "list"]'], r"line 2: expected a JSON object, got list"),
        (['{"text": "ok"}', '{"text": "ok"}', '{"body": "no text"}'], r"line 3: no field 'text' \(fields: 'body'\)"),
        (['{"text": 42}'], r"line 1: field 'text' is int, not a string"),
        (['{"text": null}'], r"line 1: field 'text' is NoneType, not a string"),
        (["", '{"text": ""}'], r"has no text in field 'text'"),
    ],
)
def test_read_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], pattern: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=pattern) as error:
        read_jsonl(path, "text")
    assert "bad.jsonl" in one_line(error)


def test_read_jsonl_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl", "text")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no text"):
        read_jsonl(empty, "text")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(binary, "text")


# --------------------------------------------------------------------------- what a path really is
def test_a_directory_is_named_a_directory_not_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory") as error:
        read_jsonl(tmp_path, "text")
    assert "not found" not in one_line(error)


def test_a_symlink_loop_is_named_a_loop_not_missing(tmp_path: Path) -> None:
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match="symbolic link loop") as error:
        read_text_file(loop)
    assert "not found" not in one_line(error) and "loop.txt" in one_line(error)


def test_a_dangling_symlink_names_its_missing_target(tmp_path: Path) -> None:
    link = tmp_path / "corpus.txt"
    link.symlink_to(tmp_path / "moved-away.txt")
    with pytest.raises(DataError, match=r"broken symbolic link .*moved-away\.txt"):
        read_text_file(link)


def test_an_unreadable_file_is_named_unreadable_not_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("some text", encoding="utf-8")
    real_open = os.open

    def refuse(target: Any, flags: int, *args: Any) -> int:
        if Path(target) == path:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(DataError, match=r"cannot read text file .*secret\.txt: permission denied") as error:
        read_text_file(path)
    assert "not found" not in one_line(error)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_by_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("some text", encoding="utf-8")
    path.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        read_text_file(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    with pytest.raises(DataError, match="not a regular file"):
        read_text_file(pipe)


def test_require_file_names_the_role_and_returns_the_path(tmp_path: Path) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text("x: 1\n", encoding="utf-8")
    assert data.require_file(str(path), "config file") == path
    with pytest.raises(DataError, match=r"^config file not found: .*absent\.yaml"):
        data.require_file(tmp_path / "absent.yaml", "config file")
    with pytest.raises(DataError, match=r"not found \(a part of the path is a file"):
        data.require_file(path / "inner.yaml", "config file")
    assert data.file_problem(path) is None and data.file_problem(tmp_path) == "is a directory"


def test_read_text_file_names_the_role_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "kv.yaml"
    path.write_bytes("qconfig: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"^config file .*kv\.yaml is not UTF-8 text"):
        read_text_file(path, what="config file")


# --------------------------------------------------------------------------- WikiText-2 via datasets


def test_wikitext2_without_datasets_suggests_offline_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as error:
        load_wikitext2("validation")
    message = one_line(error)
    assert "'datasets'" in message and "not installed" in message
    assert "--text-file" in message and "built-in corpus" in message
    assert isinstance(error.value.__cause__, ImportError)


def test_wikitext2_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'wikitext'\non the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(DataError, match=r"could not load WikiText-2 \(test\).*Couldn't reach") as error:
        load_wikitext2("test")
    assert "--text-file" in one_line(error)


def test_wikitext2_joins_the_text_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> dict[str, list[str]]:
        calls.append((*args, kwargs))
        return {"text": ["", " = Title = \n", "", " Some text .\n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_wikitext2("validation") == " = Title = \n Some text .\n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", {"split": "validation"})]


def test_wikitext2_rejects_unknown_split() -> None:
    with pytest.raises(DataError, match="validation or test"):
        load_wikitext2("train")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- TextSource


def test_text_source_builtin_and_describe() -> None:
    for split in ("calibration", "evaluation"):
        source = TextSource(kind="builtin", split=split)
        assert source.load() == [builtin_corpus(split)]
        assert source.describe() == f"built-in corpus, {split} split"
    assert TextSource() == TextSource(kind="builtin", split="calibration")


def test_text_source_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("some notes\n")
    source = TextSource(kind="text_file", path=str(text))  # type: ignore[arg-type]
    assert source.path == text and source == TextSource(kind="text_file", path=text)
    assert source.load() == ["some notes\n"]
    assert source.describe() == f"text file {text}"

    records = write_jsonl(tmp_path / "r.jsonl", [json.dumps({"text": "a"}), json.dumps({"text": "b"})])
    jsonl = TextSource(kind="jsonl", path=records)
    assert jsonl.load() == ["a", "b"]
    assert jsonl.describe() == f"JSON Lines file {records}, field 'text'"
    bodies = write_jsonl(tmp_path / "b.jsonl", [json.dumps({"body": "c"})])
    assert TextSource(kind="jsonl", path=bodies, field="body").load() == ["c"]
    with pytest.raises(DataError, match="not found"):
        TextSource(kind="text_file", path=tmp_path / "gone.txt").load()


def test_text_source_wikitext2_maps_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def fake_load(split: str) -> str:
        asked.append(split)
        return f"{split} text"

    monkeypatch.setattr(data, "load_wikitext2", fake_load)
    assert TextSource(kind="wikitext2", split="calibration").load() == ["validation text"]
    assert TextSource(kind="wikitext2", split="evaluation").load() == ["test text"]
    assert asked == ["validation", "test"]
    assert TextSource(kind="wikitext2", split="evaluation").describe() == "WikiText-2, test split"


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"kind": "csv"}, "unknown text source kind 'csv'"),
        ({"kind": "text_file"}, "needs a path"),
        ({"kind": "jsonl", "path": ""}, "needs a path"),
        ({"kind": "builtin", "path": Path("x.txt")}, "takes no path"),
        ({"kind": "text_file", "path": Path("x.txt"), "field": "text"}, "only applies to JSON Lines"),
        ({"kind": "builtin", "split": "train"}, "unknown split 'train'"),
    ],
)
def test_text_source_validates_its_fields(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        TextSource(**kwargs)


def test_text_source_is_frozen() -> None:
    source = TextSource()
    with pytest.raises(AttributeError):
        source.kind = "jsonl"  # type: ignore[misc]


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- local WikiText-2


@pytest.mark.skipif(not (WIKITEXT / "valid.txt").is_file(), reason="no local WikiText-2 copy in shared/data")
def test_local_wikitext_windows_load_fast(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    start = time.perf_counter()
    documents = TextSource(kind="text_file", path=WIKITEXT / "valid.txt").load()
    windows = token_windows(byte_tokenizer, documents, num_samples=16, seq_len=2048, seed=0)
    elapsed = time.perf_counter() - start
    assert len(documents) == 1 and len(documents[0]) > 1_000_000
    assert windows.shape == (16, 2048) and (windows[:, 0] == BOS_ID).all()
    assert elapsed < 30, f"tokenizing WikiText-2 validation took {elapsed:.1f} s"
