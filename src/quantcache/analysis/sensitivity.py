"""Which layers a quantized cache hurts most: per-layer sensitivity and an exclude list for a KL budget.

:func:`layer_sensitivity` quantizes one layer at a time (everything else unquantized) and
measures, with :mod:`quantcache.analysis.evaluation`'s protocol, how far each moves the model;
:func:`suggest_exclude` turns that ranking into an exclude list that meets a KL budget.
The reference run's log-probabilities are stored (on the CPU) when they fit in
:data:`REFERENCE_STORE_BYTES`, because one reference pass then serves every layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcache.analysis.evaluation import (
    _check_inputs,
    _chunk_bounds,
    _ChunkReference,
    _finite_or_none,
    _forward_chunks,
    _progress,
    _reference_cache,
    _TokenMetrics,
    as_cache,
)
from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.calibration.calibrate import _vocab_size, model_device

__all__ = ["REFERENCE_STORE_BYTES", "ExcludeSuggestion", "LayerSensitivity", "layer_sensitivity", "suggest_exclude"]

REFERENCE_STORE_BYTES = 4 << 30
"""Largest size of stored reference log-probabilities (float32, on the CPU) for the
sensitivity search; above it the reference run is recomputed next to each quantized run."""


@dataclass
class LayerSensitivity:
    """The quality cost of quantizing one layer alone."""

    index: int
    name: str
    kl_mean: float
    ppl_relative_change: float

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(asdict(self))  # type: ignore[no-any-return]


@dataclass
class ExcludeSuggestion:
    """Layers to leave unquantized so that the mean KL stays within ``kl_budget``.

    ``ranking`` is every quantized layer, most sensitive first; ``exclude`` the attention
    module names to add to ``KVQuantConfig.exclude`` (most sensitive first);
    ``kl_with_exclude`` the measured KL with them excluded (0 when every layer is).
    """

    ranking: list[LayerSensitivity]
    exclude: list[str]
    kl_all_quantized: float
    kl_with_exclude: float
    kl_budget: float
    met_budget: bool

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(asdict(self))  # type: ignore[no-any-return]


class _Reference:
    """The reference run of every window, stored (CPU, float32) when it fits, else recomputed."""

    def __init__(
        self, model: nn.Module, windows: torch.Tensor, bounds: Sequence[tuple[int, int]], *, store: bool
    ) -> None:
        self.model = model
        self.windows = windows
        self.bounds = bounds
        self.device = model_device(model)
        self.stored: list[list[_ChunkReference]] | None = None
        if store:
            self.stored = [list(self._compute(index, torch.device("cpu"))) for index in range(windows.shape[0])]

    def _compute(self, index: int, device: torch.device) -> Iterator[_ChunkReference]:
        window = self.windows[index].unsqueeze(0).to(self.device)
        for logits, targets in _forward_chunks(self.model, window, _reference_cache(self.model), self.bounds):
            yield _ChunkReference.from_logits(logits, targets).to(device)

    def chunks(self, index: int) -> Iterator[_ChunkReference]:
        if self.stored is None:
            yield from self._compute(index, self.device)
        else:
            for stored in self.stored[index]:
                yield stored.to(self.device)

    @staticmethod
    def fits(model: nn.Module, windows: torch.Tensor) -> bool:
        vocab = _vocab_size(model) or 0
        config = getattr(model, "config", None)
        vocab = max(vocab, int(getattr(config, "vocab_size", 0) or 0))
        needed = 4 * vocab * int(windows.shape[0]) * (int(windows.shape[1]) - 1)
        return needed <= REFERENCE_STORE_BYTES


def _metrics_with(
    model: nn.Module,
    cache: QuantizedCalibratingCache,
    reference: _Reference,
    on_tokens: Callable[[int], object],
) -> _TokenMetrics:
    """Mean-KL and perplexity of ``cache`` (frozen, any layers enabled) against the reference runs."""
    metrics = _TokenMetrics()
    for index in range(reference.windows.shape[0]):
        window = reference.windows[index].unsqueeze(0).to(reference.device)
        quantized_run = _forward_chunks(model, window, cache.empty_copy(), reference.bounds)
        for chunk_reference, (logits, targets) in zip(reference.chunks(index), quantized_run, strict=True):
            metrics.add(chunk_reference, logits, targets)
        on_tokens(int(window.numel()))
    return metrics


def _with_enabled(cache: QuantizedCalibratingCache, enabled: set[int]) -> QuantizedCalibratingCache:
    """An empty cache that quantizes only the layers in ``enabled`` with ``cache``'s parameters (left as they are)."""
    return cache.quantizer.restricted_to(sorted(enabled)).new_cache(storage=cache.storage)


