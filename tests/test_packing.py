"""Bit packing of codes into bytes (``quantcache.ops.packing``): the layout packed cache rows rely on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcache.ops.packing import (
    CodeView,
    bits_per_slot,
    from_slot_major,
    pack_codes,
    slot_major,
    unpack_codes,
    unpack_slots,
)

BITS = [2, 3, 4, 8]


@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    octets=st.integers(1, 6),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_pack_then_unpack_gives_every_code_back(bits: int, octets: int, lead: list[int], seed: int) -> None:
    """Any signed codes of the width, any leading shape: bytes are ``n * slot / 8`` and unpacking is exact,
    the extreme codes included."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    count = 8 * octets
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmax + 1, (*lead, count), generator=generator, dtype=torch.int8)
    codes.view(-1)[0], codes.view(-1)[-1] = qmin, qmax
    packed = pack_codes(codes, bits, -qmin)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, count * bits_per_slot(bits) // 8)
    assert torch.equal(unpack_slots(packed, bits, count).to(torch.int16), codes.to(torch.int16) - qmin)
    restored = unpack_codes(packed, bits, -qmin, count)
    assert restored.dtype == torch.float32 and torch.equal(restored, codes.float())


@pytest.mark.parametrize(("bits", "expected"), [(4, [0x21, 0x43]), (2, [0b11100100]), (8, [1, 2, 3, 4])])
def test_sub_byte_codes_fill_each_byte_from_the_low_bits(bits: int, expected: list[int]) -> None:
    """The documented layout: the first code in the lowest bits of the byte (little-endian words)."""
    stored = torch.tensor([1, 2, 3, 4] if bits != 2 else [0, 1, 2, 3], dtype=torch.int16)
    codes = torch.cat([stored, torch.zeros(4, dtype=torch.int16)]) if bits != 8 else stored
    packed = pack_codes(codes, bits, 0)
    assert packed[: len(expected)].tolist() == expected


def test_int3_packs_eight_codes_into_three_bytes() -> None:
    codes = torch.arange(8, dtype=torch.int16)  # stored 0..7: the little-endian 24-bit word 0o76543210
    packed = pack_codes(codes, 3, 0)
    word = sum(int(byte) << (8 * index) for index, byte in enumerate(packed.tolist()))
    assert packed.shape == (3,) and word == int("76543210", 8)


@settings(max_examples=100, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    octets=st.integers(1, 9),
    rows=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_codes_read_slot_major_from_their_bytes_are_the_unpacked_codes_reordered(
    bits: int, octets: int, rows: int, seed: int
) -> None:
    """``CodeView.slot_major`` reads codes left in their bytes (odd byte counts take the byte path, multiples of
    four the word path) as the unpacked codes in slot-major order; ``from_slot_major`` puts channels back."""
    count = 8 * octets
    per_byte = 8 // bits
    generator = torch.Generator().manual_seed(seed)
    stored = torch.randint(0, 2**bits, (2, rows, count), generator=generator, dtype=torch.int16)
    stored.view(-1)[0], stored.view(-1)[-1] = 0, 2**bits - 1
    packed = pack_codes(stored, bits, 0)
    rows_bytes = torch.zeros(*packed.shape[:-1], packed.shape[-1] + 3, dtype=torch.uint8)  # codes, then a row's rest
    rows_bytes[..., : packed.shape[-1]] = packed
    packed = rows_bytes[..., : packed.shape[-1]]  # a strided view, as a packed row's codes are
    view = CodeView(packed, 0.0, torch.ones(()), None, count, per_byte)
    got = view.slot_major(torch.float64)
    expected = slot_major(stored.double(), per_byte)
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    assert torch.equal(expected[..., : count // per_byte], stored[..., ::per_byte].double())  # channels 0, p, ..
    assert torch.equal(from_slot_major(expected, per_byte), stored.double())
    with pytest.raises(ValueError, match="in their bytes"):
        view.in_space()
