"""``quantcache evaluate``: the quality cost of saved scales, measured as generation uses a cache.

Prints perplexity, KL and top-1 agreement of the quantized against the unquantized
cache, and per-layer SQNR and clipping; ``--json``/``--markdown``/``--plot`` save them.
Every output path and the state are checked before the model loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from quantcache.errors import EXIT_OK, InputError

from ._common import (
    UsageError,
    add_data_options,
    add_force_option,
    add_model_options,
    check_data_usage,
    command_parser,
    note,
    refuse_existing,
)
from ._output import check_writable, write_text, write_with
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

NAME = "evaluate"


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``evaluate`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
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
    add_scales_option(parser)
    add_model_options(parser)
    add_data_options(
        parser, samples=6, seq_len=1024, default_source="the built-in corpus, evaluation split", evaluation=True
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': stdout, table to stderr)")
    outputs.add_argument("--markdown", metavar="PATH", help="write the result as Markdown ('-': stdout)")
    outputs.add_argument("--plot", type=Path, metavar="FILE.png", help="plot per-layer errors (needs matplotlib)")
    add_force_option(outputs)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate the saved scales; print the table and write the requested reports."""
    check_data_usage(args)
    if args.json == "-" and args.markdown == "-":
        raise UsageError("--json - and --markdown - would both write to stdout; send one of them to a file")
    scales = read_frozen_state(args.scales)  # fail fast on a bad file, before the model loads
    for value, option in ((args.json, "--json"), (args.markdown, "--markdown"), (args.plot, "--plot")):
        check_writable(value, option)
        refuse_existing(option, value, [Path(value)] if value is not None else [], force=args.force)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'quantcache[plot]'")
    check_model_options(args)
    source = text_source(args, calibration=False)
    documents = source.load()
    model, tokenizer, _ = model_and_tokenizer(args)
    cache = frozen_cache(model, scales, allow_other_model=args.allow_other_model)
    windows = token_windows(args, tokenizer, documents)
    note(args, f"evaluating on {windows.shape[0]} x {windows.shape[1]} tokens from {source.describe()} ...")

    from quantcache.analysis.evaluation import evaluate
    from quantcache.analysis.report import format_table, plot_layers, to_json, to_markdown

    result = evaluate(model, cache, windows, prefill=args.prefill, chunk=args.chunk, progress=not args.quiet)
    table_stream = sys.stderr if "-" in (args.json, args.markdown) else sys.stdout
    print(format_table(result), file=table_stream, flush=True)
    if args.json is not None:
        write_text(args.json, to_json(result), args)
    if args.markdown is not None:
        write_text(args.markdown, to_markdown(result), args)
    if args.plot is not None:
        write_with(args.plot, lambda partial: plot_layers(result, partial))
        note(args, f"wrote {args.plot}")
    return EXIT_OK
