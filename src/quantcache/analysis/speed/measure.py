"""Measuring one cache: the states every cache is filled with, a timed decode and prefill, the bytes it holds.

Every timed region is bracketed by :func:`synchronize` (a no-op off CUDA); the caches
themselves never synchronize.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import _vocab_size, model_device

__all__ = [
    "STATE_CHUNK",
    "decode_step_seconds",
    "fill",
    "kv_bytes",
    "prefill_seconds",
    "prefill_states",
    "random_ids",
    "release",
    "synchronize",
]

STATE_CHUNK = 512
"""Tokens per forward of the prefill that makes the states: bounds its attention's memory at long contexts."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device, *, full: bool = False) -> None:
    """Free what the last contender left, so the next one starts from the same memory.

    The caches hold no reference cycles (reference counting frees them), so between runs a
    young-generation collection suffices (~10 ms); a ``full`` one walks every object of the
    loaded libraries (~0.25 s), done once per context.
    """
    gc.collect(2 if full else 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_ids(model: nn.Module, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Seeded token ids of ``shape`` over the whole vocabulary, on the model's device."""
    config: Any = model.config
    vocab = _vocab_size(model) or int(config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=generator).to(model_device(model))


def prefill_states(
    model: nn.Module, context: int, *, seed: int = 0, chunk: int = STATE_CHUNK
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(keys, values)``, each ``(1, kv_heads, context, head_dim)``, after one real prefill.

    ``context`` seeded random token ids run through the model in chunks of ``chunk`` tokens
    into a ``DynamicCache`` made without the model's config, which keeps the whole history in
    every layer (sliding-window layers too); each cache under test then keeps what its own
    ``update`` keeps.
    """
    ids = random_ids(model, (1, context), seed)
    cache = DynamicCache()
    with torch.inference_mode():
        for start in range(0, context, chunk):
            model(ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache})
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def fill(cache: Any, states: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int) -> None:
    """Put ``states`` (batch 1, as :func:`prefill_states` gives) repeated over ``batch`` rows into ``cache``.

    Each layer receives ``(batch, kv_heads, context, head_dim)`` through the cache's own
    ``update``, as a prefill would hand them over. A ``StaticCache`` is also given the
    positions (``cache_kwargs``), which Transformers 4.x needs to place them.
    """
    with torch.no_grad():
        for index, (keys, values) in enumerate(states):
            rows_k, rows_v = keys.repeat(batch, 1, 1, 1), values.repeat(batch, 1, 1, 1)
            if isinstance(cache, StaticCache):
                positions = torch.arange(keys.shape[2], device=keys.device)
                cache.update(rows_k, rows_v, index, {"cache_position": positions})
            else:
                cache.update(rows_k, rows_v, index)


def decode_step_seconds(model: nn.Module, cache: Any, batch: int, steps: int, *, seed: int = 0) -> float:
    """Seconds per greedy decode step: ``steps`` steps of ``batch`` rows (one token each) continuing ``cache``."""
    device = model_device(model)
    token = random_ids(model, (batch, 1), seed)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, use_cache=True, **{CACHE_KEYWORD: cache}).logits[:, -1:].argmax(-1)
        synchronize(device)
    return (time.perf_counter() - start) / steps


def prefill_seconds(model: nn.Module, cache: Any, ids: torch.Tensor) -> float:
    """Seconds of one forward of ``ids`` ``(batch, context)`` into the empty ``cache`` (last logits only)."""
    device = model_device(model)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache})
        synchronize(device)
    return time.perf_counter() - start


_KV_PARTS = ("codes", "parameters", "full_precision", "reserved", "encoder")


def kv_bytes(cache: Any) -> tuple[int, dict[str, int] | None]:
    """Bytes of the key/value tensors ``cache`` holds, and for a quantized cache their split by part.

    A :class:`QuantizedCalibratingCache` is measured by its ``memory_report()`` (the sum of its
    layers' ``total``; parts: codes, parameters, full_precision, reserved, encoder). Any other
    cache is the ``numel * element_size`` of every layer's ``keys`` and ``values``: for a
    ``StaticCache`` that is its preallocated length, for a ``DynamicCache`` the tokens it holds.
    """
    if isinstance(cache, QuantizedCalibratingCache):
        report = cache.memory_report()
        parts = {part: sum(int(layer[part]) for layer in report) for part in _KV_PARTS}
        return sum(int(layer["total"]) for layer in report), parts
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total, None
