"""Quality of a frozen quantized cache, measured the way a cache is used in generation.

:func:`evaluate` runs every window twice in lockstep: once with a plain ``DynamicCache``
(the reference) and once with an empty copy of the quantized cache. Both runs first
prefill a prompt, then continue in chunks of a few tokens, each chunk a forward call
that reads the keys and values cached so far, exactly as decoding does. Quantization
error therefore reaches the model only through the cache, and it compounds across
chunks as it would in generation. Compared token by token (every position predicts the
next token, the prefill included): perplexity of both runs, the KL divergence of the
quantized run's next-token distribution from the reference one, and how often both pick
the same top token. Per layer it measures, on the very key/value states the quantized
run feeds to that layer, the signal-to-quantization-noise ratio and the fraction of
elements that saturate the INT8 range.

Logits are never kept for a whole window, only for the chunk at hand. The per-layer
sensitivity search that builds on this protocol is :mod:`quantcache.analysis.sensitivity`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from quantcache.cache.cache import QuantizationEvent, QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD, text_config
from quantcache.calibration.calibrate import _vocab_size, check_token_batch, model_device
from quantcache.errors import CalibrationError
from quantcache.progress import progress_bar

__all__ = ["EvaluationResult", "LayerError", "evaluate"]


# ---------------------------------------------------------------------------- results
@dataclass
class LayerError:
    """Quantization error of one layer's key and value states during an evaluation.

    ``key_sqnr_db``/``value_sqnr_db`` are ``10 log10(sum x^2 / sum (x - fq(x))^2)`` over
    every element the quantized run stored; ``*_clip_fraction`` the fraction of those
    elements outside the INT8 range (saturated). A layer that is not quantized reports
    ``quantized=False``, infinite SQNR and no clipping.
    """

    index: int
    name: str
    quantized: bool
    key_sqnr_db: float
    value_sqnr_db: float
    key_clip_fraction: float
    value_clip_fraction: float


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured; ``to_dict`` gives strict JSON data."""

    ppl_reference: float
    ppl_quantized: float
    kl_mean: float
    top1_agreement: float
    num_tokens: int
    layers: list[LayerError]
    settings: dict[str, Any] = field(default_factory=dict)
    effective_bits: float | None = None
    """Bits per cached element the scheme holds at the evaluated length (codes, scales, zero
    points, flags, and the model dtype's bits for unquantized layers; see ``accounting``)."""

    @property
    def ppl_relative_change(self) -> float:
        """``ppl_quantized / ppl_reference - 1`` as a fraction (0.0007 is +0.07 %)."""
        return self.ppl_quantized / self.ppl_reference - 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; non-finite numbers (the infinite SQNR of unquantized layers) become ``None``."""
        data = asdict(self)
        data["ppl_relative_change"] = self.ppl_relative_change
        return _finite_or_none(data)  # type: ignore[no-any-return]


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


# ---------------------------------------------------------------------------- accumulators
def _sum(values: torch.Tensor) -> float:
    """A tensor's sum as a Python float (float64 from here on; float32 on the device, which MPS needs)."""
    return float(values.sum(dtype=torch.float32))


class _TokenMetrics:
    """Running sums over predicted tokens: NLL of both runs, KL, top-1 agreement."""

    def __init__(self) -> None:
        self.nll_reference = 0.0
        self.nll_quantized = 0.0
        self.kl = 0.0
        self.agree = 0
        self.count = 0

    def add(self, reference: _ChunkReference, quantized_logits: torch.Tensor, targets: torch.Tensor) -> None:
        log_q = torch.log_softmax(quantized_logits.float(), dim=-1)
        log_p = reference.log_probs.to(log_q.device)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
        self.kl += _sum(kl)
        self.nll_quantized -= _sum(log_q.gather(-1, targets.unsqueeze(-1)))
        self.nll_reference += reference.nll_sum
        self.agree += int((log_q.argmax(dim=-1) == reference.argmax.to(log_q.device)).sum())
        self.count += int(targets.numel())

    @property
    def ppl_reference(self) -> float:
        return math.exp(self.nll_reference / self.count)

    @property
    def ppl_quantized(self) -> float:
        return math.exp(self.nll_quantized / self.count)

    @property
    def kl_mean(self) -> float:
        return self.kl / self.count

    @property
    def top1(self) -> float:
        return self.agree / self.count


