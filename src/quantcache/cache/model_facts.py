"""What the cache needs to know about a Transformers model: its attention layers' names and shape.

Kept apart from the cache so the cache reads as storage and quantization only. Works
from a model or from its config (composite configs, such as Gemma 3's, give their
text decoder's).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import transformers
from torch import nn
from transformers import PretrainedConfig

__all__ = [
    "CACHE_KEYWORD",
    "KV_CONFIG_KEYS",
    "attention_module_names",
    "attention_shape",
    "config_digest",
    "kv_config",
    "text_config",
]

KV_CONFIG_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "rope_local_base_freq",
    "layer_types",
    "sliding_window",
    "sliding_window_pattern",
    "attention_bias",
    "rms_norm_eps",
    "layer_norm_eps",
    "use_qk_norm",
    "qk_layernorm",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
)
"""Decoder config entries that change the keys and values a model hands its cache: head counts and
dims, RoPE and its scaling, which layers slide and how far, biases and norms. A state calibrated
for a model that differs in any of them does not fit this one."""

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


def max_positions(model_or_config: Any) -> int | None:
    """The positions a model (or its config) takes, ``max_position_embeddings`` of its decoder; ``None`` when
    the config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(text_config(config), "max_position_embeddings", None) if config is not None else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


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


_BOOKKEEPING_KEYS = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions"}
    | {"output_hidden_states", "return_dict", "_attn_implementation", "_attn_implementation_autoset"}
    | {"quantization_config"}
)
"""Config entries that say where a config came from or how it is run, not what the model is: a config
saved with ``save_pretrained`` and read back, the same model loaded in bf16, or its checkpoint exported
for an engine (which adds a ``quantization_config``) keeps its digest."""


def config_digest(config: PretrainedConfig, *, every_entry: bool = False) -> str | None:
    """sha256 of the model config's JSON (sorted keys), to tell which model a state was made for.

    Bookkeeping entries are left out (:data:`_BOOKKEEPING_KEYS`); ``every_entry`` keeps them, as
    states written before that did.
    """
    try:
        data = config.to_dict()
        if not every_entry:
            data = {key: value for key, value in data.items() if key not in _BOOKKEEPING_KEYS}
        text = json.dumps(data, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def kv_config(config: PretrainedConfig) -> dict[str, Any]:
    """The decoder config's :data:`KV_CONFIG_KEYS` that it sets, as plain JSON data (for a state file)."""
    decoder = text_config(config).to_dict()
    facts = {key: decoder[key] for key in KV_CONFIG_KEYS if decoder.get(key) is not None}
    try:
        return dict(json.loads(json.dumps(facts, sort_keys=True, default=str)))
    except (TypeError, ValueError):  # a config value JSON cannot hold: compare what can be held
        return {key: str(value) for key, value in facts.items()}


def attention_shape(text_config: PretrainedConfig) -> tuple[int | None, int | None]:
    """``(kv_heads, head_dim)`` declared by the config, ``None`` where it does not say."""
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None)
    hidden = getattr(text_config, "hidden_size", None)
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = hidden // heads
    return (kv_heads if isinstance(kv_heads, int) else None, head_dim if isinstance(head_dim, int) else None)
