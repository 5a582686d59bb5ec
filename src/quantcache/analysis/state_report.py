"""Formatting for people: what a saved state holds (its config, per-layer ranges, outlier channels).

The range summaries are computed here because they exist only to be shown: ``quantcache
calibrate`` writes them beside the state and ``quantcache inspect`` prints them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from quantcache.analysis.report import markdown_table, text_table
from quantcache.scheme.args import QuantArgs, Rotation, Rounding, ScaleFormat, ZeroPointFormat
from quantcache.scheme.config import KVQuantConfig

if TYPE_CHECKING:
    import torch

__all__ = [
    "RANGE_HEADER",
    "calibration_markdown",
    "config_text",
    "index_ranges",
    "layer_summaries",
    "outlier_lines",
    "range_rows",
    "range_table",
    "stream_summary",
]


# ---------------------------------------------------------------------------- ranges of a saved state
STREAMS = ("key", "value")

RANGE_HEADER = ("layer", "module", "key min", "key max", "key max/med", "value min", "value max", "value max/med")
"""Columns of :func:`range_rows`: per stream the smallest min, the largest max and how far the
widest channel range exceeds the median one (the outlier ratio)."""


def _float(value: torch.Tensor | float) -> float:
    return float(value.item()) if not isinstance(value, (int, float)) else float(value)


def stream_summary(low: torch.Tensor, high: torch.Tensor, *, top: int, factor: float) -> dict[str, Any]:
    """Range of one key or value stream and its outlier channels (range > ``factor`` x the median channel range).

    ``low``/``high`` are the per-channel min/max, ``(kv_heads, head_dim)``; outliers are
    listed widest first, at most ``top``, and ``outlier_channels`` counts all of them.
    Outlier channels are what makes a per-tensor scale lose precision, so they are the
    first thing to look at when a layer quantizes badly.
    """
    import torch

    low, high = low.detach().float().cpu(), high.detach().float().cpu()
    ranges = high - low
    median = _float(ranges.flatten().median())
    outliers: list[dict[str, Any]] = []
    if median > 0:
        flat = ranges.flatten()
        order = torch.argsort(flat, descending=True)
        head_dim = ranges.shape[-1] if ranges.dim() == 2 else flat.numel()
        for position in order.tolist():
            value = _float(flat[position])
            if value <= factor * median or len(outliers) >= top:
                break
            outliers.append(
                {
                    "kv_head": position // head_dim,
                    "channel": position % head_dim,
                    "min": _float(low.flatten()[position]),
                    "max": _float(high.flatten()[position]),
                    "range": value,
                    "ratio": value / median,
                }
            )
    count = int((ranges > factor * median).sum().item()) if median > 0 else 0
    return {
        "min": _float(low.min()),
        "max": _float(high.max()),
        "absmax": max(abs(_float(low.min())), abs(_float(high.max()))),
        "median_channel_range": median,
        "max_channel_range": _float(ranges.max()),
        "outlier_channels": count,
        "outliers": outliers,
    }


def layer_summaries(
    tensors: Mapping[str, torch.Tensor],
    layer_names: Sequence[str],
    config: KVQuantConfig,
    *,
    top: int = 3,
    factor: float = 4.0,
) -> list[dict[str, Any]]:
    """One entry per layer: index, module name, whether the config quantizes it, and a
    :func:`stream_summary` per stream (``None`` for a stream without min/max tensors)."""
    layers: list[dict[str, Any]] = []
    for index, name in enumerate(layer_names):
        entry: dict[str, Any] = {"index": index, "name": name, "quantized": config.is_quantized(name)}
        for stream in STREAMS:
            low = tensors.get(f"layers.{index}.{stream}.min")
            high = tensors.get(f"layers.{index}.{stream}.max")
            entry[stream] = None if low is None or high is None else stream_summary(low, high, top=top, factor=factor)
        layers.append(entry)
    return layers


def config_text(config: KVQuantConfig) -> str:
    """The scheme on one line: ``int8 per_channel symmetric minmax; include *; exclude -``.

    Streams that differ are shown apart (``keys ...; values ...``); dynamic, rotated and
    centred streams, sink tokens, the residual window, keys quantized before RoPE and per-layer
    overrides are named when present.
    """
    key, value = config.key_args, config.value_args
    streams = _stream_text(key) if key == value else f"keys {_stream_text(key)}; values {_stream_text(value)}"
    extras = [f"sink_tokens {config.sink_tokens}"] if config.sink_tokens else []
    extras += [f"residual_window {config.residual_window}"] if config.residual_window else []
    extras += [f"residual_block {config.residual_block}"] if config.residual_block > 1 else []
    extras += ["keys before RoPE"] if config.pre_rope_keys else []
    extras += ["keys after RoPE around a turned center"] if config.rope_center else []
    extras += [f"{len(config.layers)} per-layer override(s)"] if config.layers else []
    exclude = ", ".join(config.exclude) or "-"
    return "; ".join([streams, *extras, f"include {', '.join(config.include)}", f"exclude {exclude}"])


def _stream_text(args: QuantArgs) -> str:
    kind = ("symmetric" if args.zero_level else "mid-rise") if args.symmetric else "asymmetric"
    words = [args.dtype.value, args.scope.value, kind, args.method.value]
    words += ["dynamic"] if args.dynamic else []
    words += [args.rotation.value] if args.rotation is not Rotation.NONE else []
    words += ["centred"] if args.center else []
    words += ["query-aware"] if args.query_aware else []
    words += ["query-aware rounding"] if args.rounding is Rounding.QUERY_AWARE else []
    words += [f"{args.scale_format.value} scales"] if args.scale_format is not ScaleFormat.FLOAT16 else []
    one_byte_zero_points = args.zero_point_format is not ZeroPointFormat.INT16
    words += [f"{args.zero_point_format.value} zero points"] if one_byte_zero_points else []
    return " ".join(words)


def index_ranges(indices: Sequence[int]) -> str:
    """Layer indices compactly: ``[0, 1, 2, 5]`` -> ``'0-2, 5'`` (``'none'`` for no index)."""
    parts: list[str] = []
    start: int | None = None
    previous: int | None = None
    for index in [*sorted(indices), None]:
        if index is not None and previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None and previous is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ", ".join(parts) or "none"


def range_rows(layers: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The cells of the per-layer range table (:data:`RANGE_HEADER`), ``-`` where a layer has no data."""
    rows: list[list[str]] = []
    for layer in layers:
        row = [str(layer["index"]), layer["name"]]
        for stream in STREAMS:
            summary = layer[stream]
            if summary is None:
                row += ["-", "-", "-"]
            else:
                row += [
                    f"{summary['min']:.4g}",
                    f"{summary['max']:.4g}",
                    f"{summary['max_channel_range'] / summary['median_channel_range']:.1f}x"
                    if summary["median_channel_range"] > 0
                    else "-",
                ]
        rows.append(row)
    return rows


