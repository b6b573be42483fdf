"""Walker properties: mapped == walked, coalescing == naive reference, SDM permission rules."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm.addr import PAGE_1G, PAGE_2M, PAGE_4K, PageSize, canonicalize
from mm.entry import Entry
from mm.errors import NotMapped
from mm.findings import WalkReport
from mm.flags import PteFlags
from mm.physmem import BufferMemory
from mm.walker import (
    coalesce,
    read_virt,
    reverse,
    translate,
    walk,
    walk_arrays,
    write_virt,
)
from tests.mm.reference import naive_translate, naive_walk

from .conftest import new_mapper

F = PteFlags
HOLE = 0xFFFF_8000_0000_0000
SIZES = [PAGE_4K, PAGE_2M, PAGE_1G]
LEAF_FLAG_CHOICES = [F.WRITABLE, F.USER, F.NO_EXECUTE, F.GLOBAL, F.WRITE_THROUGH, F.CACHE_DISABLE]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mapping_sets(draw):
    """Non-overlapping ``(virt, phys, size, count, flags, pat)`` requests of all three sizes."""
    taken: list[tuple[int, int]] = []
    out = []
    for _ in range(draw(st.integers(1, 8))):
        size = draw(st.sampled_from(SIZES))
        pml4 = draw(st.sampled_from([0, 1, 255, 256, 511]))
        pdpt = draw(st.sampled_from([0, 1, 510, 511]))
        pd = draw(st.sampled_from([0, 1, 2, 510, 511])) if size < PAGE_1G else 0
        pt = draw(st.sampled_from([0, 1, 300, 510, 511])) if size == PAGE_4K else 0
        count = draw(st.integers(1, {PAGE_4K: 40, PAGE_2M: 4, PAGE_1G: 2}[size]))
        lin = (pml4 << 39) | (pdpt << 30) | (pd << 21) | (pt << 12)
        end = lin + count * size
        half_end = 1 << 47 if lin < 1 << 47 else 1 << 48
        if end > half_end or any(a < end and lin < b for a, b in taken):
            continue
        taken.append((lin, end))
        phys = draw(st.integers(0, (1 << 40) // size - count)) * size
        flags = F.PRESENT
        for f in draw(st.lists(st.sampled_from(LEAF_FLAG_CHOICES), max_size=4)):
            flags |= f
        pat = draw(st.booleans())
        out.append((canonicalize(lin), phys, size, count, flags, pat))
    return out


def build(requests, free=False):
    m = new_mapper(forbid_wx=False, free=free)
    for virt, phys, size, count, flags, pat in requests:
        extra = (F.HUGE if size == PAGE_4K else F.PAT_HUGE) if pat else 0  # where each level keeps PAT
        m.map_range(virt, phys, size * count, flags | extra, size)
    return m


def expected_runs(requests):
    """Oracle: one record per page, merged when virtually+physically contiguous with equal flags."""
    pages = []
    for virt, phys, size, count, flags, pat in requests:
        f = int(flags) | (F.PAT_HUGE if pat else 0)
        pages += [(virt + i * size, phys + i * size, size, f, size) for i in range(count)]
    pages.sort()
    out: list[list[int]] = []
    for v, p, s, f, ps in pages:
        if out and out[-1][0] + out[-1][2] == v and out[-1][1] + out[-1][2] == p and out[-1][3:] == [f, ps] and v != HOLE:
            out[-1][2] += s
        else:
            out.append([v, p, s, f, ps])
    return [tuple(r) for r in out]


def as_tuples(runs):
    return [(r.virt, r.phys, r.size, int(r.flags), int(r.page_size)) for r in runs]


@SETTINGS
@given(mapping_sets())
def test_walk_returns_exactly_the_mapped_runs(requests):
    m = build(requests)
    report = WalkReport()
    runs = list(walk(m.mem, m.root, report=report))
    assert as_tuples(runs) == expected_runs(requests)
    assert [f.kind for f in report.findings if f.kind != "leaf_outside_ram"] == []
    # The vectorised walker agrees with the entry-by-entry reference.
    assert runs == coalesce(naive_walk(m.mem, m.root))


@SETTINGS
@given(mapping_sets(), st.data())
def test_translate_matches_reference(requests, data):
    m = build(requests)
    for virt, phys, size, count, flags, pat in requests:
        off = data.draw(st.integers(0, size * count - 1))
        t = translate(m.mem, m.root, virt + off)
        assert t is not None and t == naive_translate(m.mem, m.root, virt + off)
        assert t.phys == phys + off and t.page_size == size
    assert translate(m.mem, m.root, 0x8000_0000_0000) is None  # non-canonical


@SETTINGS
@given(mapping_sets(), st.data())
def test_unmap_restores_previous_state(requests, data):
    keep = data.draw(st.integers(0, len(requests)))
    base, extra = requests[:keep], requests[keep:]
    m = build(base, free=True)
    before = list(walk(m.mem, m.root))
    allocated = len(m.frames.allocated)
    for virt, phys, size, count, flags, pat in extra:
        extra_flags = (F.HUGE if size == PAGE_4K else F.PAT_HUGE) if pat else 0
        m.map_range(virt, phys, size * count, flags | extra_flags, size)
    for virt, phys, size, count, flags, pat in extra:
        for i in range(count):
            assert m.unmap(virt + i * size) == (phys + i * size, size)
    assert list(walk(m.mem, m.root)) == before
    # Every table the extra mappings needed (and only those) was freed again.
    assert len(m.frames.allocated) - len(m.freed) == allocated
    assert base or not m.mem.read_table(m.root).any()


@SETTINGS
@given(mapping_sets().filter(bool), st.data())
def test_range_walks_are_clipped_slices_of_the_full_walk(requests, data):
    m = build(requests)
    full = list(walk(m.mem, m.root))
    virt, phys, size, count, flags, pat = data.draw(st.sampled_from(requests))
    lo = virt + data.draw(st.integers(0, size * count - 1))
    hi = lo + data.draw(st.integers(1, 3 * size))
    part = list(walk(m.mem, m.root, lo, hi))
    assert part and part[0].virt == lo and all(lo <= r.virt and r.end <= hi for r in part)
    for r in part:
        whole = next(w for w in full if w.virt <= r.virt < w.end)
        assert r.end <= whole.end and r.phys == whole.phys + (r.virt - whole.virt) and r.flags == whole.flags


def craft(levels_bits):
    """A hand-built path PML4 -> PDPT -> PD -> PT to virt 0x1000 with given bits per level."""
    mem = BufferMemory(bytearray(0x10000))
    tables = [0x1000, 0x2000, 0x3000, 0x4000]
    for level, (table, bits) in zip((4, 3, 2, 1), zip(tables, levels_bits)):
        target = tables[4 - level + 1] if level > 1 else 0x9000
        e = Entry.encode(target, F.PRESENT | bits, level)
        mem.write_u64(table + 8 * (1 if level == 1 else 0), e.value)
    return mem, tables[0]


_bits = st.sampled_from([0, F.WRITABLE, F.USER, F.NO_EXECUTE, F.WRITABLE | F.USER, F.WRITABLE | F.USER | F.NO_EXECUTE])


@settings(max_examples=60, deadline=None)
@given(st.lists(_bits, min_size=4, max_size=4))
def test_effective_permissions_follow_the_sdm(bits):
    """W and U only if set at every level, NX if set at any level (SDM 4.6)."""
    mem, cr3 = craft(bits)
    t = translate(mem, cr3, 0x1000)
    want = F.PRESENT
    if all(b & F.WRITABLE for b in bits):
        want |= F.WRITABLE
    if all(b & F.USER for b in bits):
        want |= F.USER
    if any(b & F.NO_EXECUTE for b in bits):
        want |= F.NO_EXECUTE
    assert t.flags == want and t.phys == 0x9000
    assert naive_translate(mem, cr3, 0x1000) == t


def test_nxe_off_makes_xd_reserved():
    mem, cr3 = craft([0, 0, F.NO_EXECUTE, 0])
    assert translate(mem, cr3, 0x1000, nxe=False) is None
    assert translate(mem, cr3, 0x1000) is not None


def test_accessed_dirty_only_on_request():
    mem, cr3 = craft([0, 0, 0, F.ACCESSED | F.DIRTY])
    assert translate(mem, cr3, 0x1000).flags == F.PRESENT
    keep = F.GLOBAL | F.ACCESSED | F.DIRTY
    assert translate(mem, cr3, 0x1000, leaf_flags=keep).flags == F.PRESENT | F.ACCESSED | F.DIRTY


def test_runs_never_merge_across_the_canonical_hole():
    m = new_mapper()
    m.map(0x7FFF_FFFF_F000, 0x10_0000, PageSize.SIZE_4K, F.PRESENT)
    m.map(HOLE, 0x10_1000, PageSize.SIZE_4K, F.PRESENT)
    assert [(r.virt, r.size) for r in walk(m.mem, m.root)] == [(0x7FFF_FFFF_F000, PAGE_4K), (HOLE, PAGE_4K)]


def test_read_write_virt_and_reverse():
    m = new_mapper(size=1 << 22)
    # Two virtually adjacent pages backed by non-adjacent frames, plus an alias.
    m.map(0x40_0000, 0x30_0000, PageSize.SIZE_4K, F.PRESENT)
    m.map(0x40_1000, 0x20_0000, PageSize.SIZE_4K, F.PRESENT)
    m.map(HOLE + 0x30_0000, 0x30_0000, PageSize.SIZE_4K, F.PRESENT)
    write_virt(m.mem, m.root, 0x40_0FFE, b"abcd")
    assert m.mem.read(0x30_0FFE, 2) == b"ab" and m.mem.read(0x20_0000, 2) == b"cd"
    assert read_virt(m.mem, m.root, 0x40_0FFE, 4) == b"abcd"
    assert reverse(m.mem, m.root, 0x30_0010) == [0x40_0010, HOLE + 0x30_0010]
    with pytest.raises(NotMapped) as ei:
        read_virt(m.mem, m.root, 0x40_1FF0, 0x20)
    assert ei.value.virt == 0x40_2000
    with pytest.raises(NotMapped):
        write_virt(m.mem, m.root, 0x40_1FFF, b"xy")
    assert m.mem.read(0x20_0FFF, 1) == b"\0"  # nothing written when the range is not whole


def test_walk_arrays_and_tables_report():
    m = new_mapper()
    m.map_range(0, 0, 1 << 30, F.PRESENT, PageSize.SIZE_2M)
    report = WalkReport()
    ra = walk_arrays(m.mem, m.root, report=report)
    assert len(ra) == 1 and int(ra.size[0]) == 1 << 30
    assert {lv: len(t) for lv, t in report.tables.items()} == {4: 1, 3: 1, 2: 1}
    assert report.tables_visited == 3
