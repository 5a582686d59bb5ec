"""Calibration: run token windows through the model with caches of one quantizer, then freeze it.

:func:`calibrate` is the loop every user of :class:`~quantcache.cache.kv_quantizer.KVQuantizer`
would otherwise write by hand: one forward pass per batch of token ids, each into a new cache of
the quantizer (:meth:`~quantcache.cache.kv_quantizer.KVQuantizer.new_cache`), so the statistics
accumulate in the quantizer over all batches while no batch ever sees another batch's keys and
values as a prefix. The result is the quantizer, frozen (ready to make caches that quantize).
A scheme with query-aware keys also needs each layer's queries, which the loop
recomputes from the model's hidden states (:mod:`quantcache.calibration.queries`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.length_check import ContextLengthWarning, length_warning
from quantcache.calibration.queries import observe_queries
from quantcache.models.data import DataError
from quantcache.progress import progress_bar
from quantcache.scheme.config import KVQuantConfig

__all__ = ["calibrate", "check_token_batch", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _vocab_size(model: nn.Module) -> int | None:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        embeddings = getter()
        size = getattr(embeddings, "num_embeddings", None)
        if isinstance(size, int):
            return size
    return None


def check_token_batch(batch: Any, *, what: str = "data", vocab_size: int | None = None) -> torch.Tensor:
    """Validate one ``(batch, seq_len)`` tensor of token ids and return it as int64.

    Raises :class:`~quantcache.models.data.DataError` (a ``ValueError``) naming the problem:
    not a tensor, not two-dimensional, empty, not an integer dtype, or ids outside the
    model's vocabulary.
    """
    if not isinstance(batch, torch.Tensor):
        raise DataError(f"{what}: expected a torch.Tensor of token ids, got {type(batch).__name__}")
    if batch.dtype == torch.bool or batch.dtype.is_floating_point or batch.dtype.is_complex:
        raise DataError(f"{what}: token ids must be an integer tensor (int64), got dtype {batch.dtype}")
    if batch.dim() != 2:
        hint = " (use .unsqueeze(0) for a single sequence)" if batch.dim() == 1 else ""
        raise DataError(f"{what}: expected shape (num_samples, seq_len), got {tuple(batch.shape)}{hint}")
    if batch.shape[0] == 0 or batch.shape[1] == 0:
        raise DataError(f"{what}: empty token tensor of shape {tuple(batch.shape)}")
    low, high = int(batch.min()), int(batch.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
        raise DataError(
            f"{what}: token ids must be {limit} for this model, found values from {low} to {high}; "
            "was the data tokenized with another model's tokenizer?"
        )
    return batch.to(torch.int64)


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> tuple[Iterator[Any], int | None]:
    """Iterate over the batches of ``data``; also return the token total when it is known."""
    if isinstance(data, Mapping):  # one tokenizer output: a single padded batch
        return iter([data]), None
    if isinstance(data, torch.Tensor):
        if data.dim() == 2 and data.shape[0] > 0:
            return iter(torch.split(data, batch_size)), int(data.numel())
        return iter([data]), None  # validated (and rejected) by check_token_batch
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(
            f"data: expected an int64 tensor (num_samples, seq_len) or an iterable of such batches, "
            f"got {type(data).__name__}"
        )
    total: int | None = None
    if isinstance(data, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in data):
        total = sum(int(item.numel()) for item in data)
    return iter(data), total


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def calibrate(
    model: nn.Module,
    data: torch.Tensor | Iterable[torch.Tensor],
    *,
    quant_config: KVQuantConfig | None = None,
    quantizer: KVQuantizer | QuantizedCalibratingCache | None = None,
    batch_size: int = 1,
    freeze: bool = True,
    progress: bool = True,
    cache: KVQuantizer | QuantizedCalibratingCache | None = None,
    context: int | None = None,
) -> KVQuantizer:
    """Collect the KV statistics of ``data`` and return a (frozen) :class:`KVQuantizer`.

    Args:
        model: a Transformers causal LM; it is run in inference mode on its own device.
        data: int64 token ids, either one ``(num_samples, seq_len)`` tensor (split into
            batches of ``batch_size`` rows) or an iterable of ``(batch, seq_len)`` tensors
            (each one batch; ``batch_size`` is then ignored), or of mappings with
            ``input_ids`` and ``attention_mask`` (a tokenizer's padded output): padded
            positions are then left out of the statistics.
        quant_config: scheme and layer selection for a new quantizer (default: symmetric INT8
            on every layer). Give either this or ``quantizer``, or both if they agree.
        quantizer: a quantizer (or a cache of one) in calibrate mode whose statistics
            calibration continues from. It is not modified: the result is a copy.
        batch_size: rows per forward pass when ``data`` is one tensor.
        freeze: freeze the result (compute the INT8 parameters); ``False`` leaves it in
            calibrate mode so more data can be added with another call.
        progress: show progress on stderr (tokens/s, ETA): a live bar on a terminal, a few
            plain lines when stderr is a file or a pipe.
        cache: the earlier name of ``quantizer``.
        context: the longest context the model will serve with this calibration, if known. A scheme
            whose key ranges do not hold past the calibration length (``quant_config.length_safe``
            false: the seed) gets one :class:`~quantcache.calibration.length_check.ContextLengthWarning`
            when the windows are a quarter of it or less (of ``max_position_embeddings`` without it).

    Returns:
        The quantizer holding the accumulated statistics, frozen unless ``freeze=False``;
        ``quantizer.new_cache(storage=...)`` makes a cache for each conversation. It records how long
        the windows were (``quantizer.calibration_length``: the longest row's tokens, padding
        included, and the number of rows, added to those of a ``quantizer`` continued from), which
        ``save()`` writes with the state and ``quantcache evaluate`` takes as its default context.

    Raises:
        quantcache.models.data.DataError: (a ``ValueError``) for data of the wrong type, dtype or
            shape, empty data, or token ids outside the model's vocabulary.
        ValueError: for a bad ``batch_size`` or a ``quantizer`` that is frozen or disagrees with ``quant_config``.
        quantcache.CalibrationError: when freezing fails (e.g. a layer never observed).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ValueError(f"context must be a positive integer (tokens) or None, got {context!r}")
    if cache is not None:
        if quantizer is not None:
            raise TypeError("pass the quantizer to continue from as quantizer= only (cache= is its earlier name)")
        quantizer = cache
    if quantizer is None:
        stats = KVQuantizer(model, quant_config)
    else:
        if isinstance(quantizer, QuantizedCalibratingCache):
            quantizer = quantizer.quantizer
        if not isinstance(quantizer, KVQuantizer):
            raise TypeError(f"quantizer must be a KVQuantizer, got {type(quantizer).__name__}")
        if quant_config is not None and quant_config != quantizer.quant_config:
            raise ValueError(
                "quant_config and quantizer.quant_config differ; pass only one of them "
                f"(quantizer: {quantizer.quant_config.to_dict()}, quant_config: {quant_config.to_dict()})"
            )
        if quantizer.is_frozen:
            raise ValueError(
                "the quantizer is frozen, so it would quantize instead of calibrating; call unfreeze() "
                "to add data to its statistics, or pass quant_config= to start afresh"
            )
        stats = quantizer.copy()

    device = model_device(model)
    vocab_size = _vocab_size(model)
    forward_kwargs: dict[str, Any] = {"use_cache": True}
    needs_queries = stats.observes_queries
    if needs_queries:
        forward_kwargs["output_hidden_states"] = True
    if _accepts_logits_to_keep(model):
        forward_kwargs["logits_to_keep"] = 1  # calibration needs the KV states, not the logits
    batches, total = _batches(data, batch_size)
    seen_batches = 0
    was_training = model.training
    model.eval()
    bar = progress_bar(total, "calibrate", progress)
    try:
        with torch.inference_mode():
            for batch in batches:
                mask = None
                if isinstance(batch, Mapping):  # {"input_ids": ..., "attention_mask": ...}, e.g. a tokenizer's output
                    mask = batch.get("attention_mask")
                    batch = batch["input_ids"]
                ids = check_token_batch(batch, what=f"data batch {seen_batches}", vocab_size=vocab_size)
                run = stats.new_cache()  # the quantizer's statistics, no KV content from earlier batches
                masked: dict[str, torch.Tensor] = {}
                if mask is not None:  # real tokens keep the positions they would have unpadded
                    mask = mask.to(device)
                    masked = {"attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
                run.set_attention_mask(mask)
                outputs = model(ids.to(device), **{CACHE_KEYWORD: run}, **masked, **forward_kwargs)
                if needs_queries:
                    observe_queries(run, model, outputs.hidden_states)
                seen_batches += 1
                bar.update(int(ids.numel()))
    finally:
        bar.close()
        model.train(was_training)
    if seen_batches == 0:
        raise DataError("data: no batches to calibrate on (the iterable was empty)")

    stats.detach_statistics()
    if freeze:
        stats.freeze()
    longest = stats.calibration_tokens or 0
    message = length_warning(stats.quant_config, getattr(model, "config", None), longest, context)
    if message is not None:
        warnings.warn(message, ContextLengthWarning, stacklevel=2)
    return stats
