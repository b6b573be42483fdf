"""mm.rewalk: a traced walk refreshed after edits equals a fresh walk of the edited tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm import ADDR_MASK, BufferMemory, BumpFrameAllocator, Mapper, PageSize, PteFlags
from mm.errors import MMError, NotCopied
from mm.findings import WalkReport
from mm.rewalk import changed_tables, copy_tables, refresh
from mm.walker import WalkTrace, walk_arrays, walk_traced

P, W, U, NX = PteFlags.PRESENT, PteFlags.WRITABLE, PteFlags.USER, PteFlags.NO_EXECUTE
MEM = 16 << 20
#: Where the random mappings go: a few 1 GiB slots in each half, so edits
#: meet at every level (shared PML4/PDPT/PD tables, runs across table edges).
SLOTS = [0x0, 0x4000_0000, 0x7F_C000_0000, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_8000_0000, 0xFFFF_FFFF_C000_0000]
FLAGS = [P | W | NX, P | NX, P, P | U | NX, P | W | U | NX]

mapping = st.tuples(
    st.sampled_from(SLOTS),
    # 4 KiB (or 2 MiB) page index in the slot; often near a table's edge so runs cross it
    st.one_of(st.integers(0, 1023), st.integers(500, 520)),
    st.sampled_from([PageSize.SIZE_4K, PageSize.SIZE_4K, PageSize.SIZE_4K, PageSize.SIZE_2M]),
    st.integers(1, 24),  # pages
    st.sampled_from(FLAGS),
)
edit = st.one_of(
    st.tuples(st.just("map"), mapping),
    st.tuples(st.just("unmap"), st.integers(0, 10_000), st.integers(0, 10_000)),
    st.tuples(st.just("unmap_run"), st.integers(0, 10_000)),
    st.tuples(st.just("entry"), st.integers(0, 10_000), st.integers(0, 511),
              st.sampled_from([int(W), int(U), int(NX), int(P), 1 << 9])),
    # Rights and presence, and bits the walk must ignore in a directory entry
    # but not in a leaf (A, an AVL bit a kernel may count in, G).
    st.tuples(st.just("present_entry"), st.integers(0, 10_000),
              st.sampled_from([int(W), int(U), int(NX), int(P), 1 << 5, 1 << 9, int(PteFlags.GLOBAL)])),
)


def _build(maps):
    mem = BufferMemory(bytearray(MEM))
    # Tables emptied by an unmap are freed (their directory entry cleared).
    m = Mapper.new(mem, BumpFrameAllocator(0x80_0000, MEM), forbid_wx=False, free_frame=lambda frame: None)
    for slot, index, size, count, flags in maps:
        _map(m, slot, index, size, count, flags)
    return mem, m


def _map(m, slot, index, size, count, flags):
    step = int(size)
    count = min(count, 2) if step > 4096 else count
    virt = slot + index * step
    phys = (index * 0x5000 // step * step) % (0x80_0000 - count * step)  # inside RAM, below the tables
    try:
        m.map_range(virt, phys, count * step, flags, size)
    except MMError:
        pass  # overlaps an earlier mapping: keep the tree as it was


def _apply(mem, m, trace: WalkTrace, runs, e):
    kind = e[0]
    if kind == "map":
        _map(m, *e[1])
    elif kind == "unmap" and len(runs):
        run = next(r for i, r in enumerate(runs.runs()) if i == e[1] % len(runs))
        try:
            m.unmap(run.virt + e[2] % (run.size // run.page_size) * run.page_size)
        except MMError:
            pass
    elif kind == "unmap_run" and len(runs):
        # Every page of a run: leaf tables left empty are freed, their
        # directory entries cleared.
        run = next(r for i, r in enumerate(runs.runs()) if i == e[1] % len(runs))
        for k in range(run.size // run.page_size):
            try:
                m.unmap(run.virt + k * run.page_size)
            except MMError:
                pass
    elif kind == "present_entry" and len(trace):
        # Flip a bit of a present entry of any table (a directory entry:
        # the table below is reached with other rights, or not at all).
        present = np.argwhere(trace.rows & 1)
        if not len(present):
            return
        t, j = present[e[1] % len(present)].tolist()
        addr = int(trace.table[t]) + 8 * j
        mem.write_u64(addr, mem.read_u64(addr) ^ e[2])
    elif kind == "entry" and len(trace):
        # Flip a bit of some entry of some table the walk read (upper-level
        # W/U/NX/P changes the effective flags of a whole subtree).
        table = int(trace.table[e[1] % len(trace)])
        addr = table + 8 * e[2]
        mem.write_u64(addr, mem.read_u64(addr) ^ e[3])


def _same(a, b):
    for name in ("virt", "phys", "size", "flags", "page_size", "level"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mapping, min_size=1, max_size=8), st.lists(edit, min_size=1, max_size=5))
def test_refresh_equals_a_fresh_walk(maps, edits):
    mem, m = _build(maps)
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    for e in edits:
        _apply(mem, m, trace, runs, e)
    got = refresh(mem, runs, trace, report)
    full_report = WalkReport()
    full = walk_arrays(mem, m.root, report=full_report)
    if got is None:
        # Only where a full walk has something to say that a refresh cannot.
        assert full_report.findings or report.findings
        return
    _same(got.runs, full)
    assert got.report.tables_visited == full_report.tables_visited
    assert got.report.tables.keys() == full_report.tables.keys()
    for level, frames in full_report.tables.items():
        assert np.array_equal(got.report.tables[level], frames)
    # The refreshed trace describes the tables as they are now: nothing changed since.
    assert not changed_tables(mem, got.trace).any()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mapping, min_size=1, max_size=8), st.lists(edit, min_size=1, max_size=5),
       st.lists(edit, min_size=1, max_size=3))
def test_refresh_on_a_copy_equals_a_fresh_walk_at_the_copy(maps, edits, later):
    """copy_tables copies all a refresh reads: refreshed on the copy after
    the memory moved on, the walk is the one of the moment of the copy."""
    mem, m = _build(maps)
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    for e in edits:
        _apply(mem, m, trace, runs, e)
    copy = copy_tables(mem, trace)
    full_report = WalkReport()
    full = walk_arrays(mem, m.root, report=full_report)
    for e in later:  # the guest runs on: nothing of this may show
        _apply(mem, m, trace, runs, e)
    got = refresh(copy, runs, trace, report)
    if got is None:
        assert full_report.findings or report.findings
        return
    _same(got.runs, full)
    assert got.report.tables_visited == full_report.tables_visited


def test_a_copy_refuses_frames_it_does_not_hold():
    mem, m = _build([(SLOTS[3], 5, PageSize.SIZE_4K, 20, P | W | NX)])
    _, trace = walk_traced(mem, m.root)
    copy = copy_tables(mem, trace)
    assert np.array_equal(copy.read_tables(trace.table), trace.rows)
    with pytest.raises(NotCopied):
        copy.read_table(0x7F_F000)


def test_nothing_changed_reuses_the_walk():
    mem, m = _build([(SLOTS[3], 5, PageSize.SIZE_4K, 20, P | W | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    got = refresh(mem, runs, trace, report)
    assert got is not None and got.changed == 0 and got.runs is runs


def test_a_leaf_edit_is_patched_without_a_walk():
    mem, m = _build([(SLOTS[3], 0, PageSize.SIZE_4K, 600, P | W | NX), (SLOTS[0], 0, PageSize.SIZE_4K, 4, P | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    m.unmap(SLOTS[3] + 0x1000 * 513)  # in the second PT of the big range
    got = refresh(mem, runs, trace, report)
    assert got is not None and got.changed == 1 and got.rewalked == 0
    _same(got.runs, walk_arrays(mem, m.root))
    assert len(got.runs) == len(runs) + 1  # the range now has a hole


def test_a_new_leaf_table_is_decoded_alone():
    mem, m = _build([(SLOTS[3], 0, PageSize.SIZE_4K, 600, P | W | NX), (SLOTS[0], 0, PageSize.SIZE_4K, 4, P | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    m.map(SLOTS[3] + 0x20_0000 * 7, 0x30_0000, PageSize.SIZE_4K, P | NX)  # a new PT under an existing PD
    got = refresh(mem, runs, trace, report)
    assert got is not None and got.changed == 1 and got.rewalked == 1  # the new PT, nothing else
    _same(got.runs, walk_arrays(mem, m.root))
    assert got.report.tables_visited == len(trace) + 1


def test_an_upper_level_edit_rewalks_the_subtree_below_it():
    mem, m = _build([(SLOTS[3], 0, PageSize.SIZE_4K, 600, P | W | NX), (SLOTS[0], 0, PageSize.SIZE_4K, 4, P | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    pdpt = int(trace.table[(trace.level == 1) & (trace.base == SLOTS[3] & ((1 << 48) - 1))][0])
    index = (SLOTS[3] >> 30) & 511
    mem.write_u64(pdpt + 8 * index, mem.read_u64(pdpt + 8 * index) & ~int(W))  # read-only from here down
    got = refresh(mem, runs, trace, report)
    assert got is not None and got.rewalked == 1 + 1 + 2  # the PDPT, its PD, the PD's two PTs
    _same(got.runs, walk_arrays(mem, m.root))
    assert not any(r.flags & W for r in got.runs.runs() if r.virt >= SLOTS[3])


def _entry_of(mem, m, virt, level_index):
    """Physical address of the entry that maps ``virt`` at ``level_index`` (0: PML4)."""
    table = m.root
    for li in range(level_index):
        table = mem.read_u64(table + 8 * ((virt >> (39 - 9 * li)) & 511)) & ADDR_MASK
    return table + 8 * ((virt >> (39 - 9 * level_index)) & 511)


def test_ignored_directory_bits_change_nothing():
    # The guest counts a table's entries in its parent entry's AVL bits: every
    # map/unmap rewrites the directory entry, the walk's answer stays.
    mem, m = _build([(SLOTS[3], 0, PageSize.SIZE_4K, 20, P | W | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    pde = _entry_of(mem, m, SLOTS[3], 2)
    mem.write_u64(pde, mem.read_u64(pde) ^ (1 << 9) ^ (1 << 5))
    got = refresh(mem, runs, trace, report)
    assert got is not None and got.changed == 1 and got.rewalked == 0 and got.spans == ()
    _same(got.runs, runs)


def test_a_flag_of_a_large_leaf_counts():
    mem, m = _build([(SLOTS[3], 0, PageSize.SIZE_2M, 2, P | W | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    pde = _entry_of(mem, m, SLOTS[3] + 0x20_0000, 2)
    mem.write_u64(pde, mem.read_u64(pde) | int(PteFlags.GLOBAL))
    got = refresh(mem, runs, trace, report)
    assert got is not None and len(got.runs) == 2
    _same(got.runs, walk_arrays(mem, m.root))


def test_hostile_trees_are_left_to_the_full_walk():
    mem, m = _build([(SLOTS[3], 0, PageSize.SIZE_4K, 4, P | W | NX)])
    report = WalkReport()
    runs, trace = walk_traced(mem, m.root, report=report)
    # Point a PML4 entry of the lower half at the root itself: a cycle, a finding.
    mem.write_u64(m.root, m.root | int(P | W))
    assert refresh(mem, runs, trace, report) is None