@dataclass
class _ChunkReference:
    """The reference run's next-token log-probabilities for one chunk (float32)."""

    log_probs: torch.Tensor
    argmax: torch.Tensor
    nll_sum: float

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> _ChunkReference:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        nll = -_sum(log_p.gather(-1, targets.unsqueeze(-1)))
        return cls(log_p, log_p.argmax(dim=-1), nll)

    def to(self, device: torch.device) -> _ChunkReference:
        return _ChunkReference(self.log_probs.to(device), self.argmax.to(device), self.nll_sum)


class _StreamError:
    """Sums for one key or value stream: signal energy, noise energy, clipped and total elements."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.clipped = 0
        self.elements = 0

    def add(self, event: QuantizationEvent) -> None:
        """Fold one quantization's error into the sums."""
        x = event.states.float()
        self.signal += _sum(x.square())
        self.noise += _sum((x - event.quantized.float()).square())
        self.clipped += int(event.clipped.sum())
        self.elements += int(x.numel())

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.elements if self.elements else 0.0


def _measuring_copy(
    cache: QuantizedCalibratingCache, errors: dict[int, tuple[_StreamError, _StreamError]]
) -> QuantizedCalibratingCache:
    """An empty copy of ``cache`` that reports its error into ``errors`` (per layer: key, value).

    It goes through the cache's documented ``on_quantize`` hook, so the copy stores
    exactly what the frozen cache would store.
    """

    def heard(event: QuantizationEvent) -> None:
        key_error, value_error = errors.setdefault(event.layer_idx, (_StreamError(), _StreamError()))
        (key_error if event.stream == "key" else value_error).add(event)

    measuring = cache.empty_copy()
    measuring.on_quantize = heard
    return measuring


