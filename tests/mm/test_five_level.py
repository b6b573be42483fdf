"""5-level paging is a data change: the mapper builds and the walker reads a
PML5 hierarchy given ``levels=(PML5, *LEVELS)``, at addresses that need
linear bits 48..56 (57-bit canonical)."""

from __future__ import annotations

import pytest

from mm.addr import PageSize, is_canonical
from mm.entry import LEVELS, PML5, reserved_mask
from mm.errors import AddressError
from mm.flags import PteFlags as F
from mm.frames import BumpFrameAllocator
from mm.levels import linear_bits
from mm.mapper import Mapper
from mm.physmem import BufferMemory
from mm.walker import coalesce, translate, walk, walk_arrays

from .conftest import MEM_SIZE, POOL
from .reference import naive_translate

LEVELS5 = (PML5, *LEVELS)
RW = F.PRESENT | F.WRITABLE | F.NO_EXECUTE
RX = F.PRESENT
# (virt, phys, size, flags): each virt is canonical with 57 bits and not with 48.
MAPPINGS = [
    (0x0001_0000_0000_0000, 0x20_0000, PageSize.SIZE_4K, RW),  # bit 48: PML5 index 1
    (0x00AB_CDE0_0020_0000, 0x40_0000, PageSize.SIZE_2M, RX),  # bits 55..49
    (0x00FF_FFFF_C000_0000, 0x0, PageSize.SIZE_1G, RW),  # the last GiB of the lower half
    (0xFF00_0000_0000_0000, 0x21_0000, PageSize.SIZE_4K, RX),  # the first page of the upper half
    (0xFFFF_0000_0000_3000, 0x22_0000, PageSize.SIZE_4K, RW | F.USER),  # bits 63..56 and 55..48 set
]


def mapper5(levels=LEVELS5) -> Mapper:
    mem = BufferMemory(bytearray(MEM_SIZE))
    return Mapper.new(mem, BumpFrameAllocator(POOL, MEM_SIZE), levels=levels)


@pytest.fixture
def m() -> Mapper:
    m = mapper5()
    for virt, phys, size, flags in MAPPINGS:
        m.map(virt, phys, size, flags)
    return m


def test_levels_give_the_width():
    assert linear_bits(LEVELS) == 48 and linear_bits(LEVELS5) == 57
    for virt, *_ in MAPPINGS:
        assert is_canonical(virt, 57) and not is_canonical(virt, 48)


def test_the_root_is_a_pml5(m):
    # Each address lands in the root entry its bits 56..48 select, not bits 47..39.
    used = {PML5.index(v) for v, *_ in MAPPINGS}
    assert used == {0x1, 0xAB, 0xFF, 0x100, 0x1FF}
    root = m.mem.read_table(m.root)
    assert {i for i in range(512) if int(root[i]) & F.PRESENT} == used
    assert all(not int(root[i]) & F.HUGE for i in used)


@pytest.mark.parametrize("virt,phys,size,flags", MAPPINGS)
def test_translations_need_the_fifth_level(m, virt, phys, size, flags):
    for off in (0, 0x123, int(size) - 1):
        t = translate(m.mem, m.root, virt + off, levels=LEVELS5)
        assert t is not None and t.phys == phys + off and t.page_size == size
        assert t.flags & (F.WRITABLE | F.USER | F.NO_EXECUTE) == flags & (F.WRITABLE | F.USER | F.NO_EXECUTE)
        assert t == naive_translate(m.mem, m.root, virt + off, levels=LEVELS5)
        assert m.translate(virt + off) == t
    # Neighbours outside the page are unmapped, as is the same address with bit 48+ cleared.
    assert translate(m.mem, m.root, virt - 1, levels=LEVELS5) is None
    assert translate(m.mem, m.root, virt + int(size), levels=LEVELS5) is None


def test_the_walk_yields_every_mapping_in_order(m):
    runs = list(walk(m.mem, m.root, levels=LEVELS5))
    assert [(r.virt, r.phys, r.size, r.page_size) for r in runs] == [
        (v, p, int(s), s) for v, p, s, _ in sorted(MAPPINGS, key=lambda x: x[0])
    ]
    assert coalesce(runs, levels=LEVELS5) == runs  # nothing contiguous to merge
    ra = walk_arrays(m.mem, m.root, 0xFF00_0000_0000_0000, levels=LEVELS5)  # the upper half only
    assert sorted(ra.virt.tolist()) == [0xFF00_0000_0000_0000, 0xFFFF_0000_0000_3000]


def test_a_4_level_mapper_refuses_these_addresses():
    m4 = mapper5(LEVELS)
    with pytest.raises(AddressError):
        m4.map(MAPPINGS[0][0], 0x20_0000, PageSize.SIZE_4K, RW)


def test_the_canonical_hole_moves_to_bit_56():
    m = mapper5()
    with pytest.raises(AddressError):  # bits 63..57 are not copies of bit 56
        m.map(0x0100_0000_0000_0000, 0, PageSize.SIZE_4K, RW)
    with pytest.raises(AddressError):  # runs past the top of the lower half
        m.map_range(0x00FF_FFFF_FFFF_F000, 0, 0x2000, RW)


def test_unmap_and_set_flags(m):
    virt, phys, size, _ = MAPPINGS[3]
    m.set_flags(virt, RW)
    assert translate(m.mem, m.root, virt, levels=LEVELS5).flags & F.WRITABLE
    assert m.unmap(virt) == (phys, size)
    assert translate(m.mem, m.root, virt, levels=LEVELS5) is None


def test_ps_in_a_pml5_entry_is_reserved(m):
    assert reserved_mask(5, False) & F.HUGE
    slot = m.root + 8 * PML5.index(MAPPINGS[0][0])
    m.mem.write_u64(slot, m.mem.read_u64(slot) | F.HUGE)
    report_runs = walk_arrays(m.mem, m.root, levels=LEVELS5)
    assert MAPPINGS[0][0] not in report_runs.virt.tolist()  # the subtree faults (RSVD), as on the CPU
    assert translate(m.mem, m.root, MAPPINGS[0][0], levels=LEVELS5) is None
