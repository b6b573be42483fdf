"""A small heap copied whole in the hold and walked on the copy afterwards
(vmm/inspector/heap_copy.py): the walk of the copy is the walk of the
moment of the copy, whatever the memory does before or after."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mm import BufferMemory
from mm.errors import Misaligned, NotCopied
from mm.physmem import FrameCopy
from mm.walker import RunArrays
from vmm.inspector.heap import RunTranslator, walk_free_list
from vmm.inspector.heap_copy import HeapCopier
from vmm.inspector.tlsf import walk_heap_any

from tests.inspector.test_tlsf_walk import HEAP as T_HEAP, INDEX, INDEX_PHYS, LAYOUT, Heap
from tests.inspector.test_tlsf_walk import PHYS as T_PHYS, SIZE as T_SIZE

HEAP = 0xFFFF_C000_0000_0000
PHYS = 0x10000
PAGES = 4
SLOTS = PAGES * 4096 // 16


def _runs(*maps):
    """RunArrays of 4 KiB runs: (virt, phys, size) each."""
    cols = list(zip(*maps))
    n = len(maps)
    return RunArrays(np.array(cols[0], dtype=np.uint64), np.array(cols[1], dtype=np.uint64),
                     np.array(cols[2], dtype=np.uint64), np.full(n, 3, dtype=np.uint64),
                     np.full(n, 4096, dtype=np.uint64), np.ones(n, dtype=np.uint64))


def _heap_runs():
    # Pages mapped out of order, so the copy's frames are not one run.
    return _runs(*((HEAP + i * 4096, PHYS + ((i * 3) % PAGES) * 4096, 4096) for i in range(PAGES)))


def _write_list(mem, tr, blocks):
    """An address-ordered free list of (slot, slots) blocks; returns the head."""
    for (slot, n), nxt in zip(blocks, [b[0] for b in blocks[1:]] + [None]):
        mem.write(tr.translate(HEAP + slot * 16), struct.pack("<QQ", n * 16, 0 if nxt is None else HEAP + nxt * 16))
    return HEAP + blocks[0][0] * 16 if blocks else 0


def _blocks(slots):
    out, end = [], -1
    for s in sorted(set(slots)):
        if s > end + 1:
            n = min(1 + (s * 7) % 5, SLOTS - s)
            out.append((s, n))
            end = s + n
    return out


def _walk(mem, tr, head, prior=None):
    return walk_free_list(mem, tr, head, HEAP, HEAP + PAGES * 4096, prior=prior)


def test_a_frame_copy_reads_like_the_memory_it_came_from():
    mem = BufferMemory(bytearray(range(256)) * 256)
    frames = np.array([0x3000, 0x1000, 0x2000], dtype=np.uint64)
    copy = FrameCopy(0, mem.size, frames, np.stack([mem.read_table(int(f)) for f in frames]))
    assert copy.read(0x1FF8, 16) == mem.read(0x1FF8, 16)  # across two copied frames
    assert copy.read_u64(0x2010) == mem.read_u64(0x2010)
    words = np.array([0x3FF8, 0x1000, 0x2468], dtype=np.uint64)
    assert np.array_equal(copy.read_u64s(words), mem.read_u64s(words))
    with pytest.raises(NotCopied):
        copy.read(0xFFC, 8)
    with pytest.raises(NotCopied):
        copy.read_u64s(np.array([0x1000, 0x4000], dtype=np.uint64))
    with pytest.raises(Misaligned):
        copy.read_u64s(np.array([0x1004], dtype=np.uint64))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, SLOTS - 1), max_size=60), st.lists(st.integers(0, SLOTS - 1), max_size=60),
       st.lists(st.integers(0, SLOTS - 1), max_size=60), st.booleans())
def test_the_walk_of_the_copy_is_the_walk_of_the_moment_of_the_copy(planned, held, after, reuse):
    """The heap changes between the plan (guest running) and the hold, and
    again after it: the walk of the copy equals a walk of the heap as it was
    in the hold (also when it reuses an earlier walk), and the copy came
    from one hold, however much changed."""
    mem = BufferMemory(bytearray(PHYS + PAGES * 4096))
    runs = _heap_runs()
    tr = RunTranslator(runs)
    head = _write_list(mem, tr, _blocks(planned))
    prior = _walk(mem, tr, head) if reuse else None
    copier = HeapCopier.plan(mem, runs, HEAP, HEAP + PAGES * 4096, None, {})
    assert copier is not None
    copier.warm()
    mem.write(PHYS, bytes(PAGES * 4096))
    head = _write_list(mem, tr, _blocks(held))
    moment = _walk(mem, tr, head)  # the heap as it is in the hold
    pages = copier.copy()  # the hold
    mem.write(PHYS, bytes(PAGES * 4096))
    _write_list(mem, tr, _blocks(after))
    assert copier.covers(HEAP, HEAP + PAGES * 4096, None) and copier.maps_same(tr, HEAP, HEAP + PAGES * 4096)
    walked = _walk(pages, tr, head, prior)
    assert walked.blocks == moment.blocks
    assert [f.kind for f in walked.findings] == [f.kind for f in moment.findings]


def test_a_heap_grown_or_remapped_since_the_plan_is_not_walked_on_the_copy():
    mem = BufferMemory(bytearray(PHYS + 2 * PAGES * 4096))
    runs = _heap_runs()
    copier = HeapCopier.plan(mem, runs, HEAP, HEAP + 2 * 4096, None, {})
    assert copier.covers(HEAP, HEAP + 2 * 4096, None) and copier.covers(HEAP, HEAP + 4096, None)
    assert not copier.covers(HEAP, HEAP + 3 * 4096, None)  # grew past the pages copied
    assert not copier.covers(HEAP + 16, HEAP + 4096, None)
    moved = _runs((HEAP, PHYS, 4096), (HEAP + 4096, PHYS + 5 * 4096, 4096))
    assert copier.maps_same(RunTranslator(runs), HEAP, HEAP + 2 * 4096)
    assert copier.maps_same(RunTranslator(moved), HEAP, HEAP + 4096)  # only the page that moved is past the end
    assert not copier.maps_same(RunTranslator(moved), HEAP, HEAP + 2 * 4096)


def test_too_large_or_a_hole_in_it_keeps_the_word_path():
    mem = BufferMemory(bytearray(PHYS + PAGES * 4096))
    runs = _heap_runs()
    assert HeapCopier.plan(mem, runs, HEAP, HEAP + PAGES * 4096, None, {}, max_pages=PAGES - 1) is None
    holed = _runs((HEAP, PHYS, 4096), (HEAP + 2 * 4096, PHYS + 4096, 4096))
    assert HeapCopier.plan(mem, holed, HEAP, HEAP + 3 * 4096, None, {}) is None


def test_a_tlsf_heap_and_its_index_walked_on_the_copy_equal_the_walk_of_memory():
    h = Heap(LAYOUT)
    runs = _runs((T_HEAP, T_PHYS, T_SIZE), (INDEX, INDEX_PHYS, 0x1000))
    tr = RunTranslator(runs)
    copier = HeapCopier.plan(h.mem, runs, T_HEAP, T_HEAP + T_SIZE, INDEX, {})
    assert copier is not None  # the index's pages past its mapping are simply not copied
    pages = copier.copy()
    direct = walk_heap_any(h.mem, tr, T_HEAP, T_HEAP + T_SIZE, 0, INDEX)
    h.mem.write(INDEX_PHYS, bytes(64))  # the guest moves on: the copy does not
    h.mem.write(T_PHYS, bytes(T_SIZE))
    walked = walk_heap_any(pages, tr, T_HEAP, T_HEAP + T_SIZE, 0, INDEX)
    assert walked.allocator == "tlsf" and not walked.findings, walked.findings
    assert walked.blocks == direct.blocks and walked.used_blocks == direct.used_blocks
    assert walked.lists == direct.lists
