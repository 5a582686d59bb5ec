"""``quantcache inspect``: validate a saved state and show what it holds, without loading a model.

Validation is the loader's and the writer's own (the checksum and metadata checks of
:func:`~quantcache.state.file.open_state_file`, then :func:`~quantcache.state.file.check_state`),
so a damaged or hand-edited file is refused with its first problems named (exit 3) instead
of being shown as if it were fine, and a file inspect calls valid is one a cache loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.errors import EXIT_INPUT, EXIT_OK

from ._common import command_parser, non_negative_int, positive_float, state_path

if TYPE_CHECKING:

    from quantcache.state.schema import CalibrationLength

    from ._common import Subparsers

NAME = "inspect"



def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Define ``inspect`` and its options."""
    parser = command_parser(
        subparsers,
        NAME,
        description=(
            "Validate a saved state (checksum, metadata, tensor names, dtypes, shapes, finite values,\n"
            "min <= max, scales at or above the floor, zero points, parameters equal to what the\n"
            "statistics imply) and print what it holds: format and quantcache version, model type\n"
            "and shape, config, mode, per-layer key/value ranges and outlier channels (channels\n"
            "whose range is more than --outlier-factor times the layer's median channel range).\n"
            f"An invalid file exits with code {EXIT_INPUT}. No model is loaded."
        ),
        examples=(
            "  quantcache inspect runs/smollm2/kv_scales.safetensors\n"
            "  quantcache inspect runs/smollm2 --top 5 --outlier-factor 8\n"
            "  quantcache inspect kv.safetensors --json > kv.json"
        ),
    )
    parser.add_argument("scales", type=Path, metavar="OUT", help="a state file saved by calibrate, or its directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--top", type=non_negative_int, default=3, metavar="N", help="outlier channels listed per stream (default: 3)"
    )
    parser.add_argument(
        "--outlier-factor",
        type=positive_float,
        default=4.0,
        metavar="K",
        help="range > K x the layer's median channel range makes an outlier (default: 4)",
    )
    return parser


def _calibration_text(length: CalibrationLength | None) -> str:
    if length is None:
        return "window length not recorded (written before it was, or imported)"
    windows = f"{length.windows} window{'s' if length.windows != 1 else ''}"
    return f"on {windows} of up to {length.tokens_per_window} tokens"


def run(args: argparse.Namespace) -> int:
    """Validate the state, then print its description as text or JSON."""
    from quantcache.analysis.state_report import config_text, index_ranges, layer_summaries, outlier_lines, range_table
    from quantcache.models.data import require_file
    from quantcache.state.file import FORMAT_NAME, check_state, open_state_file

    path = require_file(state_path(args.scales), "state file")
    stored = open_state_file(path)  # the checksum and the metadata
    check_state(stored, path)  # the validator that writing and loading use
    layers = layer_summaries(
        stored.tensors, stored.layer_names, stored.config, top=args.top, factor=args.outlier_factor
    )
    with_data = [layer["index"] for layer in layers if layer["quantized"]]
    report: dict[str, Any] = {
        "path": str(path),
        "valid": True,
        "format": FORMAT_NAME,
        "format_version": stored.format_version,
        "quantcache_version": stored.quantcache_version,
        "model_type": stored.model_type,
        "num_layers": stored.num_layers,
        "kv_heads": stored.kv_heads,
        "head_dim": stored.head_dim,
        "mode": stored.mode,
        "calibration": None if stored.calibration is None else stored.calibration.to_dict(),
        "config": stored.config.to_dict(),
        "quantized_layers": with_data,
        "num_tensors": len(stored.tensors),
        "bytes": sum(tensor.numel() * tensor.element_size() for tensor in stored.tensors.values()),
        "outlier_factor": args.outlier_factor,
        "layers": layers,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    facts = [
        ("format", f"{FORMAT_NAME} v{stored.format_version}, written by quantcache {stored.quantcache_version}"),
        ("model type", str(stored.model_type)),
        ("layers", f"{stored.num_layers} ({len(with_data)} quantized: {index_ranges(with_data)})"),
        ("kv_heads", str(stored.kv_heads)),
        ("head_dim", str(stored.head_dim)),
        ("config", config_text(stored.config)),
        ("mode", stored.mode),
        ("calibrated", _calibration_text(stored.calibration)),
        ("tensors", f"{report['num_tensors']} ({report['bytes'] / 1024:.1f} KiB)"),
    ]
    lines = [f"{path}: valid quantcache KV state"]
    lines += [f"  {label + ':':<12} {value}" for label, value in facts]
    lines += ["", range_table(layers), ""]
    outliers = outlier_lines(layers)
    lines.append(
        f"outlier channels (range > {args.outlier_factor:g}x the layer's median channel range, "
        f"top {args.top} per stream):" + ("" if outliers else " none")
    )
    lines += outliers
    print("\n".join(lines))
    return EXIT_OK