def _sensitivity(
    model: nn.Module, cache: QuantizedCalibratingCache, reference: _Reference, on_tokens: Callable[[int], object]
) -> list[LayerSensitivity]:
    ranking = []
    for index, name in _quantized(cache):
        metrics = _metrics_with(model, _with_enabled(cache, {index}), reference, on_tokens)
        ranking.append(
            LayerSensitivity(
                index=index,
                name=name,
                kl_mean=metrics.kl_mean,
                ppl_relative_change=metrics.ppl_quantized / metrics.ppl_reference - 1.0,
            )
        )
    ranking.sort(key=lambda item: (-item.kl_mean, item.index))
    return ranking


def _quantized(cache: QuantizedCalibratingCache) -> list[tuple[int, str]]:
    """``(index, name)`` of the layers ``cache`` quantizes."""
    return [(index, cache.layer_names[index]) for index in cache.quantized_layers]


def _run_search(
    model: nn.Module,
    cache: QuantizedCalibratingCache,
    windows: torch.Tensor,
    prefill: int,
    chunk: int,
    passes: int,
    progress: bool,
    desc: str,
    body: Callable[[_Reference, tqdm[Any]], Any],
) -> Any:
    windows = _check_inputs(model, cache, windows, prefill, chunk)
    bounds = _chunk_bounds(int(windows.shape[1]), prefill, chunk)
    store = _Reference.fits(model, windows)
    was_training = model.training
    model.eval()
    # Progress counts tokens of quantized passes; the stored reference adds one more pass.
    bar = _progress(int(windows.numel()) * (passes + (1 if store else 0)), desc, progress)
    try:
        with torch.inference_mode():
            reference = _Reference(model, windows, bounds, store=store)
            if store:
                bar.update(int(windows.numel()))
            return body(reference, bar)
    finally:
        bar.close()
        model.train(was_training)


def layer_sensitivity(
    model: nn.Module,
    cache: KVQuantizer | QuantizedCalibratingCache,
    windows: torch.Tensor,
    *,
    prefill: int = 256,
    chunk: int = 32,
    progress: bool = True,
) -> list[LayerSensitivity]:
    """Evaluate each quantized layer of ``cache`` alone (every other layer unquantized), most harmful first.

    One entry per layer the cache quantizes, sorted by mean KL, descending. The reference
    run of each window is computed once and shared by all layers (stored on the CPU when
    it fits in :data:`REFERENCE_STORE_BYTES`). ``cache`` is not modified.
    """
    cache = as_cache(cache)

    def body(reference: _Reference, bar: tqdm[Any]) -> list[LayerSensitivity]:
        return _sensitivity(model, cache, reference, bar.update)

    result: list[LayerSensitivity] = _run_search(
        model, cache, windows, prefill, chunk, len(_quantized(cache)), progress, "layer sensitivity", body
    )
    return result


def suggest_exclude(
    model: nn.Module,
    cache: KVQuantizer | QuantizedCalibratingCache,
    windows: torch.Tensor,
    *,
    kl_budget: float,
    prefill: int = 256,
    chunk: int = 32,
    progress: bool = True,
) -> ExcludeSuggestion:
    """The fewest most-sensitive layers to exclude so that the mean KL is at most ``kl_budget``.

    Ranks the quantized layers with :func:`layer_sensitivity`, measures the KL with all of
    them quantized, then excludes layers greedily, most sensitive first, re-measuring the
    combined KL after each, until it is within the budget or every layer is excluded (KL 0).
    """
    cache = as_cache(cache)
    if isinstance(kl_budget, bool) or not isinstance(kl_budget, (int, float)) or not kl_budget >= 0:
        raise ValueError(f"kl_budget must be a non-negative number, got {kl_budget!r}")
    quantized = set(cache.quantized_layers)

    def body(reference: _Reference, bar: tqdm[Any]) -> ExcludeSuggestion:
        ranking = _sensitivity(model, cache, reference, bar.update)
        kl_all = _metrics_with(model, _with_enabled(cache, quantized), reference, bar.update).kl_mean
        exclude: list[str] = []
        remaining = set(quantized)
        kl = kl_all
        for layer in ranking:
            if kl <= kl_budget:
                break
            exclude.append(layer.name)
            remaining.discard(layer.index)
            if not remaining:
                kl = 0.0  # nothing quantized: the run is the reference
                break
            bar.total = (bar.total or 0) + int(reference.windows.numel())  # one more pass
            bar.refresh()
            kl = _metrics_with(model, _with_enabled(cache, remaining), reference, bar.update).kl_mean
        return ExcludeSuggestion(
            ranking=ranking,
            exclude=exclude,
            kl_all_quantized=kl_all,
            kl_with_exclude=kl,
            kl_budget=float(kl_budget),
            met_budget=kl <= kl_budget,
        )

    # Passes: one per layer, one all-quantized; the greedy steps are not known in advance.
    suggestion: ExcludeSuggestion = _run_search(
        model, cache, windows, prefill, chunk, len(quantized) + 1, progress, "suggest exclude", body
    )
    return suggestion
