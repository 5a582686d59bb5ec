"""Range summaries and tables of quantcache.analysis.report (what ``calibrate`` writes and ``inspect`` prints)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from quantcache import KVQuantConfig
from quantcache.analysis.state_report import (
    RANGE_HEADER,
    calibration_markdown,
    config_text,
    index_ranges,
    layer_summaries,
    outlier_lines,
    range_rows,
    range_table,
    stream_summary,
)


def ranges(widths: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min/max of one KV head whose channel ``i`` spans ``[-w/2, w/2]``."""
    half = torch.tensor(widths).reshape(1, -1) / 2
    return -half, half


def test_stream_summary_finds_outliers_widest_first() -> None:
    low, high = ranges([1, 1, 1, 1, 10, 1, 6, 1])
    summary = stream_summary(low, high, top=1, factor=4.0)
    assert summary["min"] == -5.0 and summary["max"] == 5.0 and summary["absmax"] == 5.0
    assert summary["median_channel_range"] == 1.0 and summary["max_channel_range"] == 10.0
    assert summary["outlier_channels"] == 2  # channels 4 and 6; only the widest is listed
    (outlier,) = summary["outliers"]
    assert (outlier["kv_head"], outlier["channel"], outlier["range"], outlier["ratio"]) == (0, 4, 10.0, 10.0)


def test_stream_summary_of_constant_channels_has_no_outliers() -> None:
    low, high = ranges([0, 0, 0, 0])
    summary = stream_summary(low, high, top=3, factor=4.0)
    assert summary["median_channel_range"] == 0 and summary["outliers"] == [] and summary["outlier_channels"] == 0


def two_layer_tensors() -> dict[str, torch.Tensor]:
    low, high = ranges([1, 1, 8, 1])
    return {"layers.1.key.min": low, "layers.1.key.max": high, "layers.1.value.min": low, "layers.1.value.max": high}


def test_layer_summaries_mark_layers_without_statistics() -> None:
    config = KVQuantConfig(exclude=("layer.0",))
    layers = layer_summaries(two_layer_tensors(), ["layer.0", "layer.1"], config)
    assert [(layer["index"], layer["quantized"], layer["key"] is None) for layer in layers] == [
        (0, False, True),
        (1, True, False),
    ]
    assert range_rows(layers) == [
        ["0", "layer.0", "-", "-", "-", "-", "-", "-"],
        ["1", "layer.1", "-4", "4", "8.0x", "-4", "4", "8.0x"],
    ]
    assert outlier_lines(layers) == [
        "  layer   1 key    head 0 ch 2 (8, 8.0x)",
        "  layer   1 value  head 0 ch 2 (8, 8.0x)",
    ]


def test_range_table_is_aligned_without_a_rule() -> None:
    layers = layer_summaries(two_layer_tensors(), ["layer.0", "layer.1"], KVQuantConfig())
    lines = range_table(layers).splitlines()
    assert lines[0].split() == [word for cell in RANGE_HEADER for word in cell.split()]
    assert lines[1].startswith("    0  layer.0") and not set(lines[1]) <= {"-", " "}
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("indices", "text"),
    [([], "none"), ([3], "3"), ([0, 1, 2, 5], "0-2, 5"), ([7, 1, 0, 8, 4], "0-1, 4, 7-8")],
)
def test_index_ranges(indices: list[int], text: str) -> None:
    assert index_ranges(indices) == text


def test_config_text() -> None:
    assert config_text(KVQuantConfig()) == "int8 per_channel symmetric minmax; include *; exclude -"
    config = KVQuantConfig(symmetric=False, exclude=("a", "b"))
    assert config_text(config) == "int8 per_channel asymmetric minmax; include *; exclude a, b"


def test_calibration_markdown_holds_the_settings_and_the_ranges() -> None:
    layers = layer_summaries(two_layer_tensors(), ["layer.0", "layer.1"], KVQuantConfig())
    summary: dict[str, Any] = {
        "scales": "kv_scales.safetensors",
        "model": "tiny",
        "model_type": "llama",
        "dtype": "float32",
        "device": "cpu",
        "num_layers": 2,
        "kv_heads": 1,
        "head_dim": 4,
        "data": {"source": "built-in corpus", "samples": 2, "seq_len": 8, "tokens": 16, "seed": 0},
        "config": KVQuantConfig(symmetric=False).to_dict(),
        "quantized_layers": [1],
        "seconds": {"calibrate": 1.25, "load_model": 0.5},
        "quantcache_version": "0.1.0",
        "created": "2025-01-01T00:00:00+00:00",
        "layers": layers,
    }
    markdown = calibration_markdown(summary)
    assert markdown.startswith("# KV-cache calibration: kv_scales.safetensors\n")
    assert "| config | int8 per_channel asymmetric minmax; include *; exclude - |" in markdown
    assert "| quantized layers | 1/2: 1 |" in markdown
    assert "| layer | module | key min |" in markdown and "|---|---|" in markdown
    assert "| 1 | layer.1 | -4 | 4 | 8.0x | -4 | 4 | 8.0x |" in markdown
