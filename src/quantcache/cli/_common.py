"""What every ``quantcache`` command shares: options, the steps before the real work, error reporting.

Commands define their options here and in their own module, and the parser for
``quantcache COMMAND --help`` is built from them, so nothing in this module imports
torch or transformers: an option type that needs torch (``--device``) imports it
when the option is given. The steps before a command's real work (loading the model,
the text, the state) are in :mod:`quantcache.cli._steps`.

Errors become one line on stderr, ``quantcache: error: ...``, and an exit code taken
from the error itself (:attr:`quantcache.errors.QuantcacheError.exit_code`), so a new
error class needs no change here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from quantcache.errors import (
    EXIT_FETCH,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    QuantcacheError,
)

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

PROG = "quantcache"
STATE_FILE_NAME = "kv_scales.safetensors"
MODEL_DTYPES = ("float32", "float16", "bfloat16")

EXIT_CODES_TEXT = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_INTERNAL}    unexpected internal error (a bug): rerun with -v and report the traceback
  {EXIT_USAGE}    usage error: unknown option, missing or malformed argument
  {EXIT_INPUT}    input error: missing or unreadable file, invalid config or state file,
       state made for another model, unusable data, a --model that names no known
       model, file or directory, unavailable device, missing optional dependency,
       an output path that cannot be written
  {EXIT_FETCH}    the model could not be fetched or loaded (network or package index
       unreachable, download failed verification, weights unreadable)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

Errors are one line on stderr starting with "{PROG}: error:"; -v adds the traceback."""

SHORT_EXIT_CODES = (
    f"exit codes: {EXIT_OK} ok, {EXIT_INTERNAL} internal error, {EXIT_USAGE} usage error, {EXIT_INPUT} input error, "
    f"{EXIT_FETCH} model fetch error\n(details: {PROG} --help)"
)


class UsageError(Exception):
    """An option combination argparse cannot express: exit 2 with the command's usage line."""


# ---------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def model_dtype(text: str) -> str:
    """argparse type for ``--dtype``; a quantized format given by mistake points at ``--kv-dtype``."""
    value = text.lower()
    if value in MODEL_DTYPES:
        return value
    from quantcache.scheme.config import QuantDtype  # only on this error path, so parsing stays light

    if value in {member.value for member in QuantDtype}:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a quantized cache format; --dtype is the model's dtype "
            f"({', '.join(MODEL_DTYPES)}): use --kv-dtype {value}"
        )
    raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(MODEL_DTYPES)})")


def device(text: str) -> str:
    """argparse type for ``--device``: anything ``torch.device`` accepts (torch is imported only when given)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (examples: cpu, cuda, cuda:1, mps)") from None
    return text


# ---------------------------------------------------------------------------- parsers
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped descriptions and examples; a wider option column than argparse's."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_verbosity(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """``-q``/``-v``, accepted before and after the command; the command's copy must not reset the top-level one."""
    default: Any = False if top_level else argparse.SUPPRESS
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or notes")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="print full tracebacks on errors, and pip's output when a model is fetched",
    )


