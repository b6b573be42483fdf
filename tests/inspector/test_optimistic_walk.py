"""The snapshot's optimistic walk: re-read in the pause, re-walked only below what changed."""

from mm import BufferMemory, BumpFrameAllocator, Mapper, PageSize, PteFlags
from mm.findings import WalkReport
from mm.rewalk import changed_tables
from mm.walker import walk_arrays, walk_traced
from mm.rewalk import refresh, spans_touch
from vmm.inspector.snapshot import same_translation

P, W, NX = PteFlags.PRESENT, PteFlags.WRITABLE, PteFlags.NO_EXECUTE
HEAP = 0xFFFF_8000_0000_0000


def _tree():
    mem = BufferMemory(bytearray(4 << 20))
    m = Mapper.new(mem, BumpFrameAllocator(0x1000, 0x100000))
    m.map_range(HEAP, 0x200000, 0x8000, P | W | NX, PageSize.SIZE_4K)
    return mem, m


def test_unchanged_tables_validate():
    mem, m = _tree()
    runs, trace = walk_traced(mem, m.root)
    assert len(runs) == 1 and len(trace) == 4 and not changed_tables(mem, trace).any()


def test_a_changed_leaf_table_is_the_only_one_changed():
    mem, m = _tree()
    _, trace = walk_traced(mem, m.root)
    m.unmap(HEAP + 0x3000)
    changed = changed_tables(mem, trace)
    assert changed.sum() == 1 and trace.level[changed].tolist() == [3]


def test_a_new_mapping_elsewhere_changes_the_root():
    mem, m = _tree()
    _, trace = walk_traced(mem, m.root)
    m.map(0x40_0000, 0x300000, PageSize.SIZE_4K, P | NX)  # new PML4 entry in the lower half
    assert changed_tables(mem, trace)[trace.level == 0].all()


def test_the_heap_walk_survives_edits_elsewhere_only():
    mem, m = _tree()
    start, end = HEAP, HEAP + 0x4000
    before = walk_arrays(mem, m.root)
    m.unmap(HEAP + 0x6000)  # past the heap's end
    assert same_translation(before, walk_arrays(mem, m.root), start, end)
    m.unmap(HEAP + 0x2000)  # inside it
    assert not same_translation(before, walk_arrays(mem, m.root), start, end)


def test_a_refresh_says_where_it_changed_the_runs():
    mem, m = _tree()
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    m.unmap(HEAP + 0x6000)
    fixed = refresh(mem, runs, trace, report)
    assert fixed is not None and fixed.touches(HEAP + 0x6000, HEAP + 0x7000)
    assert not fixed.touches(HEAP, HEAP + 0x4000)
    assert spans_touch(fixed.spans, HEAP, HEAP + 0x8000) and not spans_touch((), HEAP, HEAP + 0x8000)
