"""Deploy calibrated KV scales: export checkpoints that serving engines load, import theirs.

One module per format, one row per format in :data:`FORMATS`::

    from quantcache.export import export_checkpoint, import_checkpoint

    result = export_checkpoint("runs/smollm2", "deploy/smollm2-c8", format="ascend", model="path/to/hf-model")
    print(result.serve_command)           # vllm serve deploy/smollm2-c8 --quantization ascend
    cache = import_checkpoint("deploy/smollm2-c8", format="ascend").cache   # frozen, bit-exact for C8
    cache.save("runs/imported/kv_scales.safetensors")

Adding a format: write ``export/<name>.py`` with a :class:`~quantcache.export.common.KVFormat`
subclass and add its row to :data:`~quantcache.export.registry.FORMATS`. This module imports
nothing heavy, so ``quantcache export --help`` can list the formats without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantcache.export.registry import FORMATS, FormatEntry, format_names, get_format

__all__ = ["FORMATS", "FormatEntry", "export_checkpoint", "format_names", "get_format", "import_checkpoint"]

if TYPE_CHECKING:
    from .api import ImportResult
    from .common import ExportResult


def export_checkpoint(state: Any, destination: Any, *, format: str, **kwargs: Any) -> ExportResult:
    """Write a checkpoint ``format``'s engine loads as is; see :func:`quantcache.export.api.export_checkpoint`."""
    from .api import export_checkpoint as run

    return run(state, destination, format=format, **kwargs)


def import_checkpoint(checkpoint: Any, *, format: str, model: Any = None) -> ImportResult:
    """Read a checkpoint's KV scales into a frozen cache; see :func:`quantcache.export.api.import_checkpoint`."""
    from .api import import_checkpoint as run

    return run(checkpoint, format=format, model=model)
