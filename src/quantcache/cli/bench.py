"""``quantcache bench``: decode and prefill speed, KV bytes and peak memory of quantized caches, on this machine.

Published figures come from someone else's hardware; what a user needs to decide is how
much slower, and how much smaller, a preset is on theirs. The measuring is
:mod:`quantcache.analysis.speed` (interleaved repetitions, medians, ratios to the
``DynamicCache`` of the same run); this module checks the options before any model loads
(a bad context, batch, preset, device or output path costs nothing), calibrates each preset
on a few windows of text (or reads ``--scales``), prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import EXIT_OK, InputError

from ._common import (
    add_data_options,
    add_force_option,
    add_model_options,
    check_data_usage,
    command_parser,
    note,
    positive_int,
    refuse_existing,
)
from ._output import check_writable, write_text
from ._steps import (
    check_model_options,
    frozen_cache,
    model_and_tokenizer,
    read_frozen_state,
    text_source,
    token_windows,
)

if TYPE_CHECKING:
    from quantcache.cache.kv_quantizer import KVQuantizer

    from ._common import Subparsers

NAME = "bench"
DEFAULT_PRESETS = ("seed", "int8", "int4")
DEFAULT_CONTEXTS = (2048,)
DEFAULT_BATCHES = (1,)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``bench`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
        description=(
            "Measure, on this machine and device, what quantized caches cost and save against\n"
            "transformers' DynamicCache (and StaticCache): decode ms per token, prefill tokens/s,\n"
            "the KV bytes each cache holds and the peak memory, at every --contexts x --batches.\n\n"
            "Each cache is filled with the key/value states of one real prefill of the context\n"
            "(repeated over the batch) through its own update, then decode steps are timed through\n"
            "the model; prefill is one forward of the context with a fresh cache. Every repetition\n"
            "runs every cache in turn, in a rotating order; medians are reported, and every ratio\n"
            "is to the DynamicCache of the same run. Each preset is calibrated first on a few\n"
            "windows of text (the data options), or --scales benches a saved state.\n\n"
            "Peak memory: on CUDA the allocator's peak; on a Linux CPU the process's resident\n"
            "high-water mark (model included); elsewhere n/a."
        ),
        examples=(
            "  quantcache bench                                          # seed, int8, int4 at 2048 tokens, batch 1\n"
            "  quantcache bench --contexts 2048 8192 --batches 1 8 --presets seed int8 int4\n"
            "  quantcache bench --scales runs/smollm2 --storage fake --json bench.json\n"
            "  quantcache bench --presets seed int4 --read-codes --contexts 8192   # attention from codes beside\n"
            "  quantcache bench --presets int8 int4 --read-codes --compiled-kernels   # + per-token work compiled\n"
            "  quantcache bench --device cuda --dtype bfloat16 --json - | jq '.rows[].decode_ms'   # table to stderr"
        ),
    )
    caches = parser.add_argument_group("caches")
    which = caches.add_mutually_exclusive_group()
    which.add_argument(
        "--presets",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"presets to calibrate and bench (default: {' '.join(DEFAULT_PRESETS)})",
    )
    which.add_argument(
        "--scales", type=Path, metavar="OUT", default=None, help="bench a state saved by calibrate (or its directory)"
    )
    caches.add_argument(
        "--allow-other-model",
        action="store_true",
        help="with --scales: use a state calibrated for a model whose keys and values differ from this one's",
    )
    caches.add_argument(
        "--storage",
        choices=["packed", "fake"],
        default="packed",
        help="what the quantized caches keep: packed codes or dequantized states (default: packed)",
    )
    caches.add_argument(
        "--read-codes",
        action="store_true",
        help="also measure each packed cache read by the attention from codes (attn_implementation "
        "'quantcache', rows named 'NAME codes') beside the same cache returning decoded states",
    )
    caches.add_argument(
        "--compiled-kernels",
        action="store_true",
        help="also measure each packed cache with its per-token work compiled (new_cache(compiled=True): "
        "encoding new tokens and, with --read-codes, attention from codes run as torch.compile kernels, the "
        "model eager; rows named '... kernels')",
    )
    caches.add_argument("--no-static", action="store_true", help="leave transformers' StaticCache out")
    caches.add_argument(
        "--compile",
        action="store_true",
        help="also measure every cache with the model under torch.compile (inductor; compiling "
        "takes minutes, outside the timings)",
    )
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        default=list(DEFAULT_CONTEXTS),
        metavar="N",
        help=f"tokens in the cache before decoding, each >= 2 (default: {' '.join(map(str, DEFAULT_CONTEXTS))})",
    )
    sizes.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=list(DEFAULT_BATCHES),
        metavar="B",
        help=f"rows per forward, each >= 1 (default: {' '.join(map(str, DEFAULT_BATCHES))})",
    )
    sizes.add_argument(
        "--steps", type=positive_int, default=8, metavar="S", help="timed decode steps per repetition (default: 8)"
    )
    sizes.add_argument(
        "--repeats", type=positive_int, default=3, metavar="R", help="interleaved repetitions (default: 3)"
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': stdout, table to stderr)")
    add_force_option(outputs)
    add_model_options(parser)
    add_data_options(
        parser,
        samples=4,
        seq_len=256,
        default_source="the built-in corpus, calibration split; used to calibrate the presets",
        evaluation=False,
    )
    return parser


def check_sizes_and_presets(args: argparse.Namespace) -> list[str]:
    """Refuse a context, batch or preset that cannot work (exit 3) and return the presets to calibrate.

    A context needs 2 tokens: one to prefill and one the decode steps continue from; the
    contexts, batches and presets are kept in the order given, each once.
    """
    from quantcache.scheme.presets import PRESETS

    for context in args.contexts:
        if context < 2:
            raise InputError(
                f"--contexts {context}: a context needs at least 2 tokens (a prefill, then decoding); "
                "give --contexts 2 or more, e.g. --contexts 2048"
            )
    for batch in args.batches:
        if batch < 1:
            raise InputError(f"--batches {batch}: a batch needs at least 1 row; give --batches 1 or more")
    if args.read_codes and args.storage != "packed":
        raise InputError(
            f"--read-codes with --storage {args.storage}: attention reads codes from packed caches only; "
            "leave --storage at packed"
        )
    if args.compiled_kernels and args.storage != "packed":
        raise InputError(
            f"--compiled-kernels with --storage {args.storage}: the compiled kernels encode and read packed codes; "
            "leave --storage at packed"
        )
    args.contexts = list(dict.fromkeys(args.contexts))
    args.batches = list(dict.fromkeys(args.batches))
    if args.scales is not None:
        return []
    presets = list(dict.fromkeys(args.presets or DEFAULT_PRESETS))
    for name in presets:
        if name not in PRESETS:
            raise InputError(f"--presets {name}: unknown preset; choose from {', '.join(PRESETS)}")
    return presets


def _check_contexts(args: argparse.Namespace, model: Any) -> None:
    """Refuse contexts longer than the model's positions (it would read past its position table)."""
    from quantcache.cache.model_facts import max_positions

    limit = max_positions(model)
    if limit is not None:
        too_long = [context for context in args.contexts if context > limit]
        if too_long:
            raise InputError(
                f"--contexts {too_long[0]} is longer than {args.model} can take ({limit} positions, "
                f"config.max_position_embeddings); give contexts of {limit} tokens or less"
            )


