"""The steps commands share before their real work: the state, the model, the text, the windows.

Each step fails as early and as cheaply as it can (a bad ``--scales`` or ``--model`` is
refused before any weights load) and imports the heavy libraries only when it runs.
The model loader is the one function :func:`load_model_and_tokenizer`, so tests can
replace it with a tiny offline model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import InputError, QuantStateError

from ._common import note, state_path

if TYPE_CHECKING:
    import torch

    from quantcache.cache.cache import QuantizedCalibratingCache
    from quantcache.models.data import Split, TextSource


def read_frozen_state(value: str | Path) -> Path:
    """The path of a readable, frozen state for ``--scales``; checked before any model loads.

    A state saved before ``freeze()`` holds statistics, not INT8 parameters: measuring it
    would mean freezing it here, silently, with whatever its statistics imply (an
    inconsistent min/max would give eps scales). It is refused with the way out instead.
    """
    from quantcache.models.data import require_file
    from quantcache.state.file import read_state_file

    path = require_file(state_path(value), "state file")
    stored = read_state_file(path)
    if stored.mode != "frozen":
        raise QuantStateError(
            f"{path} holds calibration statistics saved before freeze() (mode {stored.mode!r}), not INT8 "
            "parameters; freeze it first (KVQuantizer.load(path, model).freeze().save(path)) "
            "or rerun quantcache calibrate, which saves frozen states"
        )
    return path


def add_scales_option(parser: argparse.ArgumentParser) -> None:
    """``--scales`` (a frozen state) and ``--allow-other-model`` (load it for a model it was not made for)."""
    parser.add_argument(
        "--scales", required=True, type=Path, metavar="OUT", help="a state file saved by calibrate, or its directory"
    )
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use the state although it was calibrated for a model whose keys and values differ from this one's "
        "(RoPE, heads, windows, norms); without it that is refused",
    )


def frozen_cache(model: Any, path: Path, *, allow_other_model: bool = False) -> QuantizedCalibratingCache:
    """The frozen cache stored at ``path`` (checked by :func:`read_frozen_state`) for ``model``."""
    from quantcache.cache.cache import QuantizedCalibratingCache

    cache = QuantizedCalibratingCache.from_file(path, model, allow_other_model=allow_other_model)
    if not cache.is_frozen:  # the file changed since it was checked
        raise QuantStateError(f"{path} is no longer a frozen state; rerun the command")
    return cache


def _resolve_device(args: argparse.Namespace) -> str:
    import torch

    requested: str | None = args.device
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    parsed = torch.device(requested)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {requested}: CUDA is not available to this torch ({torch.__version__}); use --device cpu"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    return requested


def check_model_options(args: argparse.Namespace) -> None:
    """Fail in milliseconds, before any data or weights load, on a --model or --device that cannot work."""
    from quantcache.errors import ModelFetchError
    from quantcache.models.loading import resolve_model_source

    try:
        resolve_model_source(args.model)
    except ModelFetchError as error:  # the text names nothing loadable: an input error, not a fetch failure
        raise InputError(str(error)) from error
    args.device = _resolve_device(args)


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``args``: the one place the commands touch model loading."""
    import torch

    from quantcache.models.loading import load_model

    return load_model(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        verbose=bool(args.verbose),
    )


@contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own bars (GGUF dequantisation, weight loading) unless ``enabled``, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, float]:
    """Load the model (with a note) and check ``--seq-len`` against it; returns the load time too."""
    from quantcache.progress import stream_is_terminal

    note(args, f"loading model {args.model} ({args.dtype}, {args.device}) ...")
    start = time.perf_counter()
    # transformers' own bars redraw with carriage returns: in a log they would be hundreds of updates
    with _transformers_progress_bars(not args.quiet and stream_is_terminal(sys.stderr)):
        model, tokenizer = load_model_and_tokenizer(args)
    seconds = time.perf_counter() - start
    _check_seq_len(args, model)
    return model, tokenizer, seconds


def _check_seq_len(args: argparse.Namespace, model: Any) -> None:
    """Refuse windows longer than the model's position table before running them (the model
    would index past its rotary or learned positions and give garbage or fail deep inside)."""
    from quantcache.cache.model_facts import max_positions

    limit = max_positions(model)
    if limit is not None and args.seq_len > limit:
        raise InputError(
            f"--seq-len {args.seq_len} is longer than {args.model} can take ({limit} positions, "
            f"config.max_position_embeddings); pass --seq-len {limit} or less"
        )


def text_source(args: argparse.Namespace, *, calibration: bool) -> TextSource:
    """The text source the data options name (the built-in corpus when none is given)."""
    from quantcache.models.data import TextSource

    split: Split = "calibration" if calibration else "evaluation"
    if args.text_file is not None:
        return TextSource(kind="text_file", path=args.text_file)
    if args.jsonl is not None:
        return TextSource(kind="jsonl", path=args.jsonl, field=args.jsonl_field)
    if args.dataset == "wikitext2":
        return TextSource(kind="wikitext2", split=split)
    return TextSource(kind="builtin", split=split)


def token_windows(args: argparse.Namespace, tokenizer: Any, documents: list[str]) -> torch.Tensor:
    """``--samples`` windows of ``--seq-len`` tokens drawn with ``--seed``."""
    from quantcache.models.data import token_windows as make_windows

    return make_windows(tokenizer, documents, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed)
