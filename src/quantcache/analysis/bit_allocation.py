"""Mixed precision by measurement: give each layer the scheme its sensitivity earns, within a bit budget.

:func:`suggest_bits` measures, for every candidate scheme and every quantized layer, the
mean KL divergence that quantizing that layer alone with that scheme adds (the protocol of
:mod:`quantcache.analysis.evaluation`, one reference run shared by all measurements). Treating the
costs as additive, it then picks one candidate per layer that minimises the summed KL
with the average effective bits (:mod:`quantcache.ops.bits`, every layer and both
streams, excluded layers at 16 bits) at most ``budget``: every layer starts at its
cheapest candidate, and upgrades are taken in order of KL saved per bit spent along each
layer's lower convex hull, while the budget allows. The chosen mix is written as
per-layer overrides (``KVQuantConfig.layers``) and measured once more as a whole.

Candidates are dynamic schemes: a preset name (``int4``) or a ``KEYS/VALUES`` pair of preset
names (``int8/int4``: keys as ``int8``, values as ``int4``), since keys and values rarely hurt
alike. A centred candidate (``center: true``) learns its channel means from
``calibration`` windows (by default the measured ones) before it is measured.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcache.analysis.evaluation import _finite_or_none
from quantcache.analysis.sensitivity import _metrics_with, _quantized, _Reference, _run_search, _with_enabled
from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.calibration.calibrate import calibrate
from quantcache.errors import ConfigError
from quantcache.ops.bits import stream_bits
from quantcache.scheme.args import LayerOverride, QuantArgs
from quantcache.scheme.config import KVQuantConfig
from quantcache.scheme.presets import MIX_BASE, MIX_CANDIDATES, PRESETS, preset_settings

__all__ = ["DEFAULT_CANDIDATES", "BitCandidate", "BitSuggestion", "LayerChoice", "parse_candidate", "suggest_bits"]

DEFAULT_CANDIDATES = MIX_CANDIDATES
UNQUANTIZED_BITS = 16


@dataclass(frozen=True)
class BitCandidate:
    """One scheme a layer may get: the keys' and the values' arguments."""

    name: str
    key: QuantArgs
    value: QuantArgs


def parse_candidate(spec: str) -> BitCandidate:
    """``"int4"`` or ``"int8/int4"`` (keys/values) -> a candidate of preset schemes; dynamic ones only."""
    parts = spec.split("/") if isinstance(spec, str) else []
    if len(parts) not in (1, 2) or not all(parts):
        raise ConfigError(f"scheme {spec!r}: expected a preset name or KEYS/VALUES preset names, such as int8/int4")
    configs = []
    for part in parts:
        if part not in PRESETS:
            raise ConfigError(f"scheme {spec!r}: unknown preset {part!r}; choose from {', '.join(PRESETS)}")
        config = KVQuantConfig(**preset_settings(part))
        if not config.key_args.dynamic:
            dynamic = [name for name in PRESETS if KVQuantConfig(**preset_settings(name)).key_args.dynamic]
            raise ConfigError(
                f"scheme {spec!r}: preset {part!r} is static and needs calibration; suggest-bits mixes dynamic "
                f"presets ({', '.join(dynamic)})"
            )
        configs.append(config)
    return BitCandidate(spec, configs[0].key_args, configs[-1].value_args)


@dataclass
class LayerChoice:
    """The scheme chosen for one layer, its bits per element and the KL it adds alone."""

    index: int
    name: str
    scheme: str
    bits: float
    kl_alone: float


@dataclass
class BitSuggestion:
    """The mix that fits ``budget`` effective bits, with what was measured on the way.

    ``kl_by_scheme[scheme][i]`` is the KL of quantizing the ``i``-th entry of ``layers``
    alone with ``scheme``; ``kl_predicted`` the sum over the chosen schemes;
    ``kl_measured`` the KL of the whole mix; ``kl_uniform[scheme]`` that of every layer
    with one scheme, for the candidates whose bits fit the budget.
    """

    budget: float
    seq_len: int
    effective_bits: float
    layers: list[LayerChoice]
    kl_predicted: float
    kl_measured: float
    kl_uniform: dict[str, float]
    kl_by_scheme: dict[str, list[float]]
    config: KVQuantConfig

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return _finite_or_none(data)  # type: ignore[no-any-return]


def _choose(costs: list[list[float]], losses: list[list[float]], allowance: float) -> list[int]:
    """Per layer, the index of the candidate to use: least summed loss with summed cost within ``allowance``.

    Every layer starts at its cheapest candidate; then the upgrade that saves the most
    loss per unit of cost is taken, over all layers, as long as it fits what is left
    (a layer whose best upgrade no longer fits is offered its best one that does).
    """
    choice = [min(range(len(row)), key=lambda c: (row[c], loss[c])) for row, loss in zip(costs, losses, strict=True)]
    left = allowance * (1 + 1e-12) - sum(costs[i][c] for i, c in enumerate(choice))
    heap: list[tuple[float, int, int]] = []

    def offer(layer: int) -> None:
        here = choice[layer]
        best: tuple[float, int] | None = None
        for candidate in range(len(costs[layer])):
            extra = costs[layer][candidate] - costs[layer][here]
            saved = losses[layer][here] - losses[layer][candidate]
            if 0 < extra <= left and saved > 0 and (best is None or saved / extra > best[0]):
                best = (saved / extra, candidate)
        if best is not None:
            heapq.heappush(heap, (-best[0], layer, best[1]))

    for layer in range(len(costs)):
        offer(layer)
    while heap:
        _, layer, candidate = heapq.heappop(heap)
        extra = costs[layer][candidate] - costs[layer][choice[layer]]
        if extra <= left:
            choice[layer] = candidate
            left -= extra
        offer(layer)
    return choice


def _mix_config(base: KVQuantConfig, names: Sequence[str], picks: Sequence[BitCandidate]) -> KVQuantConfig:
    """``base``'s layer selection with the most used candidate as its scheme and overrides for the rest."""
    common = Counter(pick.name for pick in picks).most_common(1)[0][0]
    top = next(pick for pick in picks if pick.name == common)
    overrides = []
    for pick in dict.fromkeys(pick.name for pick in picks if pick.name != common):
        chosen = next(candidate for candidate in picks if candidate.name == pick)
        modules = tuple(name for name, candidate in zip(names, picks, strict=True) if candidate.name == pick)
        overrides.append(LayerOverride(modules, chosen.key, chosen.value))
    return replace(base, key=top.key, value=top.value, layers=tuple(overrides))


