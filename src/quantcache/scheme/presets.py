"""Named schemes: ``KVQuantConfig.preset(name)`` and ``quantcache calibrate --preset NAME``.

``seed`` is msModelSlim's ``dynamic_cache`` default exactly (static INT8 per-channel
symmetric min/max). ``c8`` keeps its format (what serving engines load) and takes key
ranges from RoPE pairs' radii (``rope_radius``), which hold at any context length. The
others are the schemes that measured best per bit on text unlike the calibration text
(docs/results.md); their effective bits per element (at 1024 tokens, SmolLM2) are counted
by :mod:`quantcache.ops.bits`. These dynamic presets learn one mean per kv head and channel from calibration
text (so they need calibration, as the seed does), keep the first token of every
sequence, the attention sink, in full precision (``sink_tokens: 1``) and centre keys on
their mean before RoPE, turned to each key's position, storing them after RoPE
(``rope_center``): what centring before RoPE gains, in codes the attention from codes
reads (``attn_implementation="quantcache"``) without decoding the history; ``int2``, whose
quality fell that way, quantizes its keys before RoPE (``pre_rope_keys``), where attention
must decode them (its values are still read from codes). The integer ones also weigh each key
channel by the calibrated energy of the queries that read it (``query_aware``); ``int4``,
``int3`` and ``int2`` also choose each key's codes for the logits those queries compute
(``rounding: query_aware``, at ``2 * 32 / L`` bits per key element at ``L`` tokens). ``int4``
reads its newest 24 tokens back in full precision (``residual_window: 24``), paid for by
symmetric ranges and one-byte scales (``scale_format: log8``); ``int2`` its newest 24,
paid for by one-byte scales and the mid-rise grid (``zero_level: false``), which stores
no zero point; ``int3`` its newest 8, paid for by one-byte zero points. Their tokens leave
the window one at a time; ``residual_block: 8`` (``KVQuantConfig.preset("int4",
residual_block=8)``) lets them leave 8 at a time, one quantizing call per 8 decode steps,
for up to 7 more tokens in full precision (0.11 bits more at 1024 tokens). ``int8`` spends
what one-byte scales and zero points save on keys in groups of 32 channels. ``int2``'s
keys take their whole per-token range (``method: minmax``): a clipped coordinate's error
is the one error query-aware rounding cannot hand on.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CACHE_SETTINGS", "MIX_BASE", "MIX_CANDIDATES", "PRESETS", "preset_settings"]

CACHE_SETTINGS: dict[str, Any] = {"sink_tokens": 1, "rope_center": True}
"""The whole-cache settings of every preset but ``seed`` (``suggest-bits`` mixes its schemes under them)."""
_ROTATED = {"rotation": "hadamard", "rotation_seed": 0}
_DYNAMIC_CENTRED = {"dynamic": True, "center": True}  # a stream's: per-token ranges around calibrated means
# ... and the whole cache's: the first token (the attention sink) in full precision, keys centred before RoPE.
_CENTRED = {**_DYNAMIC_CENTRED, **CACHE_SETTINGS}
# int2 keeps its keys quantized before RoPE: stored after it around a turned center, its KL rose by a tenth on
# Python and licence text and its top-1 agreement fell to 75.0 % on the licences, the edge of its bar.
_PRE_ROPE = {"sink_tokens": 1, "pre_rope_keys": True}
MIX_BASE: dict[str, Any] = {"scope": "per_token", **_CENTRED}
"""``KVQuantConfig`` keywords of the config ``suggest-bits`` mixes under: the presets' whole-cache settings, with
centred dynamic streams as placeholders (``rope_center`` needs centred keys; each candidate replaces them)."""
_SINK = "the first token in full precision; keys centred before RoPE, stored after it"
_AWARE = "key channels weighed by calibrated query energy"
_ROUNDED = "query_aware"  # keys' codes chosen for the logits under the calibrated queries
_ROUNDS = "keys rounded for the logits the calibrated queries compute"


def _with_rounded_keys(stream: dict[str, Any], **key_settings: Any) -> dict[str, Any]:
    """``stream``'s settings for both streams, and for the keys the same made query-aware and rounded for the
    logits (with ``key_settings`` on top)."""
    return {**stream, "key": {**stream, "query_aware": True, "rounding": _ROUNDED, **key_settings}}


# Centred keys keep a wider, lopsided range than values: an int8 zero point pays for itself there.
_INT8 = {"dtype": "int8", "scope": "per_token", **_DYNAMIC_CENTRED, **_ROTATED}
# ... and in groups of 32 channels, which one-byte scales and zero points pay for (8.5 bits in all).
_ONE_BYTE = {"scale_format": "log8", "zero_point_format": "int8"}
_INT8_KEYS = {**_INT8, "symmetric": False, "scope": "group", "group_size": 32, **_ONE_BYTE, "query_aware": True}
_INT4 = {"dtype": "int4", "scope": "per_token", "symmetric": True, "method": "mse", "scale_format": "log8"}
_INT4.update({**_DYNAMIC_CENTRED, **_ROTATED})
_ASYMMETRIC_MSE = {"scope": "per_token", "symmetric": False, "method": "mse", **_DYNAMIC_CENTRED, **_ROTATED}
# Four levels at +-1/2 and +-3/2 steps: a tenth less error than four around a zero, and no zero point to store.
_MID_RISE_INT2 = {"dtype": "int2", "scope": "per_token", "symmetric": True, "zero_level": False, "method": "mse"}
_MID_RISE_INT2.update({"scale_format": "log8", **_DYNAMIC_CENTRED, **_ROTATED})

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "seed": (
        "msModelSlim dynamic_cache: static INT8, per-channel, symmetric, min/max (the default)",
        {},
    ),
    "c8": (
        "static INT8 per-channel, symmetric, in msModelSlim's and the engines' format (exports to vLLM-Ascend C8 "
        "and vLLM FP8); key ranges from each RoPE pair's radius, which no position can leave, so short "
        "calibration text holds at any context length",
        {"key": {"rope_radius": True}},
    ),
    "int8": (
        "INT8 per token (keys asymmetric, values symmetric), keys in groups of 32 channels with one-byte scales "
        "and zero points, values per kv head, centred on calibrated channel means, after a randomized Hadamard "
        f"rotation; {_AWARE}; ~8.42 bits + {_SINK}",
        {**_INT8, "symmetric": True, "key": _INT8_KEYS, **CACHE_SETTINGS},
    ),
    "fp8": (
        f"FP8 e4m3 per token and kv head, scale = absmax / 448, centred on calibrated channel means; ~8.28 bits "
        f"+ {_SINK}",
        {"dtype": "fp8_e4m3", "scope": "per_token", "symmetric": True, **_CENTRED},
    ),
    "int4": (
        "INT4 symmetric per token and kv head, centred on calibrated channel means, ranges clipped to the "
        f"least error, after a randomized Hadamard rotation; {_AWARE}; {_ROUNDS}; one-byte scales; ~4.20 bits + "
        f"{_SINK}; the newest 24 tokens read back in full precision",
        {**_with_rounded_keys(_INT4), **CACHE_SETTINGS, "residual_window": 24},
    ),
    "int3": (
        "INT3 asymmetric per token and kv head, centred on calibrated channel means, ranges clipped to the "
        f"least error, after a randomized Hadamard rotation; {_AWARE}; {_ROUNDS}; one-byte zero points; ~3.45 bits + "
        f"{_SINK}; the newest 8 tokens read back in full precision",
        {
            **_with_rounded_keys({"dtype": "int3", "zero_point_format": "int8", **_ASYMMETRIC_MSE}),
            **CACHE_SETTINGS,
            "residual_window": 8,
        },
    ),
    "int2": (
        "INT2 on the mid-rise grid (levels at half steps, no zero level, no zero point) per token and kv head, "
        "centred on calibrated channel means, after a randomized Hadamard rotation; keys take their whole range, "
        f"value ranges clipped to the least error; {_AWARE}; {_ROUNDS}; one-byte scales; ~2.20 bits + "
        "the first token in full precision; keys quantized before RoPE; the newest 24 tokens read back in full "
        "precision",
        {
            **_with_rounded_keys(_MID_RISE_INT2, method="minmax"),
            **_PRE_ROPE,
            "residual_window": 24,
        },
    ),
}

MIX_CANDIDATES = ("int8", "int8/int4", "int4", "int4/int2", "int3", "int2")
"""The schemes ``quantcache suggest-bits`` mixes by default: presets, or KEYS/VALUES pairs of them."""


def preset_settings(name: str) -> dict[str, Any]:
    """The ``KVQuantConfig`` keyword arguments of preset ``name`` (a copy)."""
    if name not in PRESETS:
        raise KeyError(name)
    return dict(PRESETS[name][1])
