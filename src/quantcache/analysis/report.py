"""Formatting for people: evaluation results and exclude suggestions.

Nothing here measures quality; every function turns an
:class:`~quantcache.analysis.evaluation.EvaluationResult` or an
:class:`~quantcache.analysis.sensitivity.ExcludeSuggestion` into something to print or save
(text, Markdown, JSON, YAML, a plot). What a saved state holds is shown by
:mod:`quantcache.analysis.state_report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from quantcache.scheme.config import KVQuantConfig

if TYPE_CHECKING:

    from quantcache.analysis.evaluation import EvaluationResult, LayerError
    from quantcache.analysis.generation_check import GenerationCheck
    from quantcache.analysis.sensitivity import ExcludeSuggestion

__all__ = [
    "format_suggestion",
    "format_table",
    "generation_line",
    "long_context_line",
    "markdown_table",
    "plot_layers",
    "suggestion_to_yaml",
    "text_table",
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
    numerics = settings.get("numerics")
    if isinstance(numerics, str) and numerics != "quantcache":
        parts.append(f"as served by {numerics}")
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


def text_table(
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


def long_context_line(result: EvaluationResult) -> str:
    """One line for an evaluation at a longer context: ``at 4096 tokens: ΔPPL +0.120 %, KL 3.1e-03, top-1 ...``."""
    settings = result.settings
    length, windows = settings.get("window_length", "?"), settings.get("num_windows", "?")
    return (
        f"at {length} tokens: ΔPPL {result.ppl_relative_change * 100:+.3f} %, KL {result.kl_mean:.3e}, "
        f"top-1 {result.top1_agreement * 100:.2f} % ({windows} window{'' if windows == 1 else 's'})"
    )


def generation_line(check: GenerationCheck) -> str:
    """One line for a generation check: ``same answer: 7/8, first difference at token 23.0 on average ...``."""
    line = f"same answer: {check.same}/{check.total}"
    mean = check.mean_first_difference
    if mean is not None:
        line += f", first difference at token {mean:.1f} on average"
    return line + f" (greedy, up to {check.new_tokens} new tokens per chat prompt)"


def format_table(
    result: EvaluationResult,
    *,
    long_context: EvaluationResult | None = None,
    generation: GenerationCheck | None = None,
) -> str:
    """A fixed-width text table: the summary (PPL, change, KL, top-1), then one row per layer.

    ``long_context`` (an evaluation at a longer context) and ``generation`` (a generation
    check) add a line each under the summary.
    """
    summary = _summary_rows(result)
    label_width = max(len(label) for label, _ in summary)
    value_width = max(len(value) for _, value in summary)
    lines = []
    settings = _settings_line(result)
    if settings:
        lines += [settings, ""]
    lines += [f"{label:<{label_width}}  {value:>{value_width}}" for label, value in summary]
    extra = [long_context_line(long_context)] if long_context is not None else []
    extra += [generation_line(generation)] if generation is not None else []
    lines += ["", *extra] if extra else []
    lines += ["", text_table(_LAYER_HEADER, [_layer_row(layer) for layer in result.layers])]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str | None = None) -> str:
    """A Markdown table; ``align`` is one ``l``/``r`` per column, or ``None`` for the renderer's default."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    kinds = align if align is not None else "d" * len(header)
    rule = "|" + "|".join({"l": ":---", "r": "---:"}.get(kind, "---") for kind in kinds) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def to_markdown(
    result: EvaluationResult,
    *,
    long_context: EvaluationResult | None = None,
    generation: GenerationCheck | None = None,
) -> str:
    """The same content as :func:`format_table` as a Markdown document (with the generation check per prompt kind)."""
    lines = ["# KV-cache quantization quality", ""]
    settings = _settings_line(result)
    if settings:
        lines += [settings, ""]
    lines += [markdown_table(("metric", "value"), _summary_rows(result), align="lr"), ""]
    if long_context is not None:
        lines += [f"Longer context: {long_context_line(long_context)}.", ""]
    if generation is not None:
        lines += ["## Answers to chat prompts", "", f"{generation_line(generation)}.", ""]
        rows = [
            (
                kind,
                f"{entry['same']}/{entry['prompts']}",
                "-" if entry["mean_first_difference"] is None else f"{entry['mean_first_difference']:.1f}",
            )
            for kind, entry in generation.by_kind().items()
        ]
        lines += [markdown_table(("prompt kind", "same answer", "first difference at token"), rows, align="lrr"), ""]
    lines += ["## Per-layer quantization error", ""]
    lines += [markdown_table(_LAYER_HEADER, [_layer_row(layer) for layer in result.layers], align="llrrrr"), ""]
    return "\n".join(lines)


def to_json(
    result: EvaluationResult,
    *,
    long_context: EvaluationResult | None = None,
    generation: GenerationCheck | None = None,
    notes: Sequence[str] | None = None,
) -> str:
    """:meth:`EvaluationResult.to_dict` as strict JSON (infinite SQNR written as ``null``).

    With ``notes`` given (``quantcache evaluate`` always gives them), the document also holds
    ``long_context`` (the longer evaluation's ``to_dict``, or ``null``), ``generation`` (the
    generation check's, or ``null``) and ``notes``; otherwise only what is given is added.
    """
    data = result.to_dict()
    if long_context is not None or notes is not None:
        data["long_context"] = None if long_context is None else long_context.to_dict()
    if generation is not None or notes is not None:
        data["generation"] = None if generation is None else generation.to_dict()
    if notes is not None:
        data["notes"] = list(notes)
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


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
        text_table(header, rows, left=(2, 5)),
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
