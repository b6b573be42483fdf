"""The host-side heap free-list walker on synthetic (and hostile) lists."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mm import BufferMemory
from mm.walker import RunArrays
from vmm.inspector.heap import RunTranslator, walk_free_list

HEAP = 0xFFFF_C000_0000_0000
PHYS = 0x10000
SIZE = 0x10000


def _setup(nodes):
    """nodes: list of (offset, size, next_offset or None or absolute)."""
    mem = BufferMemory(bytearray(0x40000))
    for off, size, nxt in nodes:
        mem.write(PHYS + off, struct.pack("<QQ", size, nxt))
    runs = RunArrays(*(np.array([v], dtype=np.uint64) for v in (HEAP, PHYS, SIZE, 3, 4096, 1)))
    return mem, RunTranslator(runs)


def test_well_formed_list():
    mem, tr = _setup([(0x0, 0x100, HEAP + 0x200), (0x200, 0x40, HEAP + 0x1000), (0x1000, 0x800, 0)])
    v = walk_free_list(mem, tr, HEAP, HEAP, HEAP + SIZE)
    assert v.blocks == [(HEAP, 0x100), (HEAP + 0x200, 0x40), (HEAP + 0x1000, 0x800)]
    assert v.free_bytes == 0x940 and v.largest_free == 0x800 and not v.findings
    assert v.free_blocks == 3 and v.free_size(HEAP + 0x200) == 0x40 and v.free_size(HEAP + 0x210) == 0
    assert 0 < v.fragmentation < 1


@pytest.mark.parametrize(
    "nodes,kind",
    [
        ([(0x0, 0x100, HEAP)], "heap-cycle"),
        ([(0x0, 0x100, HEAP + 0x200), (0x200, 0x40, HEAP + 0x200)], "heap-cycle"),
        ([(0x0, 0x100, 0xDEAD_0000)], "heap-pointer-outside"),
        ([(0x0, 0x100, HEAP + 0x208)], "heap-misaligned"),
        ([(0x0, 0x100, HEAP + 0x80)], "heap-order"),
        ([(0x0, 1 << 40, 0)], "heap-bad-size"),
        ([(0x0, 0, 0)], "heap-bad-size"),
    ],
)
def test_corruption_is_a_finding(nodes, kind):
    mem, tr = _setup(nodes)
    v = walk_free_list(mem, tr, HEAP, HEAP, HEAP + SIZE)
    assert [f.kind for f in v.findings] == [kind]


def test_unmapped_node():
    mem, tr = _setup([(0x0, 0x100, HEAP + SIZE + 0x100)])
    v = walk_free_list(mem, tr, HEAP, HEAP, HEAP + 2 * SIZE)
    assert v.findings[0].kind == "heap-unmapped"


GARBAGE = 2048


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=GARBAGE, max_size=GARBAGE), st.integers(0, GARBAGE // 16 - 1))
def test_garbage_heap_never_hangs_or_raises(garbage, head_slot):
    mem = BufferMemory(bytearray(0x40000))
    mem.write(PHYS, garbage)
    runs = RunArrays(*(np.array([v], dtype=np.uint64) for v in (HEAP, PHYS, GARBAGE, 3, 4096, 1)))
    v = walk_free_list(mem, RunTranslator(runs), HEAP + head_slot * 16, HEAP, HEAP + GARBAGE, max_nodes=5000)
    assert len(v.blocks) <= 5000


# --- optimistic walks: validation and reuse of an earlier walk -----------------------------
SLOTS = 64  # 16-byte slots in a small heap


def _write_list(mem, blocks):
    """Write a valid address-ordered list of (slot, slots) blocks; returns the head."""
    head = 0
    for (slot, n), nxt in zip(blocks, [b[0] for b in blocks[1:]] + [None]):
        mem.write(PHYS + slot * 16, struct.pack("<QQ", n * 16, 0 if nxt is None else HEAP + nxt * 16))
    if blocks:
        head = HEAP + blocks[0][0] * 16
    return head


def _blocks(draw_slots):
    """Non-overlapping, non-adjacent (slot, length) blocks from sorted distinct slots."""
    out, end = [], -1
    for s in sorted(set(draw_slots)):
        if s > end + 1 and s < SLOTS:
            n = 1 + (s * 7) % 3
            n = min(n, SLOTS - s)
            out.append((s, n))
            end = s + n
    return out


def _same(a, b):
    assert a.blocks == b.blocks
    assert [f.kind for f in a.findings] == [f.kind for f in b.findings]
    assert a.truncated == b.truncated


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, SLOTS - 1), max_size=30),
    st.lists(st.integers(0, SLOTS - 1), max_size=30),
    st.lists(st.tuples(st.integers(0, SLOTS - 1), st.binary(min_size=8, max_size=8)), max_size=3),
    st.integers(0, 40),
)
def test_a_walk_reusing_an_earlier_one_equals_a_fresh_walk(before, after, scribbles, max_nodes):
    """Whatever the guest did between two walks (a new list, or garbage
    written over nodes), reusing the first walk gives exactly a fresh walk."""
    mem, tr = _setup([])
    head0 = _write_list(mem, _blocks(before))
    first = walk_free_list(mem, tr, head0, HEAP, HEAP + SLOTS * 16)
    assert first.unchanged(mem)
    head1 = _write_list(mem, _blocks(after))
    for slot, raw in scribbles:
        mem.write(PHYS + slot * 16 + 8 * (slot % 2), raw)
    limit = max_nodes or 65536
    fresh = walk_free_list(mem, tr, head1, HEAP, HEAP + SLOTS * 16, max_nodes=limit)
    reused = walk_free_list(mem, tr, head1, HEAP, HEAP + SLOTS * 16, max_nodes=limit, prior=first)
    _same(reused, fresh)
    assert reused.unchanged(mem)


def test_unchanged_list_is_reused_without_reading_it_again():
    mem, tr = _setup([])
    blocks = [(i * 3, 1) for i in range(20)]
    head = _write_list(mem, blocks)
    first = walk_free_list(mem, tr, head, HEAP, HEAP + SLOTS * 16)
    assert first.nodes_read == 20
    # The guest frees the slot after the 5th block: it merges into it.
    mem.write(PHYS + 12 * 16, struct.pack("<QQ", 32, HEAP + 15 * 16))
    assert not first.unchanged(mem)
    again = walk_free_list(mem, tr, head, HEAP, HEAP + SLOTS * 16, prior=first)
    assert again.nodes_read == 1  # only the changed node; both stretches around it reused
    _same(again, walk_free_list(mem, tr, head, HEAP, HEAP + SLOTS * 16))
    assert again.unchanged(mem)


def test_the_copy_made_in_a_pause_matches_until_any_word_the_walk_read_changes():
    nodes = [(0x0, 0x100, HEAP + 0x200), (0x200, 0x40, HEAP + 0x1000), (0x1000, 0x800, 0)]
    mem, tr = _setup(nodes)
    v = walk_free_list(mem, tr, HEAP, HEAP, HEAP + SIZE)
    assert v.matches(v.capture(mem))
    mem.write(PHYS + 0x110, b"\xff" * 8)  # inside a free block, not a word the walk read
    assert v.matches(v.capture(mem))
    for off, size, nxt in nodes:
        for word, value in ((0, size), (8, nxt)):
            mem.write(PHYS + off + word, struct.pack("<Q", value ^ 0x10))
            assert not v.matches(v.capture(mem)), (off, word)
            mem.write(PHYS + off + word, struct.pack("<Q", value))
            assert v.matches(v.capture(mem))