# ---------------------------------------------------------------------------- the forward loop
def _chunk_bounds(length: int, prefill: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the forward calls: a prefill, then chunks, covering ``range(length)``."""
    first = min(prefill, length)
    bounds = [(0, first)]
    bounds += [(start, min(start + chunk, length)) for start in range(first, length, chunk)]
    return bounds


def _forward_chunks(
    model: nn.Module, window: torch.Tensor, cache: DynamicCache, bounds: Sequence[tuple[int, int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``window`` (``(1, L)`` on the model's device) chunk by chunk into ``cache``.

    Yields ``(logits, targets)`` per chunk: the logits of the positions that predict a
    token of the window (position ``t`` predicts ``t + 1``; the last position predicts
    nothing), ``(n, vocab)``, and the ``n`` tokens they predict.
    """
    length = window.shape[1]
    for start, end in bounds:
        position_ids = torch.arange(start, end, device=window.device).unsqueeze(0)
        output = model(window[:, start:end], position_ids=position_ids, use_cache=True, **{CACHE_KEYWORD: cache})
        stop = min(end, length - 1)  # last predicting position + 1
        if stop <= start:
            continue
        yield output.logits[0, : stop - start], window[0, start + 1 : stop + 1]


def as_cache(source: KVQuantizer | QuantizedCalibratingCache) -> QuantizedCalibratingCache:
    """What evaluation runs: the cache given, or a new fake-storage cache of a quantizer."""
    if isinstance(source, KVQuantizer):
        return source.new_cache()
    if not isinstance(source, QuantizedCalibratingCache):
        raise TypeError(f"expected a KVQuantizer or a QuantizedCalibratingCache, got {type(source).__name__}")
    return source


def _check_inputs(
    model: nn.Module, cache: QuantizedCalibratingCache, windows: torch.Tensor, prefill: int, chunk: int
) -> torch.Tensor:
    if not cache.is_frozen:
        raise CalibrationError(
            "evaluation needs a frozen cache: calibrate it and call cache.freeze() (or load a saved, frozen state)"
        )
    for name, value in (("prefill", prefill), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    windows = check_token_batch(windows, what="windows", vocab_size=_vocab_size(model))
    if windows.shape[1] < 2:
        raise ValueError(
            f"windows need at least 2 tokens (one to predict from, one to predict), got {windows.shape[1]}"
        )
    config = getattr(model, "config", None)
    num_layers = getattr(text_config(config), "num_hidden_layers", None) if config is not None else None
    if isinstance(num_layers, int) and num_layers != len(cache.layer_names):
        raise CalibrationError(
            f"the cache has {len(cache.layer_names)} layers but the model has {num_layers}; "
            "it was made for another model"
        )
    return windows


def _reference_cache(model: nn.Module) -> DynamicCache:
    return DynamicCache(config=getattr(model, "config", None))


def _progress(total: int, desc: str, enabled: bool) -> tqdm[Any]:
    return progress_bar(total, desc, enabled)


def _settings(cache: QuantizedCalibratingCache, windows: torch.Tensor, prefill: int, chunk: int) -> dict[str, Any]:
    return {
        "prefill": prefill,
        "chunk": chunk,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
        "config": cache.quant_config.to_dict(),
        "quantized_layers": list(cache.quantized_layers),
        "numerics": cache.numerics,
    }


# ---------------------------------------------------------------------------- evaluate
def evaluate(
    model: nn.Module,
    cache: KVQuantizer | QuantizedCalibratingCache,
    windows: torch.Tensor,
    *,
    prefill: int = 256,
    chunk: int = 32,
    progress: bool = True,
) -> EvaluationResult:
    """Compare the model with the quantized cache against an unquantized ``DynamicCache``.

    Every row of ``windows`` (int64 ``(num_windows, L)``) is run through the model twice
    in lockstep, a prefill of ``min(prefill, L)`` tokens and then chunks of ``chunk``
    tokens, each continuing the cache. ``cache`` (a frozen :class:`KVQuantizer`, or a cache of
    one, whose storage is then used) is not modified: each window uses a new cache. See the
    module docstring for the metrics.
    """
    cache = as_cache(cache)
    windows = _check_inputs(model, cache, windows, prefill, chunk)
    device = model_device(model)
    bounds = _chunk_bounds(int(windows.shape[1]), prefill, chunk)
    metrics = _TokenMetrics()
    errors: dict[int, tuple[_StreamError, _StreamError]] = {}
    was_training = model.training
    model.eval()
    bar = _progress(int(windows.numel()), "evaluate", progress)
    try:
        with torch.inference_mode():
            for row in windows:
                window = row.unsqueeze(0).to(device)
                quantized_cache = _measuring_copy(cache, errors)
                reference_run = _forward_chunks(model, window, _reference_cache(model), bounds)
                quantized_run = _forward_chunks(model, window, quantized_cache, bounds)
                for (reference_logits, targets), (quantized_logits, _) in zip(
                    reference_run, quantized_run, strict=True
                ):
                    metrics.add(_ChunkReference.from_logits(reference_logits, targets), quantized_logits, targets)
                    bar.update(int(targets.numel()))
                bar.update(1)  # the last token of the window predicts nothing
    finally:
        bar.close()
        model.train(was_training)
    layers = []
    quantized = set(cache.quantized_layers)
    for index, name in enumerate(cache.layer_names):
        key_error, value_error = errors.get(index, (_StreamError(), _StreamError()))
        layers.append(
            LayerError(
                index=index,
                name=name,
                quantized=index in quantized,
                key_sqnr_db=key_error.sqnr_db,
                value_sqnr_db=value_error.sqnr_db,
                key_clip_fraction=key_error.clip_fraction,
                value_clip_fraction=value_error.clip_fraction,
            )
        )
    return EvaluationResult(
        ppl_reference=metrics.ppl_reference,
        ppl_quantized=metrics.ppl_quantized,
        kl_mean=metrics.kl_mean,
        top1_agreement=metrics.top1,
        num_tokens=metrics.count,
        layers=layers,
        settings=_settings(cache, windows, prefill, chunk),
        effective_bits=_effective_bits(model, cache, int(windows.shape[1])),
    )


def _effective_bits(model: nn.Module, cache: QuantizedCalibratingCache, length: int) -> float | None:
    parameter = next(iter(model.parameters()), None)
    dtype_bits = 8 * parameter.element_size() if parameter is not None else 16
    try:
        return cache.effective_bits(length, unquantized_bits=dtype_bits)
    except CalibrationError:  # the model config does not say its attention shape
        return None
