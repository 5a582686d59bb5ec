"""Effective bits per element: everything a scheme stores, counted honestly.

For one stream of one layer holding ``seq_len`` tokens of ``kv_heads`` heads of
``head_dim`` channels (batch 1), the bits per element are

* the code width (int3 codes are packed 8 to 3 bytes, so 3 bits; float8 is 8),
* plus a dynamic scheme's per-row parameters: a scale (16 bits as float16, 8 as
  ``log8``, the ``scale_format``) and a zero point when asymmetric (16 bits, or 8 with
  ``zero_point_format: int8``), per group of ``group_size`` channels (``head_dim`` per
  token),
* plus a centred dynamic scheme's calibrated float32 center (one per kv head and
  channel), and a query-aware one's float32 channel scale likewise, spread over every
  element they serve at this length, and query-aware rounding's float32 query model
  (``1 + rank`` values per kv head and channel, see :mod:`quantcache.ops.rounding`) too,
* plus a static scheme's flag byte per row (it marks rows holding NaN or Inf),
* plus a static scheme's calibrated parameters (float32 scale, int32 zero point when
  asymmetric), spread over every element they serve at this length,

and a layer the config leaves unquantized costs the model dtype's bits, as do the sink
tokens and the residual window a quantized layer keeps in full precision (on top of
their rows). The result is what a packed cache holds; a fake-quantized cache keeps
states in the model dtype but measures the same scheme.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantcache.ops.granularity import Granularity
from quantcache.ops.packing import bits_per_slot
from quantcache.ops.rounding import QUERY_MODEL_RANK
from quantcache.scheme.args import QuantArgs, Rounding
from quantcache.scheme.number_formats import FormatKind

__all__ = ["effective_bits", "stream_bits"]


def stream_bits(args: QuantArgs, kv_heads: int, head_dim: int, seq_len: int) -> float:
    """Bits per element of one stream quantized with ``args`` (see the module docstring)."""
    fmt = args.format
    code = float(fmt.bits if fmt.kind is FormatKind.FLOAT else min(bits_per_slot(fmt.bits), fmt.bits))
    elements = kv_heads * head_dim * seq_len
    granularity = Granularity.of(args)
    if args.dynamic:
        per_param = args.row_parameter_bits
        per_channel = (32 if args.center else 0) + (32 if args.query_aware else 0)
        per_channel += 32 * (1 + QUERY_MODEL_RANK) if args.rounding is Rounding.QUERY_AWARE else 0
        center = kv_heads * head_dim * per_channel / max(elements, 1)
        return code + granularity.params_per_token(kv_heads, head_dim) * per_param / (kv_heads * head_dim) + center
    params = 1
    for size in granularity.param_shape(kv_heads, head_dim):
        params *= size
    return code + 8.0 / head_dim + params * args.calibrated_parameter_bits / max(elements, 1)


def effective_bits(
    layer_args: Sequence[tuple[QuantArgs, QuantArgs] | None],
    kv_heads: int,
    head_dim: int,
    seq_len: int,
    *,
    unquantized_bits: int = 16,
    layer_tokens: Sequence[int] | None = None,
    layer_copies: Sequence[int] | None = None,
) -> float:
    """Bits per held element over layers and both streams; ``None`` marks an unquantized layer.

    ``layer_tokens`` is how many tokens each layer holds (a sliding-window layer keeps
    fewer than ``seq_len``); layers are weighted by it. Default: ``seq_len`` everywhere.
    ``layer_copies`` is how many of them a quantized layer also keeps in full precision
    (sink tokens and the residual window, ``unquantized_bits`` each). Default: none.
    """
    if not layer_args:
        raise ValueError("no layers to count")
    tokens = list(layer_tokens) if layer_tokens is not None else [seq_len] * len(layer_args)
    copies = list(layer_copies) if layer_copies is not None else [0] * len(layer_args)
    total = weight = 0.0
    for entry, held, copied in zip(layer_args, tokens, copies, strict=True):
        if held <= 0:
            continue
        if entry is None:
            total += 2 * unquantized_bits * held
        else:
            total += sum(stream_bits(args, kv_heads, head_dim, held) for args in entry) * held
            total += 2 * unquantized_bits * copied
        weight += 2 * held
    return total / weight if weight else 0.0