def suggest_bits(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    budget: float,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    base_config: KVQuantConfig | None = None,
    prefill: int = 256,
    chunk: int = 32,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
) -> BitSuggestion:
    """The per-layer mix of ``candidates`` with the least summed KL at ``<= budget`` effective bits.

    ``windows`` are ``(num_windows, seq_len)`` token ids; effective bits are counted at
    ``seq_len``. ``base_config`` contributes its include/exclude (excluded layers count
    16 bits), storage and whole-cache settings (default: the presets', one sink token
    and keys centred before RoPE, stored after it). ``calibration`` (token windows, default ``windows``) is what
    centred candidates learn their means from. See the module docstring for the method.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError(f"budget must be a positive number of bits, got {budget!r}")
    parsed = [parse_candidate(spec) for spec in dict.fromkeys(candidates)]
    if not parsed:
        raise ConfigError("no candidate schemes given")
    base = base_config if base_config is not None else KVQuantConfig(**MIX_BASE)
    calibration = windows if calibration is None else calibration

    def frozen(config: KVQuantConfig) -> QuantizedCalibratingCache:
        quantizer = KVQuantizer(model, config, warn_unmatched=False)
        if quantizer.needs_calibration:
            quantizer = calibrate(model, calibration, quantizer=quantizer, progress=False)
        return quantizer.freeze().new_cache()

    def configured(candidate: BitCandidate) -> KVQuantConfig:
        try:
            return replace(base, key=candidate.key, value=candidate.value, layers=())
        except ConfigError as error:  # e.g. query-aware rounding under a base config with keys after RoPE
            raise ConfigError(f"scheme {candidate.name!r} under the base config: {error}") from None

    caches = [frozen(configured(c)) for c in parsed]
    first = caches[0]
    if first.kv_heads is None or first.head_dim is None:
        raise ConfigError("the model config does not say kv_heads and head_dim; cannot count bits")
    quantized = _quantized(first)
    if not quantized:
        raise ConfigError("the config quantizes no layer")
    seq_len = int(windows.shape[1])
    held = first.held_tokens(seq_len)
    plain = set(range(len(held))) - set(first.quantized_layers)
    fixed = sum(2 * UNQUANTIZED_BITS * held[i] for i in plain)
    copies = first.full_precision_held(seq_len)
    fixed += sum(2 * UNQUANTIZED_BITS * copies[i] for i, _ in quantized)  # sinks and window, whatever the scheme
    allowance = budget * sum(2 * tokens for tokens in held) - fixed
    costs = [
        [
            sum(stream_bits(args, first.kv_heads, first.head_dim, held[i]) for args in (c.key, c.value)) * held[i]
            for c in parsed
        ]
        for i, _ in quantized
    ]
    cheapest = sum(min(row) for row in costs)
    if cheapest > allowance * (1 + 1e-12):
        floor = (cheapest + fixed) / sum(2 * tokens for tokens in held)
        raise ConfigError(f"budget {budget} bits is below the cheapest mix of these schemes ({floor:.3f} bits)")

    def body(reference: _Reference, bar: tqdm[Any]) -> BitSuggestion:
        kl: dict[str, list[float]] = {c.name: [] for c in parsed}
        for candidate, cache in zip(parsed, caches, strict=True):
            for index, _ in quantized:
                alone = _with_enabled(cache, {index})
                kl[candidate.name].append(_metrics_with(model, alone, reference, bar.update).kl_mean)
        losses = [[kl[c.name][row] for c in parsed] for row in range(len(quantized))]
        choice = _choose(costs, losses, allowance)
        picks = [parsed[c] for c in choice]
        names = [name for _, name in quantized]
        config = _mix_config(base, names, picks)
        mixed = frozen(config)
        bar.total = (bar.total or 0) + int(reference.windows.numel()) * (1 + len(parsed))
        bar.refresh()
        measured = _metrics_with(model, mixed, reference, bar.update).kl_mean
        uniform = {}
        for candidate, cache in zip(parsed, caches, strict=True):
            if cache.effective_bits(seq_len, unquantized_bits=UNQUANTIZED_BITS) <= budget * (1 + 1e-12):
                uniform[candidate.name] = _metrics_with(model, cache.empty_copy(), reference, bar.update).kl_mean
            else:
                bar.update(int(reference.windows.numel()))
        layers = [
            LayerChoice(index, name, pick.name, costs[row][choice[row]] / (2 * held[index]), losses[row][choice[row]])
            for row, ((index, name), pick) in enumerate(zip(quantized, picks, strict=True))
        ]
        return BitSuggestion(
            budget=float(budget),
            seq_len=seq_len,
            effective_bits=mixed.effective_bits(seq_len, unquantized_bits=UNQUANTIZED_BITS),
            layers=layers,
            kl_predicted=sum(layer.kl_alone for layer in layers),
            kl_measured=measured,
            kl_uniform=uniform,
            kl_by_scheme=kl,
            config=config,
        )

    suggestion: BitSuggestion = _run_search(
        model, first, windows, prefill, chunk, len(parsed) * len(quantized), progress, "suggest bits", body
    )
    return suggestion
