"""Page-table diffs between two walks of the same tree."""

from mm import BufferMemory, BumpFrameAllocator, Mapper, PageSize, PteFlags
from mm.walker import walk_arrays
from vmm.inspector.diff import diff_runs, summarize

P, W, NX = PteFlags.PRESENT, PteFlags.WRITABLE, PteFlags.NO_EXECUTE
HI = 0xFFFF_8000_0000_0000


def _mapper():
    mem = BufferMemory(bytearray(8 << 20))
    m = Mapper.new(mem, BumpFrameAllocator(0x1000, 0x100000))
    m.map_range(HI, 0x200000, 0x10000, P | W | NX, PageSize.SIZE_4K)
    m.map_range(0x400000, 0x400000, 0x200000, P | W | NX, PageSize.SIZE_2M)
    return mem, m


def test_identical_walks_have_no_diff():
    mem, m = _mapper()
    a = walk_arrays(mem, m.root)
    assert diff_runs(a, walk_arrays(mem, m.root)) == []


def test_each_kind_of_change():
    mem, m = _mapper()
    before = walk_arrays(mem, m.root)
    m.unmap(HI + 0x3000)
    m.set_flags(HI + 0x5000, P | NX)
    m.unmap(HI + 0x6000)
    m.map(HI + 0x6000, 0x300000, PageSize.SIZE_4K, P | W | NX)
    m.map(HI + 0x20000, 0x310000, PageSize.SIZE_4K, P | NX)
    changes = diff_runs(before, walk_arrays(mem, m.root))
    got = [(c.kind, c.virt, c.size) for c in changes]
    assert got == [
        ("unmapped", HI + 0x3000, 0x1000),
        ("flags", HI + 0x5000, 0x1000),
        ("moved", HI + 0x6000, 0x1000),
        ("mapped", HI + 0x20000, 0x1000),
    ]
    moved = changes[2]
    assert moved.old_phys == 0x206000 and moved.new_phys == 0x300000
    s = summarize(changes)
    assert all(s[k]["ranges"] == 1 for k in ("mapped", "unmapped", "moved", "flags"))


def test_adjacent_changes_merge():
    mem, m = _mapper()
    before = walk_arrays(mem, m.root)
    for i in range(4):
        m.unmap(HI + i * 0x1000)
    changes = diff_runs(before, walk_arrays(mem, m.root))
    assert [(c.kind, c.virt, c.size) for c in changes] == [("unmapped", HI, 0x4000)]


def test_diff_against_empty():
    mem, m = _mapper()
    a = walk_arrays(mem, m.root)
    empty = walk_arrays(BufferMemory(bytearray(1 << 20)), 0x1000)
    assert summarize(diff_runs(empty, a))["mapped"]["bytes"] == 0x10000 + 0x200000
    assert summarize(diff_runs(a, empty))["unmapped"]["bytes"] == 0x10000 + 0x200000
