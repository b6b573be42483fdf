"""The snapshot's optimistic walk: valid only if every table it read is unchanged."""

from mm import BufferMemory, BumpFrameAllocator, Mapper, PageSize, PteFlags
from mm.walker import walk_arrays
from vmm.inspector.snapshot import _RecordingMemory

P, W, NX = PteFlags.PRESENT, PteFlags.WRITABLE, PteFlags.NO_EXECUTE


def _tree():
    mem = BufferMemory(bytearray(4 << 20))
    m = Mapper.new(mem, BumpFrameAllocator(0x1000, 0x100000))
    m.map_range(0xFFFF_8000_0000_0000, 0x200000, 0x8000, P | W | NX, PageSize.SIZE_4K)
    return mem, m


def test_unchanged_tables_validate():
    mem, m = _tree()
    rec = _RecordingMemory(mem)
    runs = walk_arrays(rec, m.root)
    assert len(runs) == 1 and rec.seen and rec.unchanged()


def test_a_changed_leaf_table_invalidates():
    mem, m = _tree()
    rec = _RecordingMemory(mem)
    walk_arrays(rec, m.root)
    m.unmap(0xFFFF_8000_0000_3000)
    assert not rec.unchanged()


def test_a_new_mapping_elsewhere_invalidates_through_the_root():
    mem, m = _tree()
    rec = _RecordingMemory(mem)
    walk_arrays(rec, m.root)
    m.map(0x40_0000, 0x300000, PageSize.SIZE_4K, P | NX)  # new PML4 entry in the lower half
    assert not rec.unchanged()
