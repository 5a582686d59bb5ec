"""Packed rows: how a packed cache lays out one token of one kv head in bytes.

A packed cache layer keeps, per stream, one ``uint8`` tensor of shape
``(batch, kv_heads, seq, row_bytes)``: every ``(batch, head, token)`` row holds

* the codes of its ``head_dim`` elements, several per byte when the format has fewer
  than 8 bits (two int4 codes, four int2 codes; int3 codes take 4 bits),
* the row's own parameters when the scheme is dynamic (float32 scale and zero point
  per group, as raw bytes),
* one flag byte that marks a row whose states held NaN or Inf (it decodes to NaN).

Because everything a row needs lives in the row, the base layer's own operations
(append along ``seq``, sliding-window trimming, cropping, beam reordering, batch
selection, offloading) work on packed rows unchanged: they only index batch and seq.
"""

from __future__ import annotations

import torch

__all__ = ["bits_per_slot", "pack_codes", "unpack_codes"]


def bits_per_slot(bits: int) -> int:
    """Bits a code occupies in a packed byte: 8, 4 (int4, int3) or 2 (int2)."""
    if bits > 4:
        return 8
    if bits > 2:
        return 4
    return 2


def pack_codes(codes: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    """Integer codes ``(..., n)`` -> ``uint8`` bytes ``(..., n * slot / 8)``.

    ``offset`` (``-qmin``) makes codes non-negative first; ``n`` must fill whole bytes.
    """
    slot = bits_per_slot(bits)
    shifted = (codes.to(torch.int16) + offset).to(torch.uint8)
    if slot == 8:
        return shifted
    per_byte = 8 // slot
    grouped = shifted.reshape(*shifted.shape[:-1], -1, per_byte)
    packed = grouped[..., 0].clone()
    for position in range(1, per_byte):
        packed |= grouped[..., position] << (slot * position)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, offset: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` ``(..., bytes)`` -> float32 codes ``(..., count)``."""
    slot = bits_per_slot(bits)
    if slot == 8:
        return packed[..., :count].to(torch.float32) - offset
    mask = (1 << slot) - 1
    shifts = torch.arange(0, 8, slot, device=packed.device, dtype=torch.uint8)
    fields = (packed.unsqueeze(-1) >> shifts) & mask
    return fields.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.float32) - offset
