"""``quantcache import``: read the KV scales of a serving checkpoint into a quantcache state.

The state is what ``quantcache calibrate`` writes (``kv_scales.safetensors``, frozen), so
``quantcache evaluate --scales RUN`` measures someone else's calibration on the same text
as ours. Only the checkpoint's config files and its KV scale tensors are read (through
``safe_open``), never its weights. A JSON summary beside the state says where it came from
and what the import means for the format (FP8 scales become ranges, see the formats).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import EXIT_OK
from quantcache.export import FORMATS

from ._common import add_force_option, command_parser, note, refuse_existing
from ._output import check_writable, output_state_path, write_file_set

if TYPE_CHECKING:
    from ._common import Subparsers

NAME = "import"


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``import`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
        description=(
            "Read the KV cache scales of an existing checkpoint (msModelSlim C8, llm-compressor /\n"
            "compressed-tensors FP8, ModelOpt FP8) into a frozen quantcache state, without reading\n"
            "its weights. The state saves to -o like calibrate's, with a JSON summary beside it.\n\n"
            "ascend: scale and offset become the per-channel INT8 parameters bit for bit.\n"
            "vllm, modelopt: an FP8 scale s means the range [-448 s, 448 s] on every channel of the\n"
            "tensor (or KV head); quantcache's symmetric INT8 math is applied to that range, so\n"
            "evaluate measures their calibrated ranges under INT8, not FP8 arithmetic.\n"
            "Layers without scales in the checkpoint become excluded layers."
        ),
        examples=(
            "  quantcache import --format vllm ~/models/Llama-3.1-8B-FP8-KV -o runs/llmc\n"
            "  quantcache evaluate --scales runs/llmc --model ~/models/Llama-3.1-8B\n"
            "  quantcache import --format ascend deploy/smollm2-c8 -o runs/roundtrip/kv_scales.safetensors"
        ),
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="the checkpoint directory to read")
    parser.add_argument("--format", choices=list(FORMATS), required=True, help="the checkpoint's format")
    parser.add_argument(
        "-o",
        "--output",
        metavar="RUN",
        required=True,
        help="state file to write, or a directory for kv_scales.safetensors",
    )
    add_force_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Import, write the state and its summary, print what was read."""
    from quantcache import __version__
    from quantcache.export import import_checkpoint

    output = output_state_path(args.output)
    check_writable(output, "-o")
    refuse_existing("-o", args.output, [output, output.with_suffix(".json")], force=args.force)
    note(args, f"reading {args.format} KV scales from {args.checkpoint} ...")
    result = import_checkpoint(args.checkpoint, format=args.format)
    cache = result.cache
    summary: dict[str, Any] = {
        "quantcache_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scales": output.name,
        "imported_from": str(args.checkpoint),
        "format": result.format,
        "meaning": result.note,
        "model_type": cache.model_type,
        "num_layers": len(cache.layer_names),
        "kv_heads": cache.kv_heads,
        "head_dim": cache.head_dim,
        "config": cache.quant_config.to_dict(),
        "quantized_layers": result.layers,
    }
    json_name = output.with_suffix(".json").name

    def write(staging: Path) -> None:
        cache.save(staging / output.name)
        (staging / json_name).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    write_file_set(output.parent, output.name, write)
    scheme = "symmetric" if result.symmetric else "asymmetric"
    print(
        f"imported {len(result.layers)}/{len(cache.layer_names)} layers ({scheme}) from {args.checkpoint} "
        f"({result.format}) to {output}"
    )
    return EXIT_OK