def range_table(layers: Sequence[Mapping[str, Any]]) -> str:
    """The per-layer ranges as a fixed-width text table (for a terminal)."""
    return text_table(RANGE_HEADER, range_rows(layers), rule=False)


def outlier_lines(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """One indented line per stream that has outlier channels, widest first, with a count of the rest."""
    lines: list[str] = []
    for layer in layers:
        for stream in STREAMS:
            summary = layer[stream]
            if not summary or not summary["outliers"]:
                continue
            listed = ", ".join(
                f"head {item['kv_head']} ch {item['channel']} ({item['range']:.3g}, {item['ratio']:.1f}x)"
                for item in summary["outliers"]
            )
            more = summary["outlier_channels"] - len(summary["outliers"])
            lines.append(f"  layer {layer['index']:>3} {stream:<5}  {listed}{f' (+{more} more)' if more > 0 else ''}")
    return lines


def calibration_markdown(summary: Mapping[str, Any]) -> str:
    """The Markdown summary ``quantcache calibrate`` writes beside a state, from its JSON summary."""
    data, seconds = summary["data"], summary["seconds"]
    config = KVQuantConfig.from_dict(summary["config"])
    quantized = summary["quantized_layers"]
    facts = [
        ["model", f"{summary['model']} ({summary['model_type']}), {summary['dtype']} on {summary['device']}"],
        ["shape", f"{summary['num_layers']} layers, {summary['kv_heads']} KV heads x {summary['head_dim']} channels"],
        ["data", str(data["source"])],
        ["windows", f"{data['samples']} x {data['seq_len']} tokens ({data['tokens']}), seed {data['seed']}"],
        ["config", config_text(config)],
        ["quantized layers", f"{len(quantized)}/{summary['num_layers']}: {index_ranges(quantized)}"],
        ["time", f"{seconds['calibrate']:.1f} s calibration, {seconds['load_model']:.1f} s model load"],
        ["quantcache", f"{summary['quantcache_version']}, {summary['created']}"],
    ]
    lines = [
        f"# KV-cache calibration: {summary['scales']}",
        "",
        markdown_table(["setting", "value"], facts),
        "",
        "## Per-layer ranges",
        "",
        "min/max over all channels; max/med: the widest channel range over the median channel range.",
        "",
        markdown_table(RANGE_HEADER, range_rows(summary["layers"])),
        "",
    ]
    return "\n".join(lines)
