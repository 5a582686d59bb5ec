"""``quantcache calibrate``: collect KV ranges on text, freeze them and save the INT8 state.

Writes the state (``kv_scales.safetensors``) with a JSON and a Markdown summary beside
it, as one set (see :func:`~quantcache.cli._output.write_file_set`). The output path is
checked before the model loads, so a mistake in ``-o`` costs no calibration.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import EXIT_OK, ConfigError

from ._common import (
    STATE_FILE_NAME,
    UsageError,
    add_data_options,
    add_force_option,
    add_model_options,
    check_data_usage,
    command_parser,
    note,
    positive_int,
    refuse_existing,
)
from ._output import check_writable, output_state_path, write_file_set
from ._steps import check_model_options, model_and_tokenizer, text_source, token_windows

if TYPE_CHECKING:
    from quantcache.scheme.config import KVQuantConfig

    from ._common import Subparsers

NAME = "calibrate"


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``calibrate`` and its options (the config's choices come from :mod:`quantcache.scheme.config`)."""
    from quantcache.scheme.config import QuantDtype, QuantMethod, QuantScope
    from quantcache.scheme.presets import PRESETS

    parser = command_parser(
        subparsers,
        NAME,
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
            "  quantcache calibrate --preset int4 -o runs/int4\n"
            "  quantcache calibrate --config kv.yaml --exclude 'model.layers.{0,1}.self_attn' -o runs/x\n"
            "  quantcache calibrate --text-file corpus.txt --samples 16 --seq-len 1024 -o runs/x\n"
            "  quantcache calibrate --jsonl chats.jsonl --jsonl-field content -o runs/x\n"
            "  quantcache calibrate --model ./model.gguf --device cuda --dtype bfloat16 -o runs/x"
        ),
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help=f"a .safetensors file, or a directory (then OUT/{STATE_FILE_NAME})",
    )
    add_force_option(parser)
    add_model_options(parser)
    quant = parser.add_argument_group("quantization (explicit options override --config)")
    base = quant.add_mutually_exclusive_group()
    base.add_argument("--config", type=Path, metavar="YAML", help="msModelSlim YAML with a dynamic_cache item")
    base.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="a named scheme instead of --config: "
        + "; ".join(f"{name}: {text}" for name, (text, _) in PRESETS.items()),
    )
    quant.add_argument("--storage", default=None, help=argparse.SUPPRESS)  # refused: storage is chosen per cache
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
        "--context",
        type=positive_int,
        default=None,
        metavar="N",
        help="the longest context you will serve (default: the model's max_position_embeddings); a scheme whose "
        "key ranges do not hold that far past --seq-len (the seed) gets a warning naming --preset c8",
    )
    quant.add_argument(
        "--batch-size", type=positive_int, default=1, metavar="B", help="windows per forward pass (default: 1)"
    )
    add_data_options(
        parser, samples=8, seq_len=512, default_source="the built-in corpus, calibration split", evaluation=False
    )
    return parser


def _read_config(path: Path) -> KVQuantConfig:
    """The YAML at ``path``; read here so that every way of not being a UTF-8 text file is named."""
    from quantcache.models.data import read_text_file
    from quantcache.scheme.config import KVQuantConfig

    text = read_text_file(path, what="config file")
    try:
        return KVQuantConfig.from_yaml(text + "\n")  # the newline makes from_yaml take it as YAML text
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def quant_config(args: argparse.Namespace) -> KVQuantConfig:
    """``--config`` (or the defaults) with the explicitly given options applied on top."""
    from quantcache.scheme.config import KVQuantConfig

    if args.config is not None:
        config = _read_config(args.config)
    else:
        config = KVQuantConfig.preset(args.preset) if args.preset is not None else KVQuantConfig()
    streams: dict[str, Any] = {}  # both streams' arguments (layer overrides keep theirs)
    if args.symmetric is not None:
        streams["symmetric"] = args.symmetric
    if args.kv_dtype is not None:
        streams["dtype"] = args.kv_dtype
    if args.scope is not None:
        streams["scope"] = args.scope
    if args.method is not None:
        streams["method"] = args.method
    if streams:
        config = config.with_stream_args(**streams)
    if args.storage is not None:
        raise UsageError(
            "--storage: a state holds the scheme, not what the caches made from it keep; choose storage per "
            'cache when you load it: quantizer.new_cache(storage="packed") or QuantizedCalibratingCache.from_file('
            'path, model, storage="packed")'
        )
    overrides: dict[str, Any] = {}
    if args.include is not None:
        overrides["include"] = tuple(args.include)
    if args.exclude is not None:
        overrides["exclude"] = tuple(args.exclude)
    return replace(config, **overrides) if overrides else config


def output_set(output: Path) -> list[Path]:
    """What ``-o`` makes: the state, then its JSON and Markdown summaries beside it."""
    return [output, output.with_suffix(".json"), output.with_suffix(".md")]


def run(args: argparse.Namespace) -> int:
    """Calibrate, freeze, save the state and its summaries; print what was written."""
    from quantcache.calibration.distributed import launcher_process_group

    # Under torchrun / accelerate launch each process calibrates its share and the ranges are
    # all-reduced; rank 0 writes the output set and every rank leaves the group together.
    with launcher_process_group() as distributed:
        return calibrate_and_write(args, distributed)


def calibrate_and_write(args: argparse.Namespace, distributed: bool) -> int:
    """The body of :func:`run`, inside the launcher's process group when there is one."""
    from quantcache import __version__
    from quantcache.analysis.state_report import calibration_markdown, layer_summaries
    from quantcache.calibration.calibrate import calibrate
    from quantcache.calibration.distributed import calibrate_distributed, is_main_process

    started = time.perf_counter()
    check_data_usage(args)
    output = output_state_path(args.output)
    check_writable(output, "-o")
    refuse_existing("-o", args.output, output_set(output), force=args.force)
    config = quant_config(args)
    check_model_options(args)
    source = text_source(args, calibration=True)
    documents = source.load()
    model, tokenizer, load_seconds = model_and_tokenizer(args)
    windows = token_windows(args, tokenizer, documents)
    note(args, f"calibrating on {windows.shape[0]} x {windows.shape[1]} tokens from {source.describe()} ...")
    calibration_start = time.perf_counter()
    if distributed:
        cache = calibrate_distributed(
            model,
            windows,
            quant_config=config,
            batch_size=args.batch_size,
            progress=not args.quiet,
            context=args.context,
        )
        if not is_main_process():
            return EXIT_OK  # rank 0 writes the output set
    else:
        cache = calibrate(
            model,
            windows,
            quant_config=config,
            batch_size=args.batch_size,
            freeze=True,
            progress=not args.quiet,
            context=args.context,
        )
    calibration_seconds = time.perf_counter() - calibration_start
    summary: dict[str, Any] = {
        "quantcache_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scales": output.name,
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
        "layers": layer_summaries(cache.state_dict(), cache.layer_names, cache.quant_config),
    }
    json_name, markdown_name = (path.name for path in output_set(output)[1:])

    def write(staging: Path) -> None:
        cache.save(staging / output.name)
        (staging / json_name).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (staging / markdown_name).write_text(calibration_markdown(summary), encoding="utf-8")

    write_file_set(output.parent, output.name, write)
    print(
        f"calibrated {len(cache.quantized_layers)}/{len(cache.layer_names)} layers of {args.model} on "
        f"{summary['data']['samples']} x {summary['data']['seq_len']} tokens ({source.describe()}) "
        f"in {calibration_seconds:.1f} s"
    )
    for name in (output.name, json_name, markdown_name):
        print(f"wrote {output.parent / name}")
    return EXIT_OK
