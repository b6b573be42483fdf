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
