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

from typing import NamedTuple

import torch

__all__ = [
    "CodeView",
    "bits_per_slot",
    "byte_slots",
    "from_slot_major",
    "pack_codes",
    "slot_major",
    "unpack_codes",
    "unpack_slots",
]


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


def byte_slots(packed: torch.Tensor, width: int, mask: int | None = None) -> list[torch.Tensor]:
    """The slots of ``width`` bits that 2- and 4-bit codes fill in each byte of ``packed``, the low bits first
    (:func:`pack_codes`'s order), one tensor of ``packed``'s shape and dtype per slot: slot ``i`` holds codes
    ``i, i + p, i + 2p, ...`` of a row for ``p = 8 // width``. ``mask`` (default ``2**width - 1``) lets integers wider
    than a byte be taken apart bytewise (the mask repeated in every byte)."""
    mask = (1 << width) - 1 if mask is None else mask
    return [packed & mask] + [(packed >> (width * index)) & mask for index in range(1, 8 // width)]


def unpack_slots(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The stored (offset, non-negative) codes of ``packed`` as ``uint8`` ``(..., count)``.

    For 8-bit codes this is a view of ``packed`` (no copy); decoding then turns them into
    floats and subtracts the offset in one pass (see ``StreamQuantizer.decode``).
    """
    slot = bits_per_slot(bits)
    if slot == 8:
        return packed[..., :count]
    if slot in (2, 4):
        return torch.stack(byte_slots(packed, slot), dim=-1).reshape(*packed.shape[:-1], -1)[..., :count]
    groups = packed.reshape(*packed.shape[:-1], -1, slot).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * slot, 8, device=packed.device, dtype=torch.int64)
    words = (groups << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(0, 8 * slot, slot, device=packed.device, dtype=torch.int64)
    codes = (words >> shifts) & ((1 << slot) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, offset: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` ``(..., count * bits / 8)`` -> float32 codes ``(..., count)``."""
    return torch.sub(unpack_slots(packed, bits, count), float(offset))


def slot_major(channels: torch.Tensor, per_byte: int) -> torch.Tensor:
    """``(..., head_dim)`` channels reordered slot by slot: ``0, p, 2p, ..., 1, p + 1, ...`` for ``p = per_byte``,
    the order of :meth:`CodeView.slot_major` codes (a query put in it scores them)."""
    if per_byte == 1:
        return channels
    return channels.reshape(*channels.shape[:-1], -1, per_byte).transpose(-1, -2).flatten(-2)


def from_slot_major(channels: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Inverse of :func:`slot_major`: ``(..., head_dim)`` in slot-major order back to the channels' own order."""
    if per_byte == 1:
        return channels
    return channels.reshape(*channels.shape[:-1], per_byte, -1).transpose(-1, -2).flatten(-2)


class CodeView(NamedTuple):
    """The parts of packed rows that decoding combines: ``(codes - subtrahend) * scale (+ poison)``, then the
    stream space's inverse (:meth:`~quantcache.cache.stream.StreamQuantizer.decode`).

    ``codes`` are the stored codes, ``(batch, kv_heads, seq, head_dim)`` (grouped:
    ``(..., groups, group_size)``, padded): ``uint8`` as kept (integer formats, offset by ``-qmin``), or
    float8 codes as a new float32 tensor.
    A dynamic stream's ``scale`` and ``subtrahend`` are per row, ``(batch, kv_heads, seq, 1)``
    (grouped: ``(..., groups, 1)``); a static stream's are its fixed parameters, shaped to broadcast.
    ``subtrahend`` is ``None`` for float8 codes. ``poison`` ``(batch, kv_heads, seq)`` is a static stream's
    row flag as a value to add, NaN for a row that held NaN or Inf and ``-0.0`` otherwise.
    ``per_byte`` > 1 (2- and 4-bit codes left in their bytes for a reader that takes them slot by slot,
    :meth:`slot_major`): ``codes`` are the ``(batch, kv_heads, seq, head_dim / per_byte)`` bytes as stored.
    """

    codes: torch.Tensor
    subtrahend: torch.Tensor | float | None
    scale: torch.Tensor
    poison: torch.Tensor | None
    head_dim: int
    per_byte: int = 1

    def slot_major(self, dtype: torch.dtype) -> torch.Tensor:
        """The codes as ``dtype`` ``(..., head_dim)`` with channels in slot-major order (:func:`slot_major`).

        Each slot of the bytes (the low bits first) is masked out of 4-byte words and converted
        once into its block of channels: no interleaving pass, which taking the codes apart code by
        code costs. A product with them needs its other side in the same order.
        """
        if self.per_byte == 1:
            return self.codes.to(dtype)
        width = 8 // self.per_byte
        mask = (1 << width) - 1
        codes = self.codes.contiguous()
        if codes.shape[-1] % 4 == 0:  # four bytes per integer: a quarter of the elementwise work
            words, mask = codes.view(torch.int32), mask * 0x01010101  # the mask in every byte
        else:
            words = codes
        out = torch.empty(*codes.shape[:-1], self.head_dim, dtype=dtype, device=codes.device)
        block = codes.shape[-1]
        for index, slot in enumerate(byte_slots(words, width, mask)):
            out[..., index * block : (index + 1) * block] = slot.view(torch.uint8)
        return out

    def slots(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The codes as ``dtype``, one ``(batch, kv_heads, seq, head_dim / per_byte)`` tensor per slot of their
        bytes (:func:`byte_slots`; all ``head_dim`` channels in one when ``per_byte`` is 1): what a product that
        reads the bytes itself takes, where :meth:`slot_major` writes the slots out side by side."""
        if self.per_byte == 1:
            return [self.codes.to(dtype)]
        return [slot.to(dtype) for slot in byte_slots(self.codes, 8 // self.per_byte)]

    @property
    def per_row(self) -> bool:
        """Whether each row has its own scale (a dynamic stream) rather than the stream's fixed one."""
        return self.poison is None

    @property
    def grouped(self) -> bool:
        """Whether ``codes`` are in groups of channels, ``(..., groups, group_size)``."""
        return self.codes.dim() == 5

    def in_space(self) -> torch.Tensor:
        """The rows as float32 ``(batch, kv_heads, seq, head_dim)`` in the quantizer's space (nothing undone).

        One float32 tensor made in one pass (stored code minus ``offset + zero_point``: exact, both
        whole numbers), scaled in a second; a static stream's flagged rows become NaN in that second
        pass, which adds NaN to them and ``-0.0`` to the others, every time: asking first whether
        any flag is set would make the host wait for the device, and a masked fill would cost a pass.
        """
        if self.per_byte != 1:
            raise ValueError("codes still in their bytes: make the view with code_view(rows) to read them in space")
        # float8 codes are already a new float32 tensor (scaled in place: this consumes the view)
        values = self.codes if self.subtrahend is None else torch.sub(self.codes, self.subtrahend)
        if self.poison is None:
            values.mul_(self.scale)
        else:
            poison = self.poison.view(*self.poison.shape, *([1] * (values.dim() - self.poison.dim())))
            values = torch.addcmul(poison, values, self.scale)
        if self.grouped:
            flat = values.flatten(-2)
            return flat if flat.shape[-1] == self.head_dim else flat[..., : self.head_dim]
        return values
