"""The ``quantcache`` command: calibrate, evaluate, inspect and tune KV-cache quantization.

A thin layer over the library: every subcommand parses its options, calls
:func:`quantcache.models.load_model`, :mod:`quantcache.data`,
:func:`quantcache.calibration.calibrate`, :mod:`quantcache.evaluation` and
:mod:`quantcache.report`, and writes what they return. What it adds is the contract
a script can rely on: one-line errors on stderr prefixed ``quantcache: error:`` and
documented exit codes (see ``quantcache --help``).

The model loader is the single function :func:`_load_model`, so tests can replace it
with a tiny offline model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import torch
import transformers

from . import __version__
from .cache import QuantizedCalibratingCache
from .calibration import calibrate
from .config import ConfigError, KVQuantConfig, QuantDtype, QuantMethod, QuantScope
from .data import DEFAULT_JSONL_FIELD, DataError, Split, TextSource, token_windows
from .evaluation import evaluate, suggest_exclude
from .models import DEFAULT_MODEL, KNOWN_MODELS, ModelFetchError, load_model, resolve_model_source
from .observer import CalibrationError
from .report import format_suggestion, format_table, plot_layers, suggestion_to_yaml, to_json, to_markdown
from .serialization import FORMAT_NAME, FORMAT_VERSION, QuantStateError, StateFile, read_state_file

__all__ = [
    "EXIT_FETCH",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UserInputError",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FETCH = 4
EXIT_INTERRUPTED = 130

PROG = "quantcache"
STATE_FILE_NAME = "kv_scales.safetensors"
_MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_KEY = re.compile(r"^layers\.(\d+)\.(key|value)\.(min|max|scale|zero_point)$")
_STREAMS = ("key", "value")

_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_INTERNAL}    unexpected internal error (a bug): rerun with -v and report the traceback
  {EXIT_USAGE}    usage error: unknown option, missing or malformed argument
  {EXIT_INPUT}    input error: missing or unreadable file, invalid config or state file,
       state made for another model, unusable data, a --model that names no known
       model, file or directory, unavailable device, missing optional dependency
  {EXIT_FETCH}    the model could not be fetched or loaded (network or package index
       unreachable, download failed verification, weights unreadable)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

Errors are one line on stderr starting with "{PROG}: error:"; -v adds the traceback."""
_SHORT_EXIT_CODES = (
    f"exit codes: {EXIT_OK} ok, {EXIT_INTERNAL} internal error, {EXIT_USAGE} usage error, {EXIT_INPUT} input error, "
    f"{EXIT_FETCH} model fetch error\n(details: {PROG} --help)"
)


class UserInputError(Exception):
    """A mistake in what the user gave (file, option combination); exit code 3, no traceback."""


# ---------------------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _model_dtype(text: str) -> str:
    value = text.lower()
    if value in _MODEL_DTYPES:
        return value
    if value in {member.value for member in QuantDtype}:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a quantized cache format; --dtype is the model's dtype "
            f"({', '.join(_MODEL_DTYPES)}): use --kv-dtype {value}"
        )
    raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(_MODEL_DTYPES)})")


def _device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (examples: cpu, cuda, cuda:1, mps)") from None
    return text


# ---------------------------------------------------------------------------- the parser
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _add_verbosity(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    # Accepted before and after the subcommand; the subcommand's copy must not reset the top-level one.
    default: Any = False if top_level else argparse.SUPPRESS
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or notes")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="print full tracebacks on errors")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="M",
        default=DEFAULT_MODEL,
        help=(
            f"a known name ({', '.join(KNOWN_MODELS)}), a Hugging Face Hub id, "
            f"a local model directory or a .gguf file (default: {DEFAULT_MODEL})"
        ),
    )
    group.add_argument(
        "--device",
        type=_device,
        default=None,
        help="torch device to run on: cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)",
    )
    group.add_argument(
        "--dtype",
        type=_model_dtype,
        default="float32",
        metavar="{" + ",".join(_MODEL_DTYPES) + "}",
        help="dtype of the model's weights and activations (default: float32)",
    )
    group.add_argument("--cache-dir", type=Path, metavar="DIR", default=None, help="where fetched models are kept")


