"""Whether a calibration's ranges are trusted at the context lengths the model will serve.

A static key range calibrated after RoPE holds for the angles the calibration positions
reached: RoPE turns each channel pair by ``position * inv_freq``, and the slow pairs
turn only a few degrees in a few hundred tokens, so keys at later positions leave the
calibrated ranges and clip (msModelSlim's ``dynamic_cache`` scheme, our ``seed``: +34 %
perplexity at 4096 tokens after 512-token calibration on SmolLM2). A length-safe scheme
(:attr:`quantcache.scheme.config.KVQuantConfig.length_safe`) has no such limit.
"""

from __future__ import annotations

from typing import Any

from quantcache.cache.model_facts import max_positions
from quantcache.scheme.config import KVQuantConfig

__all__ = ["LENGTH_RATIO", "ContextLengthWarning", "length_warning"]

LENGTH_RATIO = 4
"""Serving contexts this many times the calibration windows (or more) are far beyond them."""


class ContextLengthWarning(UserWarning):
    """A length-unsafe scheme calibrated on windows far shorter than the contexts it will serve."""


def length_warning(
    quant_config: KVQuantConfig, model_config: Any, window_tokens: int, context: int | None = None
) -> str | None:
    """The warning to give when ``quant_config`` is not length-safe and the contexts it will serve are
    ``LENGTH_RATIO`` times the ``window_tokens`` calibrated on or more; ``None`` otherwise.

    ``context`` is the longest context the user says they will serve; without it, the model
    config's ``max_position_embeddings`` (no warning when neither is known).
    """
    if quant_config.length_safe or window_tokens < 1:
        return None
    serving = context if context is not None else max_positions(model_config)
    if serving is None or serving < LENGTH_RATIO * window_tokens:
        return None
    said = "the context you will serve" if context is not None else "the model's max_position_embeddings"
    return (
        f"static key ranges were calibrated on {window_tokens}-token windows, but {said} is {serving} tokens: "
        "RoPE turns keys at later positions out of the calibrated ranges and they clip (quality falls with "
        "the context). Use --preset c8 (KVQuantConfig.preset('c8')): the same engine format, with key ranges "
        "that hold at any length"
    )
