"""Packed rows: how a packed cache lays out one token of one kv head in bytes.

A packed cache layer keeps, per stream, one ``uint8`` tensor of shape
``(batch, kv_heads, seq, row_bytes)``: every ``(batch, head, token)`` row holds

* the codes of its ``head_dim`` elements, packed to their bit width when the format
  has fewer than 8 bits (two int4 codes per byte, eight int3 codes in three bytes,
  four int2 codes per byte),
* the row's own parameters when the scheme is dynamic (per group, as raw bytes: its
  scale, float16 or one ``log8`` byte, then its zero point when asymmetric, int16 or,
  with ``zero_point_format: int8``, one byte),
* one flag byte that marks a row whose states held NaN or Inf (it decodes to NaN).

Because everything a row needs lives in the row, the base layer's own operations
(append along ``seq``, sliding-window trimming, cropping, beam reordering, batch
selection, offloading) work on packed rows unchanged: they only index batch and seq.
"""

from __future__ import annotations

import torch

__all__ = ["bits_per_slot", "pack_codes", "unpack_codes", "unpack_slots"]


def bits_per_slot(bits: int) -> int:
    """Bits a code occupies when packed: its own width for 2-4 bit formats, a whole byte otherwise."""
    return bits if 2 <= bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    """Integer codes ``(..., n)`` -> ``uint8`` bytes ``(..., n * bits / 8)``.

    ``offset`` (``-qmin``) makes codes non-negative first. Below 8 bits, every 8 codes
    become one ``8 * bits``-bit little-endian word split into ``bits`` bytes (int3: 8
    codes in 3 bytes), so ``n`` must be a multiple of 8. For 4 and 2 bits that is
    simply two (four) codes per byte, the first in the low bits, which is how they
    are packed (in ``uint8``, without the word).
    """
    slot = bits_per_slot(bits)
    shifted = (codes.to(torch.int16) + offset).to(torch.uint8)
    if slot == 8:
        return shifted
    if slot in (2, 4):
        per_byte = 8 // slot
        parts = shifted.reshape(*shifted.shape[:-1], -1, per_byte)
        packed = parts[..., 0].clone()
        for index in range(1, per_byte):
            packed |= parts[..., index] << (slot * index)
        return packed
    octets = shifted.to(torch.int64).reshape(*shifted.shape[:-1], -1, 8)
    shifts = torch.arange(0, 8 * slot, slot, device=codes.device, dtype=torch.int64)
    words = (octets << shifts).sum(dim=-1, keepdim=True)
    byte_shifts = torch.arange(0, 8 * slot, 8, device=codes.device, dtype=torch.int64)
    packed = (words >> byte_shifts) & 0xFF
    return packed.reshape(*shifted.shape[:-1], -1).to(torch.uint8)


def unpack_slots(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The stored (offset, non-negative) codes of ``packed`` as ``uint8`` ``(..., count)``.

    For 8-bit codes this is a view of ``packed`` (no copy); decoding then turns them into
    floats and subtracts the offset in one pass (see ``StreamQuantizer.decode``).
    """
    slot = bits_per_slot(bits)
    if slot == 8:
        return packed[..., :count]
    if slot in (2, 4):
        mask = (1 << slot) - 1
        parts = [packed & mask] + [(packed >> (slot * index)) & mask for index in range(1, 8 // slot)]
        return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :count]
    groups = packed.reshape(*packed.shape[:-1], -1, slot).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * slot, 8, device=packed.device, dtype=torch.int64)
    words = (groups << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(0, 8 * slot, slot, device=packed.device, dtype=torch.int64)
    codes = (words >> shifts) & ((1 << slot) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, offset: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` ``(..., count * bits / 8)`` -> float32 codes ``(..., count)``."""
    return torch.sub(unpack_slots(packed, bits, count), float(offset))