def run(args: argparse.Namespace) -> int:
    """Check everything, load the model, calibrate or read the quantizers, measure, print and write."""
    check_data_usage(args)
    presets = check_sizes_and_presets(args)
    scales = read_frozen_state(args.scales) if args.scales is not None else None
    check_writable(args.json, "--json")
    refuse_existing("--json", args.json, [Path(args.json)] if args.json is not None else [], force=args.force)
    check_model_options(args)
    source = text_source(args, calibration=True)
    documents = source.load() if scales is None else []  # only presets are calibrated on text
    model, tokenizer, _ = model_and_tokenizer(args)
    _check_contexts(args, model)

    from quantcache.analysis.speed import (
        bench_speed,
        calibrate_presets,
        compiled_twins,
        default_contenders,
        format_speed_table,
    )

    quantizers: dict[str, KVQuantizer]
    if scales is not None:
        quantizers = {str(args.scales): frozen_cache(model, scales, allow_other_model=args.allow_other_model).quantizer}
        data: dict[str, Any] = {"scales": str(scales)}
    else:
        windows = token_windows(args, tokenizer, documents)
        note(args, f"calibrating {', '.join(presets)} on {windows.shape[0]} x {windows.shape[1]} tokens ...")
        quantizers = calibrate_presets(model, windows, presets, progress=not args.quiet)
        data = {
            "presets": presets,
            "calibration": {
                "source": source.describe(),
                "samples": int(windows.shape[0]),
                "seq_len": int(windows.shape[1]),
            },
        }
    contenders = default_contenders(
        model,
        quantizers,
        args.storage,
        static=not args.no_static,
        read_codes=args.read_codes,
        compiled_kernels=args.compiled_kernels,
    )
    if not args.no_static and not any(contender.kind == "static" for contender in contenders):
        note(args, "StaticCache left out: this transformers cannot build one for this model")
    if args.compile:
        contenders = compiled_twins(contenders)
    note(
        args,
        f"benchmarking {len(contenders)} caches at contexts {' '.join(map(str, args.contexts))}, batches "
        f"{' '.join(map(str, args.batches))} ({args.repeats} x {args.steps} decode steps) on {args.device} ...",
    )
    settings = {**_environment(args), **data, "compile": "inductor" if args.compile else None}
    result = bench_speed(
        model,
        contenders,
        contexts=args.contexts,
        batches=args.batches,
        steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
        progress=not args.quiet,
        settings=settings,
    )
    table_stream = sys.stderr if args.json == "-" else sys.stdout
    print(format_speed_table(result), file=table_stream, flush=True)
    if args.json is not None:
        write_text(args.json, json.dumps(result.to_dict(), indent=2, allow_nan=False), args)
    return EXIT_OK


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures depend on besides the caches: model, device, dtype, storage, versions, threads."""
    import torch
    import transformers

    from quantcache import __version__

    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "storage": args.storage,
        "read_codes": args.read_codes,
        "compiled_kernels": args.compiled_kernels,
        "contexts": list(args.contexts),
        "batches": list(args.batches),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "quantcache": __version__,
    }