def command_parser(subparsers: Subparsers, name: str, *, description: str, examples: str) -> argparse.ArgumentParser:
    """The parser of command ``name``, with its one-line help from the command table, examples and exit codes."""
    from quantcache.cli.commands import COMMANDS

    parser = subparsers.add_parser(
        name,
        help=COMMANDS[name].help,
        description=description,
        epilog=f"Examples:\n{examples}\n\n{SHORT_EXIT_CODES}",
        formatter_class=HelpFormatter,
    )
    add_verbosity(parser, top_level=False)
    parser.set_defaults(parser=parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--cache-dir``."""
    from quantcache.models.catalog import DEFAULT_MODEL, KNOWN_MODELS

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
        type=device,
        default=None,
        help="torch device to run on: cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)",
    )
    group.add_argument(
        "--dtype",
        type=model_dtype,
        default="float32",
        metavar="{" + ",".join(MODEL_DTYPES) + "}",
        help="dtype of the model's weights and activations (default: float32)",
    )
    group.add_argument("--cache-dir", type=Path, metavar="DIR", default=None, help="where fetched models are kept")


def add_data_options(
    parser: argparse.ArgumentParser,
    *,
    samples: int,
    seq_len: int | None,
    default_source: str,
    evaluation: bool,
    seq_len_default: str | None = None,
) -> None:
    """The text source and its windows; ``evaluation`` adds ``--context``, ``--prefill`` and ``--chunk``.

    ``seq_len=None`` leaves ``--seq-len`` unset unless given (the command then decides), its default
    described in the help by ``seq_len_default``.
    """
    from quantcache.models.data import (
        DEFAULT_JSONL_FIELD,  # quantcache.models.data imports torch only when it cuts windows
    )

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
        "--samples", type=positive_int, default=samples, metavar="N", help=f"number of windows (default: {samples})"
    )
    names = ["--seq-len", "--context"] if evaluation else ["--seq-len"]
    group.add_argument(
        *names,
        dest="seq_len",
        type=positive_int,
        default=seq_len,
        metavar="L",
        help=f"tokens per window{' (--context is an alias)' if evaluation else ''} "
        f"(default: {seq_len_default or seq_len})",
    )
    group.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the window sampling (default: 0)")
    if evaluation:
        group.add_argument(
            "--prefill",
            type=positive_int,
            default=256,
            metavar="P",
            help="tokens of each window prefilled at once before decoding (default: 256)",
        )
        group.add_argument(
            "--chunk",
            type=positive_int,
            default=32,
            metavar="C",
            help="tokens per decoding step after the prefill (default: 32)",
        )


def check_data_usage(args: argparse.Namespace) -> None:
    """Data option combinations argparse cannot express (usage errors, exit 2)."""
    if args.jsonl_field is not None and args.jsonl is None:
        raise UsageError("--jsonl-field needs --jsonl PATH")
    prefill = getattr(args, "prefill", None)
    if prefill is not None and args.seq_len is not None and prefill >= args.seq_len:
        raise UsageError(f"--prefill ({prefill}) must be smaller than --seq-len/--context ({args.seq_len})")


# ---------------------------------------------------------------------------- running a command
def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call ``run(args)`` and turn whatever escapes it into a one-line message and its exit code."""
    try:
        with one_line_warnings():
            return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (``quantcache inspect x | head``): not an error
        _silence_stdout()
        return EXIT_OK
    except UsageError as error:
        parser: argparse.ArgumentParser = args.parser
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        return report_error(error, verbose=bool(args.verbose))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass


def report_error(error: BaseException, *, verbose: bool) -> int:
    """Print ``quantcache: error: ...`` (after the traceback with ``-v``) and return the exit code."""
    code = exit_code(error)
    message = one_line(describe(error))
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    elif code == EXIT_INTERNAL:
        message += " (this is a bug; rerun with -v for the full traceback)"
    sys.stderr.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # an out-of-memory error can only come from an imported torch
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def exit_code(error: BaseException) -> int:
    """The documented exit code for ``error``: a project error carries its own; see ``EXIT_CODES_TEXT``."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, QuantcacheError):
        return error.exit_code
    if isinstance(error, (OSError, ModuleNotFoundError)) or _is_out_of_memory(error):
        return EXIT_INPUT
    return EXIT_INTERNAL


_OPTIONAL_EXTRAS = {"matplotlib": "plot", "datasets": "datasets", "gguf": "gguf"}


def describe(error: BaseException) -> str:
    """The message for ``error``: its own text for project errors, a hint where a class is known."""
    if _is_out_of_memory(error):
        return "out of GPU memory; try fewer --samples, a shorter --seq-len or --dtype bfloat16"
    if isinstance(error, ModuleNotFoundError) and error.name:
        extra = _OPTIONAL_EXTRAS.get(error.name.split(".")[0])
        hint = f": pip install 'quantcache[{extra}]'" if extra else ""
        return f"missing optional dependency {error.name!r}{hint}"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = str(error)
    if exit_code(error) == EXIT_INTERNAL:
        return f"internal error: {type(error).__name__}: {text}" if text else f"internal error: {type(error).__name__}"
    return text or type(error).__name__


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show Python warnings (an include pattern that matches nothing ...) as one line each."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"{PROG}: warning: {one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def note(args: argparse.Namespace, message: str) -> None:
    """Progress notes on stderr (not with --quiet); results go to stdout."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- paths
def state_path(value: str | Path) -> Path:
    """A state file path; a directory (existing, suffix-less or ending in a slash) means DIR/kv_scales.safetensors."""
    text = str(value)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix:
        return path / STATE_FILE_NAME
    return path


def add_force_option(parser: argparse._ActionsContainer) -> None:
    """``--force``: every command that writes files takes it, with the same meaning (see :func:`refuse_existing`)."""
    parser.add_argument("--force", action="store_true", help="replace outputs that exist already (refused without it)")


def _holds_something(path: Path) -> bool:
    """Whether writing ``path`` would destroy something: a non-empty file or directory (``/dev/null`` is empty)."""
    try:
        if path.is_dir():
            return any(path.iterdir())
        return path.exists() and path.stat().st_size > 0
    except OSError:
        return False  # what cannot be looked at is for check_writable to name


def refuse_existing(option: str, value: str | Path | None, paths: Iterable[Path], *, force: bool) -> None:
    """Refuse, before any work, to replace an existing non-empty output without ``--force``.

    The one rule of every command that writes: ``paths`` are what the command given
    ``option value`` would create or replace (a state with its summaries, a checkpoint
    directory, a report); if any of them holds something, the command stops here (exit 3)
    instead of silently replacing a previous run. ``None`` and ``-`` (stdout) pass. A path that is
    neither a file nor a directory (``/dev/null``, a pipe) is refused even with ``--force``: outputs
    are written beside their destination and renamed over it, which would replace the device itself.
    """
    if value is None or str(value) == "-":
        return
    paths = list(paths)
    for path in paths:
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise InputError(
                f"{option} {value}: {path} is not a regular file or directory (a device or a pipe); outputs are "
                "written to a file and renamed into place, so give a file path ('-' writes to stdout where offered)"
            )
    if force:
        return
    for path in paths:
        if _holds_something(path):
            where = "" if path == Path(value) else f"{path} "
            raise InputError(
                f"{option} {value}: {where}exists and is not empty; choose another path or pass --force to replace it"
            )
