from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mm.entry import LEVELS, Entry, reserved_mask
from mm.errors import Misaligned
from mm.flags import ADDR_MASK, FLAGS_MASK, PteFlags

F = PteFlags


def test_levels_are_data():
    assert [(lv.name, lv.number, lv.shift, lv.may_be_huge) for lv in LEVELS] == [
        ("PML4", 4, 39, False), ("PDPT", 3, 30, True), ("PD", 2, 21, True), ("PT", 1, 12, False)]


def test_flag_bits():
    assert F.PRESENT == 1 and F.HUGE == 0x80 and F.GLOBAL == 0x100 and F.PAT_HUGE == 0x1000
    assert F.NO_EXECUTE == 1 << 63 and F.AVAIL_52 == 1 << 52 and F.AVAIL_62 == 1 << 62
    assert ADDR_MASK == 0x000F_FFFF_FFFF_F000 and FLAGS_MASK & ADDR_MASK == 0


_flag_bits = st.integers(0, (1 << 64) - 1).map(lambda v: v & FLAGS_MASK)


@given(st.integers(0, (1 << 40) - 1), _flag_bits, st.sampled_from([4, 3, 2, 1]))
def test_table_entry_round_trip(frame, flags, level):
    flags &= ~int(F.HUGE)
    e = Entry.encode(frame << 12, flags, level)
    d = Entry.decode(e.value, level)
    assert d.address == frame << 12 and int(d.flags) == flags
    assert d.is_leaf == (level == 1) and d.present == bool(flags & 1)


@given(st.sampled_from([(3, 30), (2, 21)]), st.integers(0, (1 << 20) - 1), _flag_bits, st.booleans())
def test_large_leaf_round_trip(lv_shift, frame, flags, pat):
    level, shift = lv_shift
    addr = (frame << shift) & ADDR_MASK
    flags |= F.HUGE | F.PRESENT | (F.PAT_HUGE if pat else 0)
    e = Entry.encode(addr, flags, level)
    assert e.is_leaf and e.is_huge and e.page_size == 1 << shift
    assert e.address == addr and int(e.flags) == int(flags)
    assert e.reserved_bits() == 0


def test_encode_refuses_misaligned_and_overlapping_flags():
    with pytest.raises(Misaligned):
        Entry.encode(0x1000, F.PRESENT | F.HUGE, 2)  # a 2 MiB page needs a 2 MiB-aligned address
    with pytest.raises(ValueError):
        Entry.encode(0x1000, F.PAT_HUGE, 1)  # bit 12 is an address bit of a 4 KiB PTE
    with pytest.raises(ValueError):
        Entry.encode(0x1000, F.HUGE, 4)  # PS is reserved in a PML4E


def test_reserved_masks():
    # PS in a PML4E, bits 51:MAXPHYADDR, XD without NXE.
    assert reserved_mask(4, False) & F.HUGE
    assert reserved_mask(1, False, maxphyaddr=46) == ((1 << 52) - 1) & ~((1 << 46) - 1)
    assert reserved_mask(1, False, nxe=False) == 1 << 63
    # Large pages: address bits below the alignment are reserved, except PAT (bit 12).
    assert reserved_mask(2, True) == 0x1F_E000  # bits 20:13
    assert reserved_mask(3, True) == 0x3FFF_E000  # bits 29:13
    assert reserved_mask(3, False, gbpages=False) & F.HUGE
    assert reserved_mask(2, False) == 0 and reserved_mask(3, False) == 0


def test_entry_reserved_bits():
    assert Entry.decode(0x20_0000 | 0x2000 | 0x81, 2).reserved_bits() == 0x2000
    assert Entry.decode(0x20_0000 | 0x1000 | 0x81, 2).reserved_bits() == 0  # PAT bit
    assert Entry.decode(0x1000 | 0x2000 | 1, 1).reserved_bits() == 0  # address bits of a PTE
    assert "not present" in repr(Entry.decode(0, 1))
