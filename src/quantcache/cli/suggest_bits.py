"""``quantcache suggest-bits``: measure each layer's sensitivity per scheme and mix schemes within a bit budget.

The search evaluates every candidate scheme on every layer alone, so its default windows
are small (2 x 512 tokens, as ``suggest-exclude``); ``-o`` is checked before it starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from quantcache.errors import EXIT_OK
from quantcache.scheme.presets import MIX_BASE, MIX_CANDIDATES

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
from ._steps import check_model_options, model_and_tokenizer, text_source, token_windows

if TYPE_CHECKING:
    from quantcache.analysis.bit_allocation import BitSuggestion

    from ._common import Subparsers

NAME = "suggest-bits"


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``suggest-bits`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
        description=(
            "Measure, for every candidate scheme and every layer, how much quantizing that layer\n"
            "alone adds to the KL divergence from the unquantized model; then give each layer the\n"
            "scheme that keeps the summed KL lowest with the average effective bits (codes, scales,\n"
            "zero points, excluded layers at 16 bits) within --budget, and measure the mix. Prints\n"
            "the choice per layer and, with -o, writes a config with per-layer overrides that\n"
            "calibrate --config and KVQuantConfig.from_yaml accept.\n\n"
            "Schemes are dynamic presets: a preset name, or KEYS/VALUES (int8/int4: keys as int8,\n"
            "values as int4). Centred presets learn their channel means from the same text first."
        ),
        examples=(
            "  quantcache suggest-bits --budget 4.6 -o kv-mixed.yaml\n"
            "  quantcache suggest-bits --budget 3.5 --schemes int4 int4/int2 int3 int2\n"
            "  quantcache calibrate --config kv-mixed.yaml -o runs/mixed   # use it"
        ),
    )
    parser.add_argument(
        "--budget", required=True, type=positive_float, metavar="BITS", help="average effective bits per element"
    )
    parser.add_argument(
        "--schemes",
        nargs="+",
        default=list(MIX_CANDIDATES),
        metavar="S",
        help=f"candidate schemes (default: {' '.join(MIX_CANDIDATES)})",
    )
    parser.add_argument("--exclude", nargs="+", default=(), metavar="PAT", help="attention modules left unquantized")
    parser.add_argument("-o", "--output", type=Path, metavar="YAML", help="write the suggested config here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every measurement as JSON here")
    add_force_option(parser)
    add_model_options(parser)
    add_data_options(
        parser, samples=2, seq_len=512, default_source="the built-in corpus, evaluation split", evaluation=True
    )
    return parser


def format_bits(suggestion: BitSuggestion) -> str:
    """The per-layer choice and the summary, as a plain-text table."""
    width = max(len(layer.name) for layer in suggestion.layers)
    lines = [f"{'layer':>5}  {'module':<{width}}  {'scheme':<10}  {'bits':>6}  {'KL alone':>9}"]
    for layer in suggestion.layers:
        lines.append(
            f"{layer.index:>5}  {layer.name:<{width}}  {layer.scheme:<10}  {layer.bits:>6.3f}  {layer.kl_alone:>9.2e}"
        )
    lines.append(
        f"mix: {suggestion.effective_bits:.3f} effective bits (budget {suggestion.budget:g}) at "
        f"{suggestion.seq_len} tokens; mean KL {suggestion.kl_measured:.3e} measured, "
        f"{suggestion.kl_predicted:.3e} predicted by summing the layers"
    )
    for scheme, kl in suggestion.kl_uniform.items():
        lines.append(f"every layer {scheme}: mean KL {kl:.3e}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Measure, choose, print; write the YAML with ``-o`` and the measurements with ``--json``."""
    from quantcache.analysis.bit_allocation import parse_candidate, suggest_bits
    from quantcache.scheme.config import KVQuantConfig

    check_data_usage(args)
    for spec in args.schemes:
        parse_candidate(spec)  # a bad scheme fails before the model loads
    base = KVQuantConfig(exclude=tuple(args.exclude), **MIX_BASE)
    for value, option in ((args.output, "-o"), (args.json, "--json")):
        check_writable(value, option)
        refuse_existing(option, value, [Path(value)] if value is not None else [], force=args.force)
    check_model_options(args)
    source = text_source(args, calibration=False)
    documents = source.load()
    model, tokenizer, _ = model_and_tokenizer(args)
    windows = token_windows(args, tokenizer, documents)
    note(args, f"measuring {len(args.schemes)} schemes per layer on {windows.shape[0]} x {windows.shape[1]} tokens ...")
    suggestion = suggest_bits(
        model,
        windows,
        budget=args.budget,
        candidates=args.schemes,
        base_config=base,
        prefill=args.prefill,
        chunk=args.chunk,
        progress=not args.quiet,
    )
    print(format_bits(suggestion), flush=True)
    if args.output is not None:
        write_text(args.output, suggestion.config.to_yaml(), args)
    if args.json is not None:
        write_text(args.json, json.dumps(suggestion.to_dict(), indent=2) + "\n", args)
    return EXIT_OK
