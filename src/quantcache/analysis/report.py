"""Formatting for people: evaluation results, exclude suggestions and the ranges a state holds.

Nothing here measures quality; every function turns an
:class:`~quantcache.analysis.evaluation.EvaluationResult`, an
:class:`~quantcache.analysis.sensitivity.ExcludeSuggestion` or the min/max tensors of a saved
state into something to print or save (text, Markdown, JSON, YAML, a plot). The range
summaries (per-layer min/max and outlier channels) are computed here because they exist
only to be shown: ``quantcache calibrate`` writes them beside the state and
``quantcache inspect`` prints them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcache.scheme.args import QuantArgs, Rotation, Rounding, ScaleFormat, ZeroPointFormat
from quantcache.scheme.config import KVQuantConfig

if TYPE_CHECKING:
    import torch

    from quantcache.analysis.evaluation import EvaluationResult, LayerError
    from quantcache.analysis.sensitivity import ExcludeSuggestion

__all__ = [
    "RANGE_HEADER",
    "calibration_markdown",
    "config_text",
    "format_suggestion",
    "format_table",
    "index_ranges",
    "layer_summaries",
    "outlier_lines",
    "plot_layers",
    "range_rows",
    "range_table",
    "stream_summary",
    "suggestion_to_yaml",
    "to_json",
    "to_markdown",
]

_LAYER_HEADER = ("layer", "name", "K SQNR dB", "V SQNR dB", "K clip %", "V clip %")


def _db(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"


def _percent(fraction: float, digits: int = 3) -> str:
    return f"{fraction * 100:.{digits}f}"


def _summary_rows(result: EvaluationResult) -> list[tuple[str, str]]:
    return [
        ("PPL reference", f"{result.ppl_reference:.4f}"),
        ("PPL quantized", f"{result.ppl_quantized:.4f}"),
        ("PPL change", f"{result.ppl_relative_change * 100:+.3f} %"),
        ("mean KL", f"{result.kl_mean:.3e}"),
        ("top-1 agreement", f"{result.top1_agreement * 100:.2f} %"),
        ("effective bits", "n/a" if result.effective_bits is None else f"{result.effective_bits:.3f}"),
        ("tokens", str(result.num_tokens)),
    ]


def _settings_line(result: EvaluationResult) -> str:
    settings = result.settings
    parts = []
    if "num_windows" in settings and "window_length" in settings:
        parts.append(f"{settings['num_windows']} x {settings['window_length']} tokens")
    if "prefill" in settings:
        parts.append(f"prefill {settings['prefill']}")
    if "chunk" in settings:
        parts.append(f"chunks of {settings['chunk']}")
    qconfig = settings.get("config", {}).get("qconfig") if isinstance(settings.get("config"), dict) else None
    if isinstance(qconfig, dict):
        scheme = "symmetric" if qconfig.get("symmetric") else "asymmetric"
        parts.append(f"{qconfig.get('dtype', '?')} {qconfig.get('scope', '?')} {scheme}")
    return ", ".join(parts)


def _layer_row(layer: LayerError) -> tuple[str, ...]:
    if not layer.quantized:
        return (str(layer.index), layer.name, "-", "-", "-", "-")
    return (
        str(layer.index),
        layer.name,
        _db(layer.key_sqnr_db),
        _db(layer.value_sqnr_db),
        _percent(layer.key_clip_fraction),
        _percent(layer.value_clip_fraction),
    )


def _text_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, left: Sequence[int] = (1,), rule: bool = True
) -> str:
    """Fixed-width columns, right-aligned except ``left``; ``rule`` draws dashes under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if index in left else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rules = ["  ".join("-" * width for width in widths)] if rule else []
    return "\n".join([line(header), *rules, *(line(row) for row in rows)])


