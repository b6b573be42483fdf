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


from hypothesis import given, settings, strategies as st

_PAGES = 64  # a small window of 4 KiB pages, kept in one page table


@st.composite
def _mapping(draw):
    """A random 4 KiB mapping of the window: page -> (frame, writable)."""
    chosen = draw(st.lists(st.integers(0, _PAGES - 1), unique=True, max_size=_PAGES))
    return {p: (draw(st.integers(0x100, 0x140)), draw(st.booleans())) for p in chosen}


def _walk_of(mapping):
    mem = BufferMemory(bytearray(2 << 20))
    m = Mapper.new(mem, BumpFrameAllocator(0x1000, 0x20000))
    for page, (frame, writable) in mapping.items():
        flags = P | NX | (W if writable else 0)
        m.map(HI + page * 0x1000, frame * 0x1000, PageSize.SIZE_4K, flags)
    return walk_arrays(mem, m.root)


@settings(max_examples=150, deadline=None)
@given(_mapping(), _mapping())
def test_diff_agrees_with_a_page_by_page_comparison(old, new):
    changes = diff_runs(_walk_of(old), _walk_of(new))
    seen = {}
    for c in changes:
        assert c.size % 0x1000 == 0 and c.size > 0
        for i in range(c.size // 0x1000):
            page = (c.virt - HI) // 0x1000 + i
            assert page not in seen, "changes overlap"
            seen[page] = c.kind
    for page in range(_PAGES):
        a, b = old.get(page), new.get(page)
        if a is None and b is None or a == b:
            expected = None
        elif a is None:
            expected = "mapped"
        elif b is None:
            expected = "unmapped"
        elif a[0] != b[0]:
            expected = "moved"
        else:
            expected = "flags"
        assert seen.get(page) == expected, (page, a, b, seen.get(page))
