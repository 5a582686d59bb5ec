"""The ``quantcache`` command: calibrate, evaluate, inspect and tune KV-cache quantization.

A thin layer over the library. :data:`COMMANDS` maps each command to the module that
implements it and a one-line help; only the chosen command's module is imported, and
it imports torch and transformers only once it runs, so ``quantcache --help`` and
``quantcache COMMAND --help`` answer at once. A command module defines
``add_parser(subparsers)`` (its options) and ``run(args) -> int``; adding a command is
one entry in the table.

What the command line adds to the library is the contract a script can rely on:
one-line errors on stderr prefixed ``quantcache: error:`` and the documented exit
codes (``quantcache --help``; see :mod:`quantcache.cli._common`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from quantcache import __version__
from quantcache.errors import EXIT_FETCH, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

from ._common import EXIT_CODES_TEXT, PROG, HelpFormatter, add_verbosity, run_command
from .commands import COMMANDS, Command

__all__ = [
    "COMMANDS",
    "EXIT_FETCH",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Command",
    "build_parser",
    "entry",
    "main",
]


def command_module(name: str) -> ModuleType:
    """The module implementing command ``name`` (imported on first use)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name].module}")


class _VersionAction(argparse.Action):
    """``--version``: the versions of torch and transformers are read from their metadata, not by importing them."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        def installed(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "not installed"

        print(f"{PROG} {__version__} (torch {installed('torch')}, transformers {installed('transformers')})")
        parser.exit()


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``quantcache`` parser; ``commands`` get their full options (default: all of them).

    The other commands are listed by name and one-line help only, which is all that
    ``quantcache --help`` shows, so their modules are not imported.
    """
    full = set(COMMANDS if commands is None else commands)
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
            f"{EXIT_CODES_TEXT}"
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="show the versions of quantcache, torch, transformers")
    add_verbosity(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for name, command in COMMANDS.items():
        if name in full:
            command_module(name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=command.help, add_help=False)
    return parser


def _chosen_command(arguments: Sequence[str]) -> str | None:
    """The command named on the command line: the first word that is not an option (top-level options take
    no values), if it names a command."""
    for argument in arguments:
        if argument == "--":
            return None
        if not argument.startswith("-"):
            return argument if argument in COMMANDS else None
    return None


def entry() -> NoReturn:
    """The ``quantcache`` script and ``python -m quantcache``: run :func:`main`, exit with its code.

    After taking part in a launcher's process group (``torchrun ... -m quantcache calibrate``)
    the process ends with ``os._exit`` once stdout and stderr are flushed, skipping
    interpreter teardown (see :func:`quantcache.calibration.distributed.left_a_process_group`).
    """
    code = main()
    distributed = sys.modules.get("quantcache.calibration.distributed")  # imported only if a command used it
    if distributed is not None and distributed.left_a_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``quantcache`` command line; returns the exit code (see ``quantcache --help``)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen_command(arguments)
    parser = build_parser([] if chosen is None else [chosen])
    try:
        args = parser.parse_args(arguments)
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (EXIT_OK if stop.code is None else EXIT_USAGE)
    return run_command(command_module(args.command).run, args)
