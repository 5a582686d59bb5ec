"""What the cache needs to know about a Transformers model: its attention layers' names and shape.

Kept apart from the cache so the cache reads as storage and quantization only. Works
from a model or from its config (composite configs, such as Gemma 3's, give their
text decoder's).
"""

from __future__ import annotations

import hashlib
import json

import transformers
from torch import nn
from transformers import PretrainedConfig

__all__ = ["CACHE_KEYWORD", "attention_module_names", "attention_shape", "config_digest", "text_config"]

CACHE_KEYWORD = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
"""The keyword that hands a cache to ``model(...)`` / ``model.generate(...)``: transformers 5
renamed ``past_key_values`` to ``cache`` (the old name still works there, with a warning)."""


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config of a composite model config, else the config itself."""
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)  # type: ignore[no-any-return]
    except TypeError:  # older signature without ``decoder``
        return getter()  # type: ignore[no-any-return]


def attention_module_names(model: nn.Module, num_layers: int) -> list[str]:
    """Name of the attention module that owns each ``layer_idx``, as include/exclude see it.

    Transformers' attention modules carry their ``layer_idx``; the first module whose
    class is an attention class claims the index. Indices no module claims get the
    conventional ``model.layers.{i}.self_attn``.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and "attention" in type(module).__name__.lower():
            names.setdefault(layer_idx, name)
    return [names.get(index, f"model.layers.{index}.self_attn") for index in range(num_layers)]


def config_digest(config: PretrainedConfig) -> str | None:
    """sha256 of the model config's JSON (sorted keys), to tell which model a state was made for."""
    try:
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def attention_shape(text_config: PretrainedConfig) -> tuple[int | None, int | None]:
    """``(kv_heads, head_dim)`` declared by the config, ``None`` where it does not say."""
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None)
    hidden = getattr(text_config, "hidden_size", None)
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = hidden // heads
    return (kv_heads if isinstance(kv_heads, int) else None, head_dim if isinstance(head_dim, int) else None)
