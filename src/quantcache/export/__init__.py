"""Deploy calibrated KV scales: export checkpoints that serving engines load, import theirs.

One module per format, one row per format in :data:`FORMATS`::

    from quantcache.export import export_checkpoint, import_checkpoint

    result = export_checkpoint("runs/smollm2", "deploy/smollm2-c8", format="ascend", model="path/to/hf-model")
    print(result.serve_command)           # vllm serve deploy/smollm2-c8 --quantization ascend
    cache = import_checkpoint("deploy/smollm2-c8", format="ascend").cache   # frozen, bit-exact for C8
    cache.save("runs/imported/kv_scales.safetensors")

Adding a format: write ``export/<name>.py`` with a :class:`~quantcache.export.common.KVFormat`
subclass and add its row here. This module imports nothing heavy, so ``quantcache export
--help`` can list the formats without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

__all__ = ["FORMATS", "FormatEntry", "export_checkpoint", "format_names", "get_format", "import_checkpoint"]

if TYPE_CHECKING:
    from .api import ImportResult
    from .common import ExportResult, KVFormat


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


def export_checkpoint(state: Any, destination: Any, *, format: str, **kwargs: Any) -> ExportResult:
    """Write a checkpoint ``format``'s engine loads as is; see :func:`quantcache.export.api.export_checkpoint`."""
    from .api import export_checkpoint as run

    return run(state, destination, format=format, **kwargs)


def import_checkpoint(checkpoint: Any, *, format: str, model: Any = None) -> ImportResult:
    """Read a checkpoint's KV scales into a frozen cache; see :func:`quantcache.export.api.import_checkpoint`."""
    from .api import import_checkpoint as run

    return run(checkpoint, format=format, model=model)
