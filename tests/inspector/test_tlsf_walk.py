"""The host's walk of the guest's TLSF heap (tags and segregated lists), on
synthetic heaps laid out as docs/ABI.md "Heap index" says, on hostile ones,
and on a real guest (the guest's tag hash must match the host's)."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mm import BufferMemory
from mm.walker import RunArrays
from vmm.abi import ReportKind
from vmm.devices import Stop
from vmm.inspector.heap import RunTranslator
from vmm.inspector.tlsf import walk_heap_any
from vmm.inspector.tlsf import (FREE, INDEX_MAGIC, PREV_FREE, make_tag, mapping, tag_check, walk_tlsf)

HEAP = 0xFFFF_C000_0000_0000
INDEX = 0xFFFF_FFFF_8000_0000
PHYS, INDEX_PHYS = 0x10000, 0x8000
SIZE = 0x10000
FL, SL = 20, 16


class Heap:
    """A TLSF heap image: blocks (size, free) tiling [HEAP+8, sentinel)."""

    def __init__(self, blocks, *, findings=0):
        self.mem = BufferMemory(bytearray(0x40000))
        self.heads: dict[tuple[int, int], list[int]] = {}
        addr, prev_free = HEAP + 8, False
        for size, free in blocks:
            self.w(addr, make_tag(addr, size, (FREE if free else 0) | (PREV_FREE if prev_free else 0)))
            if free:
                self.w(addr + size - 8, size)
                self.heads.setdefault(mapping(size), []).append(addr)
            prev_free, addr = free, addr + size
        self.sentinel = addr
        self.top = 0
        if prev_free:  # the last free block is the top: on no list
            self.top = addr - blocks[-1][0]
            self.heads[mapping(blocks[-1][0])].remove(self.top)
            if not self.heads[mapping(blocks[-1][0])]:
                del self.heads[mapping(blocks[-1][0])]
        self.w(addr, make_tag(addr, 0, PREV_FREE if prev_free else 0))
        for members in self.heads.values():
            for i, b in enumerate(members):
                self.w(b + 8, members[i + 1] if i + 1 < len(members) else 0)
                self.w(b + 16, members[i - 1] if i else 0)
        self.findings = findings
        self.write_index()

    def w(self, virt: int, value: int) -> None:
        self.mem.write(PHYS + virt - HEAP, struct.pack("<Q", value))

    def write_index(self) -> None:
        fl_bitmap, sl_bitmap, heads = 0, [0] * FL, [0] * (FL * SL)
        for (fl, sl), members in self.heads.items():
            fl_bitmap |= 1 << fl
            sl_bitmap[fl] |= 1 << sl
            heads[fl * SL + sl] = members[0]
        raw = struct.pack("<QIIIIQIIQ", INDEX_MAGIC, 1, 2728, 1, 1, self.findings, 3 if self.findings else 0, 0,
                          HEAP + 0x100 if self.findings else 0)
        raw += struct.pack("<QQIIII", HEAP + 8, self.sentinel, fl_bitmap, SL, FL, 32)
        raw += struct.pack(f"<{FL}I", *sl_bitmap) + struct.pack(f"<{FL * SL}Q", *heads) + struct.pack("<Q", self.top)
        self.mem.write(INDEX_PHYS, raw)

    def walk(self):
        runs = RunArrays(*(np.array(v, dtype=np.uint64) for v in
                           ([HEAP, INDEX], [PHYS, INDEX_PHYS], [SIZE, 0x1000], [3, 3], [4096, 4096], [1, 1])))
        return walk_heap_any(self.mem, RunTranslator(runs), HEAP, HEAP + SIZE, 0, INDEX)


LAYOUT = [(0x40, False), (0x100, True), (0x30, False), (0x20, True), (0x50, False), (0x1000, True), (0x80, False)]


def kinds(view):
    return [f.kind for f in view.findings]


def test_tag_hash_and_list_mapping_match_the_guest_source():
    # Values computed by the guest's formulas (docs/ABI.md): a change on either side breaks this.
    assert tag_check(0, 0) == 0
    assert tag_check(0xFFFF_C000_0000_0008, 0x40) == (((0xFFFF_C000_0000_0008 ^ (0x40 << 23)) * 0x9E3779B97F4A7C15)
                                                      % (1 << 64)) >> 48
    assert mapping(32) == (0, 2) and mapping(255 & ~15) == (0, 15)
    assert mapping(256) == (1, 0) and mapping(0x1000) == (5, 0) and mapping(3088) == (4, 8)


def test_well_formed_heap():
    h = Heap(LAYOUT)
    v = h.walk()
    assert v.allocator == "tlsf" and not v.findings, v.findings
    assert v.blocks == [(HEAP + 8 + 0x40, 0x100), (HEAP + 8 + 0x170, 0x20), (HEAP + 8 + 0x1E0, 0x1000)]
    assert v.used_blocks == 4 and v.free_bytes == 0x1120 and v.largest_free == 0x1000
    assert sum(v.lists.values()) == 3
    doc = v.to_json()
    assert doc["allocator"] == "tlsf" and doc["used_blocks"] == 4 and doc["lists"]


def test_guest_findings_are_a_warning():
    v = Heap(LAYOUT, findings=2).walk()
    assert kinds(v) == ["heap-guest-finding"] and v.guest_findings == 2
    assert v.findings[0].severity.name == "WARNING"


def test_overflow_into_a_tag():
    h = Heap(LAYOUT)
    h.w(HEAP + 8 + 0x40 + 0x100 + 0x30 - 0x30 + 0x30, 0x4141_4141_4141_4141)  # the tag after the 0x30 block
    assert "heap-bad-tag" in kinds(h.walk())


def test_bad_footer():
    h = Heap(LAYOUT)
    h.w(HEAP + 8 + 0x40 + 0x100 - 8, 0x20)
    assert kinds(h.walk()) == ["heap-bad-footer"]


def test_cross_linked_lists():
    h = Heap(LAYOUT)
    small = HEAP + 8 + 0x170  # the 0x20 block, alone on its list
    big = HEAP + 8 + 0x1E0
    h.w(small + 8, big)  # small's list runs into the 0x1000 block's list
    found = kinds(h.walk())
    assert "heap-cross-linked" in found


def test_loop_in_a_list_is_bounded():
    h = Heap(LAYOUT)
    b = HEAP + 8 + 0x40
    h.w(b + 8, b)
    assert "heap-cross-linked" in kinds(h.walk())


def test_unlisted_and_bitmap_mismatch():
    h = Heap(LAYOUT)
    h.heads.pop(mapping(0x20))
    h.write_index()
    assert kinds(h.walk()) == ["heap-unlisted"]
    h = Heap(LAYOUT)
    raw = bytearray(h.mem.read(INDEX_PHYS, 48 + 20))
    struct.pack_into("<I", raw, 48 + 16, 0)  # fl_bitmap cleared
    h.mem.write(INDEX_PHYS, bytes(raw))
    assert set(kinds(h.walk())) == {"heap-bitmap"}


def test_top_block_is_on_no_list():
    h = Heap(LAYOUT[:-1])  # ends with the free 0x1000 block: the top
    v = h.walk()
    assert not v.findings, v.findings
    assert v.top == HEAP + 8 + 0x1E0 and (v.top, 0x1000) in v.blocks and sum(v.lists.values()) == 2
    h.top = 0
    h.write_index()
    assert set(kinds(h.walk())) == {"heap-bad-top", "heap-unlisted"}


def test_uncoalesced_neighbours():
    h = Heap([(0x40, False), (0x40, True), (0x40, True), (0x40, False)])
    assert "heap-uncoalesced" in kinds(h.walk())


def test_list_backing_falls_back_to_the_free_list():
    h = Heap(LAYOUT)
    raw = bytearray(h.mem.read(INDEX_PHYS, 24))
    struct.pack_into("<I", raw, 16, 2)
    h.mem.write(INDEX_PHYS, bytes(raw))
    v = h.walk()
    assert v.allocator == "list" and v.blocks == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 0x1200 // 8), st.integers(0, (1 << 64) - 1)),
                min_size=1, max_size=6))
def test_corrupted_heap_never_hangs_or_raises(writes):
    """A well-formed heap with random qwords overwritten (heap or index): findings, never a hang."""
    h = Heap(LAYOUT)
    for in_index, slot, value in writes:
        if in_index:
            if slot * 8 >= 48:  # keep the magic/header: the geometry checks are tested above
                h.mem.write(INDEX_PHYS + (slot * 8) % 2728, struct.pack("<Q", value))
        else:
            h.w(HEAP + slot * 8, value)
    runs = RunArrays(*(np.array(v, dtype=np.uint64) for v in
                       ([HEAP, INDEX], [PHYS, INDEX_PHYS], [SIZE, 0x1000], [3, 3], [4096, 4096], [1, 1])))
    v = walk_tlsf(h.mem, RunTranslator(runs), INDEX, HEAP, HEAP + SIZE, max_blocks=5000)
    assert len(v.blocks) <= 5000


def _stop_at_summary(report):
    return Stop(0, "summary", "inspect") if report.kind == ReportKind.SUMMARY else None


@pytest.mark.kvm
@pytest.mark.parametrize("allocator", ["tlsf", "list"])
def test_live_guest_heap_walks_clean(vmm_vm, allocator):
    from vmm.inspector.snapshot import take_snapshot
    from vmm.inspector.target import LocalTarget
    from vmm.inspector.views import inspect

    # After random traffic the heap holds live and cached blocks of many sizes.
    vm = vmm_vm(f"allocator={allocator} tests=heap::random_mixed", timeout=60, on_report=_stop_at_summary)
    assert vm.run().stop_reason == "summary"
    view = inspect(take_snapshot(LocalTarget(vm)), vm.memory)
    h = view.heap
    assert h is not None and h.allocator == allocator
    assert not h.findings, h.findings
    assert h.blocks and h.free_bytes > 0
    if allocator == "tlsf":
        assert h.used_blocks > 0 and h.cached_blocks > 0
        assert sum(h.lists.values()) + (h.top != 0) == len(h.blocks)
