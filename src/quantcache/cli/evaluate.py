"""``quantcache evaluate``: the quality cost of saved scales, measured as generation uses a cache.

Prints perplexity, KL and top-1 agreement of the quantized against the unquantized
cache, and per-layer SQNR and clipping; ``--json``/``--markdown``/``--plot`` save them.
By default at the calibration length the state records, with a line at 4x it, and a
comparison of greedy answers to built-in chat prompts (``--generate``).
Every output path and the state are checked before the model loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import EXIT_OK, DataError, InputError, QuantcacheError
from quantcache.export.registry import FORMATS

from ._common import (
    UsageError,
    add_data_options,
    add_force_option,
    add_model_options,
    check_data_usage,
    command_parser,
    non_negative_int,
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
    from quantcache.analysis.evaluation import EvaluationResult
    from quantcache.scheme.settings import Engine

    from ._common import Subparsers

NAME = "evaluate"
DEFAULT_CONTEXT = 1024
"""The context of a state that does not record how long its calibration windows were."""
LONG_FACTOR = 4
"""The second evaluation runs at this many times the context (unless --context is given)."""
DEFAULT_GENERATE = 32
"""New tokens per chat prompt of the generation check (``--generate``)."""


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``evaluate`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
        description=(
            "Load saved scales for the model and compare the quantized KV cache with the\n"
            "unquantized one the way a cache is used in generation: prefill, then decode in\n"
            "chunks. Prints perplexity, mean KL divergence, top-1 agreement and per-layer\n"
            "quantization error (SQNR, clipping).\n\n"
            "--as ENGINE measures the state with the arithmetic of the engine that serves\n"
            "`quantcache export --format ENGINE`: the scales it derives and holds (in the model\n"
            "dtype for ascend), its rounding, saturation and decode rule. After `quantcache import`\n"
            "it answers what the imported checkpoint will do when served. A state that format\n"
            "cannot write is refused (exit 3) with the reason and the fix."
        ),
        examples=(
            "  quantcache evaluate --scales runs/smollm2\n"
            "  quantcache evaluate --scales runs/smollm2 --no-long-context --generate 0   # PPL and KL only\n"
            "  quantcache evaluate --scales runs/smollm2 --context 2048 --samples 4 --json eval.json\n"
            "  quantcache evaluate --scales kv.safetensors --dataset wikitext2 --markdown eval.md --plot layers.png\n"
            "  quantcache evaluate --scales kv.safetensors --json - | jq .kl_mean   # table goes to stderr\n"
            "  quantcache import --format vllm ckpt/ -o runs/ckpt && quantcache evaluate --scales runs/ckpt --as vllm"
        ),
    )
    add_scales_option(parser)
    parser.add_argument(
        "--as",
        dest="engine",
        choices=list(FORMATS),
        default=None,
        metavar="ENGINE",
        help=f"measure with the serving engine's numerics ({', '.join(FORMATS)}: the engine that loads "
        "`export --format ENGINE`); default: quantcache's own",
    )
    add_model_options(parser)
    add_data_options(
        parser,
        samples=6,
        seq_len=None,
        seq_len_default=f"the calibration length the state records, else {DEFAULT_CONTEXT}",
        default_source="the built-in corpus, evaluation split",
        evaluation=True,
    )
    checks = parser.add_argument_group("at serving lengths, and as users see it")
    checks.add_argument(
        "--no-long-context",
        dest="long_context",
        action="store_false",
        help=f"skip the second evaluation at {LONG_FACTOR}x the context (max(1, --samples // {LONG_FACTOR}) windows), "
        "which runs unless --context is given",
    )
    checks.add_argument(
        "--generate",
        type=non_negative_int,
        default=DEFAULT_GENERATE,
        metavar="N",
        help="answer 8 built-in chat prompts greedily with N new tokens, with and without quantization, and report "
        f"how many answers are the same and where the others first differ (0: skip; default: {DEFAULT_GENERATE})",
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
    notes: list[str] = []  # what the reports say about the context and the checks
    explicit_context = args.seq_len is not None
    _default_context(args, scales, notes)
    engine = _served_engine(args, scales)
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
    if engine is not None:
        cache = cache.quantizer.new_cache(engine=engine)
    try:
        windows = token_windows(args, tokenizer, documents)
    except DataError as error:
        if explicit_context:
            raise
        raise DataError(f"at the default context ({args.seq_len} tokens, or --context N): {error}") from error
    note(args, f"evaluating on {windows.shape[0]} x {windows.shape[1]} tokens from {source.describe()} ...")

    from quantcache.analysis.evaluation import evaluate
    from quantcache.analysis.report import format_table, plot_layers, to_json, to_markdown

    result = evaluate(model, cache, windows, prefill=args.prefill, chunk=args.chunk, progress=not args.quiet)
    long_result = None
    if args.long_context and not explicit_context:
        long_result = _long_context(args, model, tokenizer, documents, cache, notes)
    generation = None
    if args.generate:
        from quantcache.analysis.generation_check import CHAT_PROMPTS, generation_check

        prompts = len(CHAT_PROMPTS)
        note(args, f"answering {prompts} chat prompts ({args.generate} new tokens) without and with quantization ...")
        generation = generation_check(model, tokenizer, cache, new_tokens=args.generate, progress=not args.quiet)
        for text in generation.notes:
            _note(args, notes, text)
    table_stream = sys.stderr if "-" in (args.json, args.markdown) else sys.stdout
    print(format_table(result, long_context=long_result, generation=generation), file=table_stream, flush=True)
    if args.json is not None:
        write_text(args.json, to_json(result, long_context=long_result, generation=generation, notes=notes), args)
    if args.markdown is not None:
        write_text(args.markdown, to_markdown(result, long_context=long_result, generation=generation), args)
    if args.plot is not None:
        write_with(args.plot, lambda partial: plot_layers(result, partial))
        note(args, f"wrote {args.plot}")
    return EXIT_OK


def _note(args: argparse.Namespace, notes: list[str], text: str) -> None:
    """A note for stderr that the JSON report keeps too."""
    notes.append(text)
    note(args, f"note: {text}")


def _default_context(args: argparse.Namespace, scales: Path, notes: list[str]) -> None:
    """Without --context: the calibration length the state records, else DEFAULT_CONTEXT; a default prefill fits it."""
    if args.seq_len is not None:
        return
    from quantcache.state.file import open_state_file

    recorded = open_state_file(scales).calibration
    if recorded is None:
        args.seq_len = DEFAULT_CONTEXT
        _note(
            args,
            notes,
            f"{scales} does not record how long its calibration windows were (written before it was, or imported): "
            f"evaluating at {DEFAULT_CONTEXT} tokens (--context N to choose)",
        )
    else:
        args.seq_len = recorded.tokens_per_window
        _note(args, notes, f"evaluating at the calibration length, {args.seq_len} tokens (--context N to choose)")
    if args.seq_len < 2:
        raise InputError(
            f"{scales} was calibrated on windows of {args.seq_len} token, too short to evaluate on; pass --context N"
        )
    if args.prefill >= args.seq_len:
        if args.prefill != args.parser.get_default("prefill"):
            raise UsageError(
                f"--prefill ({args.prefill}) must be smaller than the context ({args.seq_len} tokens, the calibration "
                "length the state records); pass a smaller --prefill or a longer --context"
            )
        args.prefill = max(1, args.seq_len // 2)
        _note(args, notes, f"prefill of {args.prefill} tokens, half the context (--prefill P to choose)")


def _long_context(
    args: argparse.Namespace, model: Any, tokenizer: Any, documents: list[str], cache: Any, notes: list[str]
) -> EvaluationResult | None:
    """The evaluation at LONG_FACTOR x the context on fewer windows, or ``None`` (with a note) when it cannot run."""
    from quantcache.analysis.evaluation import evaluate
    from quantcache.cache.model_facts import max_positions
    from quantcache.models.data import token_windows as make_windows

    length = LONG_FACTOR * args.seq_len
    limit = max_positions(model)
    if limit is not None and length > limit:
        if limit <= args.seq_len:
            _note(args, notes, f"no longer-context line: the model takes {limit} positions, no more than the context")
            return None
        _note(args, notes, f"the longer context is {limit} tokens, the model's max_position_embeddings, not {length}")
        length = limit
    windows = None
    for count in dict.fromkeys((max(1, args.samples // LONG_FACTOR), 1)):
        try:
            windows = make_windows(tokenizer, documents, num_samples=count, seq_len=length, seed=args.seed)
            break
        except DataError:
            continue
    if windows is None:
        _note(
            args,
            notes,
            f"no longer-context line: the text is too short for a window of {length} tokens; give longer text "
            "(--text-file, --dataset) or pass --no-long-context",
        )
        return None
    count = int(windows.shape[0])
    note(
        args,
        f"evaluating at {length} tokens too, on {count} window{'' if count == 1 else 's'} "
        f"(--samples // {LONG_FACTOR}, at least 1; --no-long-context skips it) ...",
    )
    return evaluate(model, cache, windows, prefill=args.prefill, chunk=args.chunk, progress=not args.quiet)


def _served_engine(args: argparse.Namespace, scales: Path) -> Engine | None:
    """The engine ``--as`` names, once the state passed the refusals its export makes (before the model loads).

    The export's notes on what the engine does with the state (offsets it ignores, layers to
    skip) are printed; a state the format cannot write raises its export error, exit 3.
    """
    if args.engine is None:
        return None
    from quantcache.export.api import served_numerics

    try:
        engine, warnings = served_numerics(scales, args.engine)
    except QuantcacheError as error:
        raise type(error)(f"--as {args.engine}: {error}") from error
    for warning in warnings:
        note(args, f"note: {warning}")
    return engine