def _add_data_options(
    parser: argparse.ArgumentParser,
    *,
    samples: int,
    seq_len: int,
    default_source: str,
    evaluation: bool,
) -> None:
    group = parser.add_argument_group(
        "data",
        f"Text to run through the model (default: {default_source}).\n"
        "It is tokenized and cut into --samples random windows of --seq-len tokens.",
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument("--text-file", type=Path, metavar="PATH", help="a UTF-8 text file")
    source.add_argument(
        "--jsonl", type=Path, metavar="PATH", help="a JSON Lines file, one document per line (see --jsonl-field)"
    )
    source.add_argument(
        "--dataset",
        choices=["wikitext2"],
        help=(
            "a known dataset: wikitext2 (raw, from the Hugging Face hub through the optional 'datasets' "
            "package; validation split for calibrate, test split otherwise)"
        ),
    )
    group.add_argument(
        "--jsonl-field",
        "--field",
        dest="jsonl_field",
        metavar="FIELD",
        default=None,
        help=f"the string field of each --jsonl record that holds the text (default: {DEFAULT_JSONL_FIELD})",
    )
    group.add_argument(
        "--samples", type=_positive_int, default=samples, metavar="N", help=f"number of windows (default: {samples})"
    )
    names = ["--seq-len", "--context"] if evaluation else ["--seq-len"]
    group.add_argument(
        *names,
        dest="seq_len",
        type=_positive_int,
        default=seq_len,
        metavar="L",
        help=f"tokens per window{' (--context is an alias)' if evaluation else ''} (default: {seq_len})",
    )
    group.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the window sampling (default: 0)")
    if evaluation:
        group.add_argument(
            "--prefill",
            type=_positive_int,
            default=256,
            metavar="P",
            help="tokens of each window prefilled at once before decoding (default: 256)",
        )
        group.add_argument(
            "--chunk",
            type=_positive_int,
            default=32,
            metavar="C",
            help="tokens per decoding step after the prefill (default: 32)",
        )


def _subparser(subparsers: Any, name: str, *, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"Examples:\n{examples}\n\n{_SHORT_EXIT_CODES}",
        formatter_class=_HelpFormatter,
    )
    _add_verbosity(parser, top_level=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``quantcache`` argument parser (subcommands calibrate, evaluate, inspect, suggest-exclude)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Calibrated INT8 quantization of the attention KV cache of Hugging Face Transformers models.\n\n"
            "Typical flow: calibrate scales on some text, check the quality cost with evaluate,\n"
            "look at the saved scales with inspect, and let suggest-exclude pick layers to keep\n"
            "in full precision when the cost is too high."
        ),
        epilog=(
            "Examples:\n"
            "  quantcache calibrate -o runs/smollm2                   # SmolLM2-135M, built-in text\n"
            "  quantcache evaluate --scales runs/smollm2 --json runs/smollm2/eval.json\n"
            "  quantcache inspect runs/smollm2/kv_scales.safetensors\n"
            "  quantcache suggest-exclude --scales runs/smollm2 --kl-budget 1e-3 -o kv.yaml\n"
            "  quantcache calibrate --config kv.yaml -o runs/smollm2  # msModelSlim YAML\n"
            "  quantcache COMMAND --help                              # options of one command\n\n"
            f"{_EXIT_CODES}"
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {__version__} (torch {torch.__version__}, transformers {transformers.__version__})",
    )
    _add_verbosity(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True

    # -------------------------------------------------------------- calibrate
    calibrate = _subparser(
        subparsers,
        "calibrate",
        help="collect KV ranges on calibration text and save the INT8 scales",
        description=(
            "Run calibration text through the model with a calibrating KV cache, freeze the\n"
            "per-channel INT8 parameters and save them to a safetensors file, with a JSON and a\n"
            "Markdown summary (same name, .json/.md) beside it.\n\n"
            "The scheme comes from --config (msModelSlim YAML: a dynamic_cache processor item, a\n"
            "list holding one, or a full document with spec.process) or the defaults (symmetric int8\n"
            "per_channel minmax, all layers). Options given explicitly override the YAML's keys:\n"
            "--symmetric/--asymmetric, --kv-dtype, --scope, --method set qconfig; --include and\n"
            "--exclude replace the YAML's lists (a bare --exclude clears it)."
        ),
        examples=(
            "  quantcache calibrate -o runs/smollm2                       # writes runs/smollm2/kv_scales.*\n"
            "  quantcache calibrate --model gemma3-270m --asymmetric -o gemma.safetensors\n"
            "  quantcache calibrate --config kv.yaml --exclude 'model.layers.{0,1}.self_attn' -o runs/x\n"
            "  quantcache calibrate --text-file corpus.txt --samples 16 --seq-len 1024 -o runs/x\n"
            "  quantcache calibrate --jsonl chats.jsonl --jsonl-field content -o runs/x\n"
            "  quantcache calibrate --model ./model.gguf --device cuda --dtype bfloat16 -o runs/x"
        ),
    )
    calibrate.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help=f"a .safetensors file, or a directory (then OUT/{STATE_FILE_NAME})",
    )
    _add_model_options(calibrate)
    quant = calibrate.add_argument_group("quantization (explicit options override --config)")
    quant.add_argument("--config", type=Path, metavar="YAML", help="msModelSlim YAML with a dynamic_cache item")
    sym = quant.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="zero point 0 (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="per-channel [min, max] range")
    quant.add_argument(
        "--kv-dtype", choices=[m.value for m in QuantDtype], default=None, help="quantized format (default: int8)"
    )
    quant.add_argument(
        "--scope", choices=[m.value for m in QuantScope], default=None, help="granularity (default: per_channel)"
    )
    quant.add_argument(
        "--method", choices=[m.value for m in QuantMethod], default=None, help="range statistic (default: minmax)"
    )
    quant.add_argument(
        "--include",
        nargs="+",
        action="extend",
        metavar="PAT",
        default=None,
        help="attention modules to quantize, glob patterns with {a,b} (default: '*')",
    )
    quant.add_argument(
        "--exclude",
        nargs="*",
        action="extend",
        metavar="PAT",
        default=None,
        help="attention modules to keep in full precision; exclude wins over include",
    )
    quant.add_argument(
        "--batch-size", type=_positive_int, default=1, metavar="B", help="windows per forward pass (default: 1)"
    )
    _add_data_options(
        calibrate, samples=8, seq_len=512, default_source="the built-in corpus, calibration split", evaluation=False
    )
    calibrate.set_defaults(handler=_cmd_calibrate, parser=calibrate)

    # -------------------------------------------------------------- evaluate
    evaluate = _subparser(
        subparsers,
        "evaluate",
        help="measure the quality cost of saved scales (perplexity, KL, top-1)",
        description=(
            "Load saved scales for the model and compare the quantized KV cache with the\n"
            "unquantized one the way a cache is used in generation: prefill, then decode in\n"
            "chunks. Prints perplexity, mean KL divergence, top-1 agreement and per-layer\n"
            "quantization error (SQNR, clipping)."
        ),
        examples=(
            "  quantcache evaluate --scales runs/smollm2\n"
            "  quantcache evaluate --scales runs/smollm2 --context 2048 --samples 4 --json eval.json\n"
            "  quantcache evaluate --scales kv.safetensors --dataset wikitext2 --markdown eval.md --plot layers.png\n"
            "  quantcache evaluate --scales kv.safetensors --json - | jq .kl_mean   # table goes to stderr"
        ),
    )
    evaluate.add_argument(
        "--scales", required=True, type=Path, metavar="OUT", help="a state file saved by calibrate, or its directory"
    )
    _add_model_options(evaluate)
    _add_data_options(
        evaluate, samples=6, seq_len=1024, default_source="the built-in corpus, evaluation split", evaluation=True
    )
    outputs = evaluate.add_argument_group("outputs")
    outputs.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': stdout, table to stderr)")
    outputs.add_argument("--markdown", metavar="PATH", help="write the result as Markdown ('-': stdout)")
    outputs.add_argument("--plot", type=Path, metavar="FILE.png", help="plot per-layer errors (needs matplotlib)")
    evaluate.set_defaults(handler=_cmd_evaluate, parser=evaluate)

    # -------------------------------------------------------------- inspect
    inspect = _subparser(
        subparsers,
        "inspect",
        help="show and validate what a saved state file holds",
        description=(
            "Validate a saved state (metadata, tensor names, shapes, finite values, min <= max,\n"
            "positive scales) and print what it holds: format and quantcache version, model type\n"
            "and shape, config, mode, per-layer key/value ranges and outlier channels (channels\n"
            "whose range is more than --outlier-factor times the layer's median channel range).\n"
            f"An invalid file exits with code {EXIT_INPUT}. No model is loaded."
        ),
        examples=(
            "  quantcache inspect runs/smollm2/kv_scales.safetensors\n"
            "  quantcache inspect runs/smollm2 --top 5 --outlier-factor 8\n"
            "  quantcache inspect kv.safetensors --json > kv.json"
        ),
    )
    inspect.add_argument("scales", type=Path, metavar="OUT", help="a state file saved by calibrate, or its directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument(
        "--top", type=_non_negative_int, default=3, metavar="N", help="outlier channels listed per stream (default: 3)"
    )
    inspect.add_argument(
        "--outlier-factor",
        type=_positive_float,
        default=4.0,
        metavar="K",
        help="range > K x the layer's median channel range makes an outlier (default: 4)",
    )
    inspect.set_defaults(handler=_cmd_inspect, parser=inspect)

    # -------------------------------------------------------------- suggest-exclude
    suggest = _subparser(
        subparsers,
        "suggest-exclude",
        help="rank layers by sensitivity and propose an exclude list for a KL budget",
        description=(
            "Measure how much each quantized layer alone adds to the KL divergence from the\n"
            "unquantized model, then exclude layers greedily, most sensitive first, re-measuring\n"
            "after each, until the mean KL is within --kl-budget. Prints the ranking\n"
            "and, with -o, writes an msModelSlim YAML that calibrate --config accepts: the saved\n"
            "config with the suggested layers added to its exclude list.\n\n"
            "It runs the evaluation once per quantized layer and again for each exclusion step,\n"
            "so its default windows are smaller than evaluate's (2 x 512 tokens)."
        ),
        examples=(
            "  quantcache suggest-exclude --scales runs/smollm2 --kl-budget 1e-3\n"
            "  quantcache suggest-exclude --scales runs/smollm2 --kl-budget 5e-4 -o kv.yaml\n"
            "  quantcache calibrate --config kv.yaml -o runs/smollm2-excl   # use the suggestion"
        ),
    )
    suggest.add_argument(
        "--scales", required=True, type=Path, metavar="OUT", help="a state file saved by calibrate, or its directory"
    )
    suggest.add_argument(
        "--kl-budget", required=True, type=_positive_float, metavar="X", help="largest acceptable mean KL divergence"
    )
    suggest.add_argument("-o", "--output", type=Path, metavar="YAML", help="write the suggested config here")
    _add_model_options(suggest)
    # One pass per quantized layer (and more for the greedy search): smaller defaults than evaluate.
    _add_data_options(
        suggest, samples=2, seq_len=512, default_source="the built-in corpus, evaluation split", evaluation=True
    )
    suggest.set_defaults(handler=_cmd_suggest_exclude, parser=suggest)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot express; usage errors (exit 2)."""
    parser: argparse.ArgumentParser = args.parser
    if getattr(args, "jsonl_field", None) is not None and getattr(args, "jsonl", None) is None:
        parser.error("--jsonl-field needs --jsonl PATH")
    prefill = getattr(args, "prefill", None)
    if prefill is not None and prefill >= args.seq_len:
        parser.error(f"--prefill ({prefill}) must be smaller than --seq-len/--context ({args.seq_len})")


# ---------------------------------------------------------------------------- running
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``quantcache`` command line; returns the exit code (see ``quantcache --help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(args)
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (EXIT_OK if stop.code is None else EXIT_USAGE)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with _one_line_warnings():
            return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (``quantcache inspect x | head``): not an error
        _silence_stdout()
        return EXIT_OK
    except Exception as error:
        return _report_error(error, verbose=bool(args.verbose))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass


def _report_error(error: BaseException, *, verbose: bool) -> int:
    code = _exit_code(error)
    message = _one_line(_describe(error))
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    elif code == EXIT_INTERNAL:
        message += " (this is a bug; rerun with -v for the full traceback)"
    sys.stderr.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    UserInputError,
    ConfigError,
    QuantStateError,
    CalibrationError,
    DataError,
    OSError,
    ModuleNotFoundError,  # an optional dependency (matplotlib, gguf, datasets) that is not installed
    torch.cuda.OutOfMemoryError,
)


def _exit_code(error: BaseException) -> int:
    if isinstance(error, ModelFetchError):
        return EXIT_FETCH
    if isinstance(error, _INPUT_ERRORS):
        return EXIT_INPUT
    return EXIT_INTERNAL


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of GPU memory; try fewer --samples, a shorter --seq-len or --dtype bfloat16"
    if isinstance(error, ModuleNotFoundError) and error.name:
        extra = {"matplotlib": "plot", "gguf": "gguf", "datasets": "datasets"}.get(error.name.split(".")[0])
        hint = f": pip install 'quantcache[{extra}]'" if extra else ""
        return f"missing optional dependency {error.name!r}{hint}"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = str(error)
    if _exit_code(error) == EXIT_INTERNAL:
        return f"internal error: {type(error).__name__}: {text}" if text else f"internal error: {type(error).__name__}"
    return text or type(error).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show Python warnings (an include pattern that matches nothing ...) as one line each."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"{PROG}: warning: {_one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _note(args: argparse.Namespace, message: str) -> None:
    """Progress notes on stderr (not with --quiet); results go to stdout."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- shared steps
def _resolve_device(args: argparse.Namespace) -> str:
    device: str | None = args.device
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    parsed = torch.device(device)
    kind = parsed.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            f"--device {device}: CUDA is not available to this torch ({torch.__version__}); use --device cpu"
        )
    if kind == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return device


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``args``: the one place the CLI touches model loading."""
    model, tokenizer = load_model(
        args.model,
        device=args.device,
        dtype=_MODEL_DTYPES[args.dtype],
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    return model, tokenizer


def _check_model_options(args: argparse.Namespace) -> None:
    """Fail in milliseconds, before any data or weights load, on a --model or --device that cannot work."""
    try:
        resolve_model_source(args.model)
    except ModelFetchError as error:  # the text names nothing loadable: an input error, not a fetch failure
        raise UserInputError(str(error)) from error
    args.device = _resolve_device(args)


@contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own bars (GGUF dequantisation, weight loading) under --quiet, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, float]:
    _note(args, f"loading model {args.model} ({args.dtype}, {args.device}) ...")
    start = time.perf_counter()
    with _transformers_progress_bars(not args.quiet):
        model, tokenizer = _load_model(args)
    return model, tokenizer, time.perf_counter() - start


def _text_source(args: argparse.Namespace, *, calibration: bool) -> TextSource:
    split: Split = "calibration" if calibration else "evaluation"
    if args.text_file is not None:
        return TextSource(kind="text_file", path=args.text_file)
    if args.jsonl is not None:
        return TextSource(kind="jsonl", path=args.jsonl, field=args.jsonl_field)
    if args.dataset == "wikitext2":
        return TextSource(kind="wikitext2", split=split)
    return TextSource(kind="builtin", split=split)


def _windows(args: argparse.Namespace, tokenizer: Any, documents: list[str]) -> torch.Tensor:
    windows: torch.Tensor = token_windows(
        tokenizer, documents, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed
    )
    return windows


def _state_path(value: str | Path) -> Path:
    """A state file path; a directory (existing, suffix-less or ending in a slash) means DIR/kv_scales.safetensors."""
    text = str(value)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix:
        return path / STATE_FILE_NAME
    return path


def _output_state_path(value: str) -> Path:
    path = _state_path(value)
    if path.suffix != ".safetensors":
        raise UserInputError(
            f"-o {value}: the state is a .safetensors file; give a name ending in .safetensors or a directory"
        )
    return path


def _check_writable(value: str | Path | None, option: str) -> None:
    """Fail before the slow work when an output path cannot be a file."""
    if value is None or str(value) == "-":
        return
    path = Path(value)
    if path.is_dir():
        raise UserInputError(f"{option} {value}: is a directory; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserInputError(f"{option} {value}: {parent} is not a directory")
            break


def _write_text(destination: str | Path, text: str, args: argparse.Namespace) -> None:
    if not text.endswith("\n"):
        text += "\n"
    if str(destination) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(destination)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    _note(args, f"wrote {path}")


def _load_frozen_cache(model: Any, path: Path) -> QuantizedCalibratingCache:
    cache = QuantizedCalibratingCache.from_file(path, model)
    if not cache.is_frozen:  # a state saved before freeze(): its statistics still give parameters
        cache.freeze()
    return cache


# ---------------------------------------------------------------------------- range summaries
def _float(value: torch.Tensor | float) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _stream_summary(low: torch.Tensor, high: torch.Tensor, *, top: int, factor: float) -> dict[str, Any]:
    """Range of one key or value stream and its outlier channels (range > factor x median channel range)."""
    low, high = low.detach().float().cpu(), high.detach().float().cpu()
    ranges = high - low
    median = _float(ranges.flatten().median())
    outliers: list[dict[str, Any]] = []
    if median > 0:
        flat = ranges.flatten()
        order = torch.argsort(flat, descending=True)
        head_dim = ranges.shape[-1] if ranges.dim() == 2 else flat.numel()
        for position in order.tolist():
            value = _float(flat[position])
            if value <= factor * median or len(outliers) >= top:
                break
            outliers.append(
                {
                    "kv_head": position // head_dim,
                    "channel": position % head_dim,
                    "min": _float(low.flatten()[position]),
                    "max": _float(high.flatten()[position]),
                    "range": value,
                    "ratio": value / median,
                }
            )
    count = int((ranges > factor * median).sum().item()) if median > 0 else 0
    return {
        "min": _float(low.min()),
        "max": _float(high.max()),
        "absmax": max(abs(_float(low.min())), abs(_float(high.max()))),
        "median_channel_range": median,
        "max_channel_range": _float(ranges.max()),
        "outlier_channels": count,
        "outliers": outliers,
    }


def _layer_summaries(
    tensors: dict[str, torch.Tensor],
    layer_names: Sequence[str],
    config: KVQuantConfig,
    *,
    top: int = 3,
    factor: float = 4.0,
) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for index, name in enumerate(layer_names):
        entry: dict[str, Any] = {"index": index, "name": name, "quantized": config.is_quantized(name)}
        for stream in _STREAMS:
            low = tensors.get(f"layers.{index}.{stream}.min")
            high = tensors.get(f"layers.{index}.{stream}.max")
            entry[stream] = None if low is None or high is None else _stream_summary(low, high, top=top, factor=factor)
        layers.append(entry)
    return layers


def _config_text(config: KVQuantConfig) -> str:
    kind = "symmetric" if config.symmetric else "asymmetric"
    exclude = ", ".join(config.exclude) or "-"
    return (
        f"{config.dtype.value} {config.scope.value} {kind} {config.method.value}; "
        f"include {', '.join(config.include)}; exclude {exclude}"
    )


def _index_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    parts: list[str] = []
    start: int | None = None
    previous: int | None = None
    for index in [*sorted(indices), None]:
        if index is not None and previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None and previous is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ", ".join(parts) or "none"


def _range_rows(layers: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for layer in layers:
        row = [str(layer["index"]), layer["name"]]
        for stream in _STREAMS:
            summary = layer[stream]
            if summary is None:
                row += ["-", "-", "-"]
            else:
                row += [
                    f"{summary['min']:.4g}",
                    f"{summary['max']:.4g}",
                    f"{summary['max_channel_range'] / summary['median_channel_range']:.1f}x"
                    if summary["median_channel_range"] > 0
                    else "-",
                ]
        rows.append(row)
    return rows


_RANGE_HEADER = ["layer", "module", "key min", "key max", "key max/med", "value min", "value max", "value max/med"]


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(header[column]), *(len(row[column]) for row in rows)) for column in range(len(header))]
    right = [column not in (1,) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(cells, widths, right, strict=True)
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _outlier_lines(layers: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for layer in layers:
        for stream in _STREAMS:
            summary = layer[stream]
            if not summary or not summary["outliers"]:
                continue
            listed = ", ".join(
                f"head {item['kv_head']} ch {item['channel']} ({item['range']:.3g}, {item['ratio']:.1f}x)"
                for item in summary["outliers"]
            )
            more = summary["outlier_channels"] - len(summary["outliers"])
            lines.append(f"  layer {layer['index']:>3} {stream:<5}  {listed}{f' (+{more} more)' if more > 0 else ''}")
    return lines


# ---------------------------------------------------------------------------- calibrate
def _quant_config(args: argparse.Namespace) -> KVQuantConfig:
    config = KVQuantConfig.from_yaml(Path(args.config)) if args.config is not None else KVQuantConfig()
    overrides: dict[str, Any] = {}
    if args.symmetric is not None:
        overrides["symmetric"] = args.symmetric
    if args.kv_dtype is not None:
        overrides["dtype"] = args.kv_dtype
    if args.scope is not None:
        overrides["scope"] = args.scope
    if args.method is not None:
        overrides["method"] = args.method
    if args.include is not None:
        overrides["include"] = tuple(args.include)
    if args.exclude is not None:
        overrides["exclude"] = tuple(args.exclude)
    return replace(config, **overrides) if overrides else config


def _cmd_calibrate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output = _output_state_path(args.output)
    config = _quant_config(args)
    _check_model_options(args)
    source = _text_source(args, calibration=True)
    documents = source.load()
    model, tokenizer, load_seconds = _model_and_tokenizer(args)
    windows = _windows(args, tokenizer, documents)
    _note(args, f"calibrating on {windows.shape[0]} x {windows.shape[1]} tokens from {source.describe()} ...")
    calibration_start = time.perf_counter()
    cache = calibrate(
        model, windows, quant_config=config, batch_size=args.batch_size, freeze=True, progress=not args.quiet
    )
    calibration_seconds = time.perf_counter() - calibration_start
    saved = cache.save(output)
    summary = {
        "quantcache_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scales": saved.name,
        "model": args.model,
        "model_type": cache.model_type,
        "num_layers": len(cache.layer_names),
        "kv_heads": cache.kv_heads,
        "head_dim": cache.head_dim,
        "device": args.device,
        "dtype": args.dtype,
        "data": {
            "source": source.describe(),
            "samples": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "tokens": int(windows.numel()),
            "seed": args.seed,
            "batch_size": args.batch_size,
        },
        "config": cache.quant_config.to_dict(),
        "mode": cache.mode.value,
        "quantized_layers": cache.quantized_layers,
        "seconds": {
            "load_model": round(load_seconds, 3),
            "calibrate": round(calibration_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "layers": _layer_summaries(cache.state_dict(), cache.layer_names, cache.quant_config),
    }
    json_path, markdown_path = saved.with_suffix(".json"), saved.with_suffix(".md")
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(_calibration_markdown(summary), encoding="utf-8")
    print(
        f"calibrated {len(cache.quantized_layers)}/{len(cache.layer_names)} layers of {args.model} on "
        f"{summary['data']['samples']} x {summary['data']['seq_len']} tokens ({source.describe()}) "
        f"in {calibration_seconds:.1f} s"
    )
    for path in (saved, json_path, markdown_path):
        print(f"wrote {path}")
    return EXIT_OK


def _calibration_markdown(summary: dict[str, Any]) -> str:
    data, seconds = summary["data"], summary["seconds"]
    config = KVQuantConfig.from_dict(summary["config"])
    facts = [
        ["model", f"{summary['model']} ({summary['model_type']}), {summary['dtype']} on {summary['device']}"],
        ["shape", f"{summary['num_layers']} layers, {summary['kv_heads']} KV heads x {summary['head_dim']} channels"],
        ["data", str(data["source"])],
        ["windows", f"{data['samples']} x {data['seq_len']} tokens ({data['tokens']}), seed {data['seed']}"],
        ["config", _config_text(config)],
        [
            "quantized layers",
            f"{len(summary['quantized_layers'])}/{summary['num_layers']}: {_index_ranges(summary['quantized_layers'])}",
        ],
        ["time", f"{seconds['calibrate']:.1f} s calibration, {seconds['load_model']:.1f} s model load"],
        ["quantcache", f"{summary['quantcache_version']}, {summary['created']}"],
    ]
    lines = [
        f"# KV-cache calibration: {summary['scales']}",
        "",
        _markdown_table(["setting", "value"], facts),
        "",
        "## Per-layer ranges",
        "",
        "min/max over all channels; max/med: the widest channel range over the median channel range.",
        "",
        _markdown_table(_RANGE_HEADER, _range_rows(summary["layers"])),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    scales = _state_path(args.scales)
    read_state_file(scales)  # fail fast on a bad file, before the model loads
    for value, option in ((args.json, "--json"), (args.markdown, "--markdown"), (args.plot, "--plot")):
        _check_writable(value, option)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UserInputError("--plot needs matplotlib: pip install 'quantcache[plot]'")
    _check_model_options(args)
    source = _text_source(args, calibration=False)
    documents = source.load()
    model, tokenizer, _ = _model_and_tokenizer(args)
    cache = _load_frozen_cache(model, scales)
    windows = _windows(args, tokenizer, documents)
    _note(args, f"evaluating on {windows.shape[0]} x {windows.shape[1]} tokens from {source.describe()} ...")
    result = evaluate(model, cache, windows, prefill=args.prefill, chunk=args.chunk, progress=not args.quiet)
    table_stream = sys.stderr if "-" in (args.json, args.markdown) else sys.stdout
    print(format_table(result), file=table_stream, flush=True)
    if args.json is not None:
        _write_text(args.json, to_json(result), args)
    if args.markdown is not None:
        _write_text(args.markdown, to_markdown(result), args)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_layers(result, args.plot)
        _note(args, f"wrote {args.plot}")
    return EXIT_OK


# ---------------------------------------------------------------------------- inspect
def _validate_state(stored: StateFile, path: Path) -> list[str]:
    """Problems a loader would hit; read_state_file already checked the metadata."""
    problems: list[str] = []
    expected = (stored.kv_heads, stored.head_dim)
    fields: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in stored.tensors.items():
        match = _STATE_KEY.match(name)
        if match is None:
            problems.append(f"unexpected tensor {name!r}")
            continue
        index = int(match.group(1))
        if index >= stored.num_layers:
            problems.append(f"tensor {name!r} is for layer {index}, but the model has {stored.num_layers} layers")
            continue
        if tensor.dim() != 2 or (None not in expected and tuple(tensor.shape) != expected):
            shape = tuple(tensor.shape)
            problems.append(f"tensor {name!r} has shape {shape}, expected (kv_heads, head_dim) {expected}")
            continue
        if match.group(3) != "zero_point" and not torch.isfinite(tensor.float()).all():
            problems.append(f"tensor {name!r} contains NaN or Inf")
            continue
        fields.setdefault(index, {}).setdefault(match.group(2), {})[match.group(3)] = tensor
    if not stored.tensors:
        problems.append("the file holds no tensors")
    required = ("min", "max", "scale", "zero_point") if stored.mode == "frozen" else ("min", "max")
    for index, streams in sorted(fields.items()):
        name = stored.layer_names[index]
        if not stored.config.is_quantized(name):
            problems.append(f"layer {index} ({name}) has tensors but the stored config does not quantize it")
        for stream in _STREAMS:
            present = streams.get(stream, {})
            missing = [field for field in required if field not in present]
            if missing:
                problems.append(f"layer {index} {stream} lacks {', '.join(missing)} (mode {stored.mode})")
                continue
            shapes = {tuple(tensor.shape) for tensor in present.values()}
            if len(shapes) != 1:
                problems.append(f"layer {index} {stream} tensors disagree in shape: {sorted(shapes)}")
                continue
            if bool((present["min"].float() > present["max"].float()).any()):
                problems.append(f"layer {index} {stream}: min > max in some channels")
            if "scale" in present and not bool((present["scale"].float() > 0).all()):
                problems.append(f"layer {index} {stream}: non-positive scale")
    return problems


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = _state_path(args.scales)
    stored = read_state_file(path)
    problems = _validate_state(stored, path)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise QuantStateError(f"{path}: invalid state: {problems[0]}{more}")
    layers = _layer_summaries(
        stored.tensors, stored.layer_names, stored.config, top=args.top, factor=args.outlier_factor
    )
    with_data = [layer["index"] for layer in layers if layer["key"] is not None]
    report: dict[str, Any] = {
        "path": str(path),
        "valid": True,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quantcache_version": stored.quantcache_version,
        "model_type": stored.model_type,
        "num_layers": stored.num_layers,
        "kv_heads": stored.kv_heads,
        "head_dim": stored.head_dim,
        "mode": stored.mode,
        "config": stored.config.to_dict(),
        "quantized_layers": with_data,
        "num_tensors": len(stored.tensors),
        "bytes": sum(tensor.numel() * tensor.element_size() for tensor in stored.tensors.values()),
        "outlier_factor": args.outlier_factor,
        "layers": layers,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    facts = [
        ("format", f"{FORMAT_NAME} v{FORMAT_VERSION}, written by quantcache {stored.quantcache_version}"),
        ("model type", str(stored.model_type)),
        ("layers", f"{stored.num_layers} ({len(with_data)} quantized: {_index_ranges(with_data)})"),
        ("kv_heads", str(stored.kv_heads)),
        ("head_dim", str(stored.head_dim)),
        ("config", _config_text(stored.config)),
        ("mode", stored.mode),
        ("tensors", f"{report['num_tensors']} ({report['bytes'] / 1024:.1f} KiB)"),
    ]
    lines = [f"{path}: valid quantcache KV state"]
    lines += [f"  {label + ':':<12} {value}" for label, value in facts]
    lines += ["", _text_table(_RANGE_HEADER, _range_rows(layers)), ""]
    outliers = _outlier_lines(layers)
    lines.append(
        f"outlier channels (range > {args.outlier_factor:g}x the layer's median channel range, "
        f"top {args.top} per stream):" + ("" if outliers else " none")
    )
    lines += outliers
    print("\n".join(lines))
    return EXIT_OK


# ---------------------------------------------------------------------------- suggest-exclude
def _cmd_suggest_exclude(args: argparse.Namespace) -> int:
    scales = _state_path(args.scales)
    read_state_file(scales)
    _check_writable(args.output, "-o")
    _check_model_options(args)
    source = _text_source(args, calibration=False)
    documents = source.load()
    model, tokenizer, _ = _model_and_tokenizer(args)
    cache = _load_frozen_cache(model, scales)
    windows = _windows(args, tokenizer, documents)
    _note(args, f"measuring layer sensitivity on {windows.shape[0]} x {windows.shape[1]} tokens ...")
    suggestion = suggest_exclude(
        model,
        cache,
        windows,
        kl_budget=args.kl_budget,
        prefill=args.prefill,
        chunk=args.chunk,
        progress=not args.quiet,
    )
    print(format_suggestion(suggestion), flush=True)
    if args.output is not None:
        _write_text(args.output, suggestion_to_yaml(suggestion, cache.quant_config), args)
    return EXIT_OK
