"""The export formats: one row per format, naming the module and class that implement it.

Imports nothing heavy, so ``quantcache export --help`` can list the formats without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

__all__ = ["FORMATS", "FormatEntry", "format_names", "get_format"]

if TYPE_CHECKING:
    from quantcache.export.common import KVFormat


class FormatEntry(NamedTuple):
    """Where a format's class lives, and what it is for (shown by ``quantcache export --help``)."""

    target: str
    summary: str


FORMATS: dict[str, FormatEntry] = {
    "ascend": FormatEntry(
        "quantcache.export.ascend:AscendFormat",
        "msModelSlim ascendv1 C8: per-channel INT8 scale + offset for vLLM-Ascend / MindIE (lossless)",
    ),
    "vllm": FormatEntry(
        "quantcache.export.vllm:VllmFormat",
        "compressed-tensors FP8 k_scale/v_scale, per tensor or per KV head, for vLLM",
    ),
    "modelopt": FormatEntry(
        "quantcache.export.modelopt:ModelOptFormat",
        "ModelOpt FP8 k_proj.k_scale/v_proj.v_scale + hf_quant_config.json for TensorRT-LLM",
    ),
}


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> KVFormat:
    """The format object registered as ``name``; an unknown name is a ConfigError listing the known ones."""
    entry = FORMATS.get(name)
    if entry is None:
        from quantcache.errors import ConfigError

        raise ConfigError(f"unknown export format {name!r}; choose one of: {', '.join(FORMATS)}")
    module_name, class_name = entry.target.split(":")
    format_class = getattr(importlib.import_module(module_name), class_name)
    instance: KVFormat = format_class()
    return instance
