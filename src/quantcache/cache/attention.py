"""``attn_implementation="quantcache"``: attention that reads a packed cache's codes.

A packed cache made with ``quantizer.new_cache(storage="packed", read_codes=True)`` does
not decode its history in ``update()``: each layer returns its stored rows, marked with a
:class:`CodeReader`, and the attention function registered here under ``"quantcache"``
(Transformers' ``AttentionInterface``, with ``sdpa``'s masks) computes
``softmax(q k^T / sqrt(d)) v`` from them (:mod:`quantcache.ops.code_attention`): the streams'
rotations, channel scales and centers move to the query and the output, and per-row scales
to the scores and probabilities. Sink tokens and the residual window, which the cache keeps
in full precision, are a small exact block whose scores and weights replace their rows'.
Keys quantized before RoPE (``pre_rope_keys``) cannot move their per-position turn to the
query (it would be a turn per query and stored row), so they are decoded and turned as
in ``update()``; their values are still read from codes. Keys centred before RoPE but stored
after it (``rope_center``) are read from codes, their turned center from the rows' angles.

Every other input (a plain ``DynamicCache``, an unquantized or calibrating layer, fake
storage) goes to Transformers' ``sdpa`` attention, so a model set to ``"quantcache"`` runs
with any cache. Use::

    quantcache.use_code_attention(model)
    cache = quantizer.new_cache(storage="packed", read_codes=True)
    model.generate(ids, past_key_values=cache, max_new_tokens=64)

The result equals attention over the decoded states up to float rounding (computed in
float32, float64 for a float64 model), not bit for bit: the sums run in another order. A call
with more than :data:`MAX_QUERIES_FROM_CODES` queries (a prefill) decodes the rows once and runs
``sdpa`` on them, bit for bit what ``update()`` without ``read_codes`` returns.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import nn

from quantcache.cache import compiled_kernels
from quantcache.cache.layer import LayerQuantizer
from quantcache.errors import ConfigError
from quantcache.ops.code_attention import (
    fold_query,
    key_scores,
    row_poison,
    turned_center_scores,
    unfold_output,
    value_mix,
)
from quantcache.ops.products import few_rows_matmul

__all__ = [
    "ATTENTION_NAME",
    "CODE_BLOCK_BYTES",
    "MAX_QUERIES_FROM_CODES",
    "MIN_BLOCK_ROWS",
    "CodeReader",
    "ExactRows",
    "code_attention",
    "register_code_attention",
    "set_attention",
    "use_code_attention",
]

ATTENTION_NAME = "quantcache"
"""The name the attention function is registered under: ``attn_implementation="quantcache"``."""
_READER = "quantcache_reader"  # the attribute that marks a layer's returned rows
CODE_BLOCK_BYTES = 8 << 20
"""About how many bytes of float32 a block of rows read from codes converts to at once. Converting all of a long
history at once writes it out in float32 and reads it back for the product, through main memory once it outgrows
the caches (at 8192 tokens x 8 sequences, SmolLM2's keys are 50 MB per layer, written to freshly mapped pages); a
block this size is converted and used while it is still in the last-level cache. Measured on SmolLM2 at 8192 x 8
(2 CPU threads): 8 MiB blocks beat 2 MiB ones, whose operations per block add up for 4-bit codes. A batch-1
history of SmolLM2 shorter than 10,000 tokens is one block. Eager only: a compiled graph reads the codes from their
bytes and converts no block (and keeps the length symbolic, which the number of blocks would follow)."""
MIN_BLOCK_ROWS = 256
"""Rows per block at least, whatever the batch: below that, the operations per block cost more than they save."""
MAX_QUERIES_FROM_CODES = 64
"""Queries per call up to which attention reads codes; a longer call (a prefill) decodes the rows once and runs
``sdpa``, whose kernels never hold the ``(queries, tokens)`` scores, which the products from codes would: at 8192
prompt tokens that is 2.4 GB per layer for SmolLM2's 9 heads in float32. Decode steps, assisted decoding's draft
chunks and short chunks read codes."""


class ExactRows(NamedTuple):
    """Full-precision ``(batch, kv_heads, tokens, head_dim)`` keys and values that replace some rows' codes."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])


class CodeReader:
    """What one packed layer holds for one attention call, and attention computed from it.

    ``key_rows``/``value_rows`` are the ``(batch, kv_heads, seq, row_bytes)`` rows the layer
    returned, the first of them at ``first_position`` in its sequence (where ``rope_center`` keys turn
    their center). ``head`` (sink tokens) and ``tail`` (the residual window) are the full-precision
    states of its first and last rows, read instead of those rows' codes; ``keys`` the decoded
    ``(batch, kv_heads, seq, head_dim)`` keys instead of the key rows, for keys quantized before
    RoPE (``head`` and ``tail`` already in place). ``compiled``: :func:`code_attention` runs :meth:`attend` as a
    compiled kernel (:mod:`quantcache.cache.compiled_kernels`), whatever the history's length: its loops read
    the codes from their bytes, so no block is ever written out in float32.
    """

    def __init__(
        self,
        quantizer: LayerQuantizer,
        key_rows: torch.Tensor,
        value_rows: torch.Tensor,
        first_position: int,
        *,
        keys: torch.Tensor | None = None,
        head: ExactRows | None = None,
        tail: ExactRows | None = None,
        compiled: bool = False,
    ) -> None:
        self.quantizer, self.key_rows, self.value_rows = quantizer, key_rows, value_rows
        self.compiled = compiled
        """Attend through the compiled kernel (:mod:`quantcache.cache.compiled_kernels`) instead of eagerly."""
        self.first_position = first_position
        self.keys, self.head, self.tail = keys, head, tail
        length = int(key_rows.shape[2])
        self.coded = slice(0 if head is None else head.length, length - (0 if tail is None else tail.length))
        """The rows read from their codes: between the head and the tail."""

    @property
    def codes(self) -> int:
        """How many rows are read from their codes."""
        return max(self.coded.stop - self.coded.start, 0)

    def handles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``update()`` returns: the rows, each marked with this reader for :func:`code_attention`."""
        key_handle, value_handle = self.key_rows.view_as(self.key_rows), self.value_rows.view_as(self.value_rows)
        setattr(key_handle, _READER, self)
        setattr(value_handle, _READER, self)
        return key_handle, value_handle

    def states(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(batch, kv_heads, seq, head_dim)`` keys and values in ``dtype`` that the rows stand for: what
        ``update()`` returns without ``read_codes``, and what :meth:`attend` computes attention over."""
        quantizer = self.quantizer
        if self.keys is not None:  # decoded for this reader alone, exact rows in place: no copy needed
            keys = self.keys.to(dtype)
        else:
            decoded = quantizer.key.decode(self.key_rows, quantizer.decode_dtype(dtype))
            keys = quantizer.keys_to_read(decoded, self.first_position, dtype)
        values = quantizer.value.decode(self.value_rows, dtype)
        for block, rows in ((self.head, slice(0, self.coded.start)), (self.tail, slice(self.coded.stop, None))):
            if block is not None:
                keys[:, :, rows] = block.keys.to(keys)
                values[:, :, rows] = block.values.to(values)
        return keys, values

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """``(batch, heads, n, head_dim)`` queries -> ``(batch, n, heads, head_dim)`` outputs in their dtype.

        ``mask``: Transformers' ``(batch, 1, n, >= seq)`` boolean (True: attend) or additive float mask;
        ``None`` means causal, the ``n`` queries being the newest positions.
        """
        batch, heads, n, head_dim = query.shape
        kv_heads = int(self.key_rows.shape[1])
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads evenly")
        group = heads // kv_heads
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        stacked = query.to(compute).mul(scaling).reshape(batch, kv_heads, group * n, head_dim)
        value_stream = self.quantizer.value
        blocks = self._blocks(batch * kv_heads * head_dim)
        views = [value_stream.code_view(self.value_rows[:, :, block], in_bytes=True) for block in blocks]
        poisons = [poison for poison in map(row_poison, views) if poison is not None]
        poison = None if not poisons else poisons[0] if len(poisons) == 1 else torch.cat(poisons, dim=-1)
        scores, attends = _masked(self._scores(stacked, blocks, poison).view(batch, kv_heads, group, n, -1), mask, n)
        probabilities = torch.softmax(scores, dim=-1)
        if attends is not None:  # a query that may read nothing (padding) gets zeros, as from sdpa
            probabilities = probabilities.masked_fill(~attends, 0.0)
        probabilities = probabilities.view(batch, kv_heads, group * n, -1)
        output = torch.zeros_like(stacked)
        if self.codes:  # not the list of blocks: its truth would make a compiled graph fix the length
            mixed = [value_mix(probabilities[..., block], view) for block, view in zip(blocks, views, strict=True)]
            coded = probabilities[..., self.coded].sum(-1, keepdim=True)
            output = unfold_output(functools.reduce(torch.add, mixed), coded, value_stream.space)
        if self.head is not None:
            output = output + few_rows_matmul(probabilities[..., : self.head.length], self.head.values.to(output))
        if self.tail is not None:
            output = output + few_rows_matmul(probabilities[..., self.coded.stop :], self.tail.values.to(output))
        return output.view(batch, heads, n, head_dim).transpose(1, 2).to(query.dtype).contiguous()

    def _blocks(self, row_elements: int) -> list[slice]:
        """The rows read from codes in blocks of about :data:`CODE_BLOCK_BYTES` once converted (one block when
        compiling); ``row_elements`` is a row's count over the batch and kv heads. Empty without such rows."""
        if not self.codes:
            return []
        if torch.compiler.is_compiling():
            return [self.coded]
        start, stop = self.coded.start, self.coded.stop
        rows = max(MIN_BLOCK_ROWS, CODE_BLOCK_BYTES // (4 * row_elements))
        return [slice(first, min(first + rows, stop)) for first in range(start, stop, rows)]

    def _scores(self, stacked: torch.Tensor, blocks: list[slice], value_poison: torch.Tensor | None) -> torch.Tensor:
        """``(batch, kv_heads, n, seq)`` scores of the scaled, stacked queries against every row.

        ``blocks`` are the rows read from codes (:meth:`_blocks`); ``value_poison`` (a static value
        stream's flags over them) is added: a query that reads a value row which held NaN gives NaN,
        as over decoded states.
        """
        if self.keys is not None:  # decoded (keys before RoPE), exact rows already in place
            scores = stacked @ self.keys.to(stacked).transpose(-1, -2)
            if value_poison is not None:
                scores[..., self.coded] += value_poison
            return scores
        parts = []
        if self.codes:  # not the list of blocks: its truth would make a compiled graph fix the length
            key_stream = self.quantizer.key
            folded, from_center = fold_query(stacked, key_stream.space)
            views = (key_stream.code_view(self.key_rows[:, :, block], in_bytes=True) for block in blocks)
            pieces = [key_scores(folded, view) for view in views]
            coded = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            if from_center is not None:
                coded = coded + from_center
            rope = self.quantizer.key_rope
            if self.quantizer.rope_center and rope is not None and key_stream.center is not None:
                start = self.first_position + self.coded.start
                angles = rope.block_angles(start, start + self.codes, stacked.device)
                pairs = key_stream.space.center_pairs(rope.rotary_dim // 2, stacked.device)
                coded = coded + turned_center_scores(stacked, pairs, angles)
            parts.append(coded if value_poison is None else coded + value_poison)
        if self.head is not None:
            parts.insert(0, few_rows_matmul(stacked, self.head.keys.to(stacked).transpose(-1, -2)))
        if self.tail is not None:
            parts.append(few_rows_matmul(stacked, self.tail.keys.to(stacked).transpose(-1, -2)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scores`` ``(batch, kv_heads, group, n, seq)`` with masked positions at ``-inf`` (see
    :meth:`CodeReader.attend`), and, for a boolean mask, which queries may read anything ``(batch, 1, 1, n, 1)``."""
    seq = scores.shape[-1]
    if mask is None:
        if n == 1:
            return scores, None
        positions = torch.arange(seq, device=scores.device)
        newest = torch.arange(seq - n, seq, device=scores.device)
        return scores.masked_fill(positions[None, :] > newest[:, None], float("-inf")), None
    if mask.dim() != 4 or mask.shape[-1] < seq or mask.shape[-2] != n:
        raise ValueError(
            f"an attention mask of shape {tuple(mask.shape)} does not fit {n} queries over {seq} cached tokens; "
            "expected (batch, 1, queries, >= tokens), as Transformers' sdpa masks are"
        )
    mask = mask[..., :seq].unsqueeze(2)
    if mask.dtype != torch.bool:
        return scores + mask.to(scores.dtype), None
    return scores.masked_fill(~mask, float("-inf")), mask.any(-1, keepdim=True)


def code_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"quantcache"`` attention function: from codes where ``key`` carries a :class:`CodeReader`, else ``sdpa``.

    ``query`` is ``(batch, heads, n, head_dim)``; the output ``(batch, n, heads, head_dim)``, as
    Transformers' attention functions return it. Soft-capped logits, attention sinks of the
    model's own (``s_aux``) and dropout are not computed from codes and are refused.
    """
    reader = getattr(key, _READER, None)
    if reader is None:
        if key.dtype == torch.uint8:
            raise ValueError(
                "attention got packed rows that no quantcache layer marked; make the cache with "
                "quantizer.new_cache(storage='packed', read_codes=True) and pass it as past_key_values"
            )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
        raise ValueError(
            "attention from codes computes plain softmax attention: this model soft-caps its logits, adds "
            "attention sinks of its own or uses dropout; make the cache without read_codes=True"
        )
    if query.shape[2] > MAX_QUERIES_FROM_CODES:  # a prefill: decode once, attend with sdpa's kernels
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        keys, values = reader.states(query.dtype)
        return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout, scaling, **kwargs)
    if scaling is None:
        scaling = float(query.shape[-1]) ** -0.5
    if reader.compiled and not torch.compiler.is_compiling():
        return compiled_kernels.attend(reader, query, attention_mask, scaling), None
    return reader.attend(query, attention_mask, scaling), None


def register_code_attention() -> None:
    """Register :func:`code_attention` (and ``sdpa``'s masks) under ``"quantcache"`` with Transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, code_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_code_attention(model: nn.Module) -> nn.Module:
    """Register the attention function and set ``model`` to use it; returns ``model``.

    Layers whose cache returns states (any cache but a packed one made with
    ``read_codes=True``) keep ``sdpa``'s results.
    """
    register_code_attention()
    return set_attention(model, ATTENTION_NAME)


def set_attention(model: nn.Module, name: str) -> nn.Module:
    """Set ``model``'s attention implementation to ``name`` (``"sdpa"``, ``"quantcache"`` ...); returns ``model``."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
        return model
    config: Any = getattr(model, "config", None)
    if config is None:
        raise ConfigError("setting the attention implementation needs a Transformers model (a PreTrainedModel)")
    config._attn_implementation = name
    return model
