"""Queries for calibration: what a query-aware key stream weighs, recomputed from hidden states.

Attention hands the cache its keys and values, never its queries. A query-aware key
stream (:attr:`~quantcache.scheme.args.QuantArgs.query_aware`) needs their energy per
channel, so calibration asks the model for its hidden states (``output_hidden_states=True``:
the input of every decoder layer) and recomputes each layer's queries with the layer's
own modules: its ``input_layernorm``, ``q_proj`` and, where the architecture has one,
``q_norm`` (Qwen3, Gemma 3). Nothing is hooked or patched. RoPE is left out: the
statistics keep each RoPE pair's energy, which the rotation does not change, and a
constant query scaling (Gemma's ``query_pre_attn_scalar``) changes no channel's share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.errors import CalibrationError

__all__ = ["layer_queries", "observe_queries"]


def layer_queries(model: nn.Module, module_name: str, hidden_states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The ``(batch, heads, seq, head_dim)`` queries (before RoPE) of attention module ``module_name``.

    ``hidden_states`` is the ``(batch, seq, hidden)`` input of its decoder layer.
    """
    parent_name = module_name.rpartition(".")[0]
    attention: nn.Module | None = None
    layer: nn.Module | None = None
    with contextlib.suppress(AttributeError):
        attention, layer = model.get_submodule(module_name), model.get_submodule(parent_name)
    norm, projection = getattr(layer, "input_layernorm", None), getattr(attention, "q_proj", None)
    if not isinstance(norm, nn.Module) or not isinstance(projection, nn.Module):
        raise CalibrationError(
            f"query_aware keys recompute each layer's queries from its input_layernorm and q_proj, and "
            f"{type(model).__name__}'s {module_name!r} has no such modules (fused or other projections); "
            "use a scheme without query_aware for this model"
        )
    # On a model split across devices the hidden state may sit elsewhere (offloaded weights sit on "meta").
    device = next((p.device for p in norm.parameters() if p.device.type != "meta"), hidden_states.device)
    queries = projection(norm(hidden_states.to(device)))
    queries = queries.view(*queries.shape[:-1], -1, head_dim)
    query_norm = getattr(attention, "q_norm", None)
    if isinstance(query_norm, nn.Module):
        queries = query_norm(queries)
    transposed: torch.Tensor = queries.transpose(1, 2)
    return transposed


def observe_queries(cache: QuantizedCalibratingCache, model: nn.Module, hidden_states: Sequence[torch.Tensor]) -> None:
    """Fold the queries of one forward pass into ``cache``'s query-aware key statistics.

    Call it after ``outputs = model(ids, cache=cache, output_hidden_states=True)`` with
    ``outputs.hidden_states`` (the input of layer ``i`` at index ``i``), as
    :func:`quantcache.calibration.calibrate` does; pad positions are left out as the
    cache's :meth:`~quantcache.cache.cache.QuantizedCalibratingCache.set_attention_mask` says.
    """
    names = cache.layer_names
    if hidden_states is None or len(hidden_states) < len(names):
        found = "none" if hidden_states is None else len(hidden_states)
        raise CalibrationError(
            f"observe_queries needs the input of each of the {len(names)} decoder layers (run the model "
            f"with output_hidden_states=True); got {found} hidden states"
        )
    with torch.inference_mode():
        for index in cache.quantizer.query_layers:
            if cache.head_dim is None:
                raise CalibrationError(f"layer {index} ({names[index]}): query-aware keys need head_dim")
            cache.observe_queries(index, layer_queries(model, names[index], hidden_states[index], cache.head_dim))