def format_table(result: EvaluationResult) -> str:
    """A fixed-width text table: the summary (PPL, change, KL, top-1), then one row per layer."""
    summary = _summary_rows(result)
    label_width = max(len(label) for label, _ in summary)
    value_width = max(len(value) for _, value in summary)
    lines = []
    settings = _settings_line(result)
    if settings:
        lines += [settings, ""]
    lines += [f"{label:<{label_width}}  {value:>{value_width}}" for label, value in summary]
    lines += ["", _text_table(_LAYER_HEADER, [_layer_row(layer) for layer in result.layers])]
    return "\n".join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str | None = None) -> str:
    """A Markdown table; ``align`` is one ``l``/``r`` per column, or ``None`` for the renderer's default."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    kinds = align if align is not None else "d" * len(header)
    rule = "|" + "|".join({"l": ":---", "r": "---:"}.get(kind, "---") for kind in kinds) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def to_markdown(result: EvaluationResult) -> str:
    """The same content as :func:`format_table` as a Markdown document."""
    lines = ["# KV-cache quantization quality", ""]
    settings = _settings_line(result)
    if settings:
        lines += [settings, ""]
    lines += [_markdown_table(("metric", "value"), _summary_rows(result), align="lr"), ""]
    lines += ["## Per-layer quantization error", ""]
    lines += [_markdown_table(_LAYER_HEADER, [_layer_row(layer) for layer in result.layers], align="llrrrr"), ""]
    return "\n".join(lines)


def to_json(result: EvaluationResult) -> str:
    """:meth:`EvaluationResult.to_dict` as strict JSON (infinite SQNR written as ``null``)."""
    return json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"


def plot_layers(result: EvaluationResult, path: str | Path) -> Path:
    """Save a two-panel figure (per-layer K/V SQNR; per-layer K/V clip %) to ``path``; returns it.

    Needs matplotlib (``pip install matplotlib``); uses the non-interactive Agg backend.
    Unquantized layers are left blank.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ModuleNotFoundError(
            "plotting needs matplotlib: pip install matplotlib (or pip install 'quantcache[plot]')",
            name="matplotlib",
        ) from error

    path = Path(path)
    layers = result.layers
    indices = [layer.index for layer in layers]

    def values(attribute: str, scale: float = 1.0) -> list[float]:
        out = []
        for layer in layers:
            value = float(getattr(layer, attribute))
            out.append(value * scale if layer.quantized and math.isfinite(value) else math.nan)
        return out

    width = 0.4
    left = [index - width / 2 for index in indices]
    right = [index + width / 2 for index in indices]
    figure, (sqnr_axis, clip_axis) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers) + 2), 6), sharex=True)
    try:
        sqnr_axis.bar(left, values("key_sqnr_db"), width, label="keys")
        sqnr_axis.bar(right, values("value_sqnr_db"), width, label="values")
        sqnr_axis.set_ylabel("SQNR (dB)")
        sqnr_axis.set_title(
            f"KV-cache quantization error per layer: PPL {result.ppl_relative_change * 100:+.2f} %, "
            f"mean KL {result.kl_mean:.2e}"
        )
        sqnr_axis.legend()
        sqnr_axis.grid(axis="y", alpha=0.3)
        clip_axis.bar(left, values("key_clip_fraction", 100.0), width, label="keys")
        clip_axis.bar(right, values("value_clip_fraction", 100.0), width, label="values")
        clip_axis.set_ylabel("clipped elements (%)")
        clip_axis.set_xlabel("layer")
        clip_axis.legend()
        clip_axis.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=120)
    finally:
        plt.close(figure)
    return path


def format_suggestion(suggestion: ExcludeSuggestion) -> str:
    """The sensitivity ranking and the suggested exclude list as terminal text."""
    excluded = set(suggestion.exclude)
    rows = [
        (
            str(rank),
            str(item.index),
            item.name,
            f"{item.kl_mean:.3e}",
            f"{item.ppl_relative_change * 100:+.3f}",
            "yes" if item.name in excluded else "",
        )
        for rank, item in enumerate(suggestion.ranking, start=1)
    ]
    header = ("rank", "layer", "name", "KL (alone)", "PPL % (alone)", "exclude")
    lines = [
        "Layer sensitivity (each layer quantized alone, most harmful first):",
        "",
        _text_table(header, rows, left=(2, 5)),
        "",
        f"KL budget:            {suggestion.kl_budget:.3e}",
        f"KL, all quantized:    {suggestion.kl_all_quantized:.3e}",
        f"KL, with exclusions:  {suggestion.kl_with_exclude:.3e}",
    ]
    if not suggestion.exclude:
        lines.append("All quantized layers fit the budget: nothing to exclude.")
    else:
        lines.append(f"Exclude {len(suggestion.exclude)} of {len(suggestion.ranking)} layers:")
        lines += [f"  - {name}" for name in suggestion.exclude]
    if not suggestion.met_budget:
        lines.append("The budget was NOT met.")
    elif suggestion.exclude and len(suggestion.exclude) == len(suggestion.ranking):
        lines.append("Every layer had to be excluded: the budget allows no KV-cache quantization.")
    return "\n".join(lines)


def suggestion_to_yaml(suggestion: ExcludeSuggestion, base_config: KVQuantConfig) -> str:
    """``base_config`` with the suggested layers added to ``exclude``, as an msModelSlim YAML processor item."""
    exclude = list(base_config.exclude)
    exclude += [name for name in suggestion.exclude if name not in exclude]
    config = replace(base_config, exclude=tuple(exclude))
    header = [
        "# KV-cache quantization config suggested by quantcache suggest-exclude:",
        f"# mean KL {suggestion.kl_all_quantized:.3e} with all layers quantized, "
        f"{suggestion.kl_with_exclude:.3e} with {len(suggestion.exclude)} excluded "
        f"(budget {suggestion.kl_budget:.3e}{'' if suggestion.met_budget else ', not met'})",
    ]
    return "\n".join(header) + "\n" + config.to_yaml()


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
    extras += ["keys before RoPE"] if config.pre_rope_keys else []
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
    return _text_table(RANGE_HEADER, range_rows(layers), rule=False)


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
        _markdown_table(["setting", "value"], facts),
        "",
        "## Per-layer ranges",
        "",
        "min/max over all channels; max/med: the widest channel range over the median channel range.",
        "",
        _markdown_table(RANGE_HEADER, range_rows(summary["layers"])),
        "",
    ]
    return "\n".join(lines)
