"""``quantcache export``: write calibrated KV scales as a checkpoint a serving engine loads as is.

A thin layer over :func:`quantcache.export.export_checkpoint`. Everything that can be
refused cheaply is refused before the model is read: the state (frozen?), the output
directory, the format and its options, and what the format cannot represent.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import EXIT_OK, InputError
from quantcache.export import FORMATS

from . import _steps
from ._common import add_force_option, add_model_options, command_parser, note, refuse_existing
from ._steps import check_model_options, read_frozen_state

if TYPE_CHECKING:
    from ._common import Subparsers

NAME = "export"


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``export`` and its options (the formats come from :data:`quantcache.export.FORMATS`)."""
    formats = "\n".join(f"  {name:<9} {entry.summary}" for name, entry in FORMATS.items())
    parser = command_parser(
        subparsers,
        NAME,
        description=(
            "Write a checkpoint directory that a serving engine loads as is: the model's weights\n"
            "(safetensors shards copied byte for byte from a model directory, or save_pretrained of a\n"
            "model loaded from GGUF / a known name), the KV scales in their own shard listed in the\n"
            "index, and the config files the engine reads. --scales-only writes just the scale shard,\n"
            "config fragments and a note on merging them into an existing checkpoint.\n"
            "QUANTCACHE_EXPORT.md in the output names the serve command.\n\n"
            f"Formats:\n{formats}\n\n"
            "A scheme the target cannot represent is refused (exit 3) with what it would need:\n"
            "an asymmetric state for ascend (vLLM-Ascend decodes symmetric only; --allow-asymmetric),\n"
            "excluded layers for modelopt, a model without ModelOpt-quantized weights for modelopt."
        ),
        examples=(
            "  quantcache calibrate --preset c8 -o runs/smollm2   # static INT8 ranges that hold at any length\n"
            "  quantcache export --scales runs/smollm2 --format ascend -o deploy/smollm2-c8\n"
            "  quantcache export --scales runs/qwen --model ~/models/Qwen3-8B --format vllm -o deploy/qwen-fp8\n"
            "  quantcache export --scales runs/qwen --model ~/models/Qwen3-8B --format vllm --strategy attn_head \\\n"
            "      -o deploy/qwen-fp8-heads\n"
            "  quantcache export --scales runs/qwen --format modelopt --scales-only -o deploy/qwen-kv-only\n"
            "  vllm serve deploy/smollm2-c8 --quantization ascend          # on Ascend NPUs (vLLM-Ascend)"
        ),
    )
    parser.add_argument(
        "--scales",
        type=Path,
        metavar="RUN",
        required=True,
        help="a frozen state file, or the directory calibrate wrote",
    )
    parser.add_argument("--format", choices=list(FORMATS), required=True, help="the target format (see above)")
    parser.add_argument(
        "-o", "--output", type=Path, metavar="DIR", required=True, help="the checkpoint directory to write"
    )
    parser.add_argument(
        "--scales-only", action="store_true", help="write only the scale shard, config fragments and a merge note"
    )
    add_force_option(parser)
    add_model_options(parser)
    parser.set_defaults(model=None)  # so --scales-only can tell whether a model was given
    group = parser.add_argument_group("format options")
    group.add_argument(
        "--strategy",
        choices=["tensor", "attn_head"],
        default=None,
        help="vllm: one FP8 scale per layer and stream (tensor, default) or per KV head (attn_head)",
    )
    group.add_argument(
        "--allow-asymmetric",
        action="store_true",
        help="ascend: write an asymmetric state (offsets); vLLM-Ascend's decode path ignores them",
    )
    group.add_argument(
        "--int8-offsets",
        action="store_true",
        help="ascend: refit channels whose zero point leaves int8 (for engines that store offsets as int8)",
    )
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The format options given on the command line (an option another format owns is an error, exit 3)."""
    given: dict[str, Any] = {}
    if args.strategy is not None:
        given["strategy"] = args.strategy
    if args.allow_asymmetric:
        given["allow_asymmetric"] = True
    if args.int8_offsets:
        given["int8_offsets"] = True
    return given


def _check_output(path: Path, force: bool) -> None:
    """Refuse an unusable output directory before any model is read."""
    if path.exists() and not path.is_dir():
        raise InputError(f"-o {path}: exists and is not a directory")
    refuse_existing("-o", path, [path], force=force)
    ancestor = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"-o {path}: cannot write into {ancestor} (permission denied or a read-only file system)")


def run(args: argparse.Namespace) -> int:
    """Export, then print what was written and how to serve it."""
    from quantcache.export import export_checkpoint, get_format
    from quantcache.models.catalog import DEFAULT_MODEL
    from quantcache.models.loading import resolve_model_source

    from ..export.common import KVState

    state = KVState.load(read_frozen_state(args.scales))
    _check_output(args.output, args.force)
    fmt = get_format(args.format)
    options = fmt.options(_options(args))
    fmt.check(state, options, None, None)  # cheap refusals before the model is read
    model: Any = None
    tokenizer: Any = None
    if args.model is not None or not args.scales_only:
        args.model = args.model or DEFAULT_MODEL
        check_model_options(args)
        source = resolve_model_source(args.model)
        if source.kind == "directory":
            model = Path(source.location)
        else:  # a GGUF file, a known name or a Hub id: load it, then save_pretrained writes safetensors
            note(args, f"loading model {args.model} ({args.dtype}) to write its weights ...")
            model, tokenizer = _steps.load_model_and_tokenizer(args)
    note(args, f"exporting {args.scales} as {args.format} to {args.output} ...")
    result = export_checkpoint(
        state,
        args.output,
        format=args.format,
        model=model,
        tokenizer=tokenizer,
        scales_only=args.scales_only,
        overwrite=args.force,
        **dataclasses.asdict(options),
    )
    for warning in result.warnings:
        note(args, f"note: {warning}")
    what = "scales only" if result.scales_only else "checkpoint"
    print(f"exported {len(result.tensors)} KV scale tensors ({args.format}, {what}) to {result.directory}")
    print(f"serve with: {result.serve_command}")
    return EXIT_OK
