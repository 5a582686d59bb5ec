"""``quantcache suggest-exclude``: rank layers by sensitivity and propose an exclude list for a KL budget.

The search runs the evaluation once per quantized layer and again per exclusion step,
so its default windows are smaller than ``evaluate``'s; the state and ``-o`` are checked
before it starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from quantcache.errors import EXIT_OK

from ._common import (
    add_data_options,
    add_force_option,
    add_model_options,
    check_data_usage,
    command_parser,
    note,
    positive_float,
    refuse_existing,
)
from ._output import check_writable, write_text
from ._steps import (
    add_scales_option,
    check_model_options,
    frozen_cache,
    model_and_tokenizer,
    read_frozen_state,
    text_source,
    token_windows,
)

if TYPE_CHECKING:
    from ._common import Subparsers

NAME = "suggest-exclude"


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``suggest-exclude`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
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
    add_scales_option(parser)
    parser.add_argument(
        "--kl-budget", required=True, type=positive_float, metavar="X", help="largest acceptable mean KL divergence"
    )
    parser.add_argument("-o", "--output", type=Path, metavar="YAML", help="write the suggested config here")
    add_force_option(parser)
    add_model_options(parser)
    add_data_options(
        parser, samples=2, seq_len=512, default_source="the built-in corpus, evaluation split", evaluation=True
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Search the exclude list; print the ranking and write the YAML with ``-o``."""
    check_data_usage(args)
    scales = read_frozen_state(args.scales)
    check_writable(args.output, "-o")
    refuse_existing("-o", args.output, [args.output] if args.output is not None else [], force=args.force)
    check_model_options(args)
    source = text_source(args, calibration=False)
    documents = source.load()
    model, tokenizer, _ = model_and_tokenizer(args)
    cache = frozen_cache(model, scales, allow_other_model=args.allow_other_model)
    windows = token_windows(args, tokenizer, documents)
    note(args, f"measuring layer sensitivity on {windows.shape[0]} x {windows.shape[1]} tokens ...")

    from quantcache.analysis.report import format_suggestion, suggestion_to_yaml
    from quantcache.analysis.sensitivity import suggest_exclude

    suggestion = suggest_exclude(
        model, cache, windows, kl_budget=args.kl_budget, prefill=args.prefill, chunk=args.chunk, progress=not args.quiet
    )
    print(format_suggestion(suggestion), flush=True)
    if args.output is not None:
        write_text(args.output, suggestion_to_yaml(suggestion, cache.quant_config), args)
    return EXIT_OK
