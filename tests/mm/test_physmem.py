from __future__ import annotations

import mmap

import numpy as np
import pytest

from mm.errors import Misaligned, OutOfBounds
from mm.physmem import BufferMemory, PhysicalMemory, read_tables


def test_round_trips_and_protocol():
    mem = BufferMemory(bytearray(3 * 4096 + 5))
    assert isinstance(mem, PhysicalMemory)
    mem.write(10, b"hello")
    assert mem.read(10, 5) == b"hello"
    mem.write_u64(0x1000, 0x1122_3344_5566_7788)
    assert mem.read(0x1000, 8) == bytes.fromhex("8877665544332211")
    assert mem.read_u64(0x1000) == 0x1122_3344_5566_7788
    mem.write_u64(3, 0xAB)  # unaligned
    assert mem.read_u64(3) == 0xAB
    mem.write_u64s(0x2000, np.arange(4, dtype=np.uint64))
    t = mem.read_table(0x2000)
    assert t.dtype == np.uint64 and t.shape == (512,) and list(t[:5]) == [0, 1, 2, 3, 0]
    assert read_tables(mem, np.array([0x2000, 0x1000], dtype=np.uint64)).shape == (2, 512)
    mem.zero(0x2000, 16)
    assert mem.read_u64(0x2008) == 0


def test_table_is_a_snapshot():
    mem = BufferMemory(bytearray(8192))
    t = mem.read_table(0)
    mem.write_u64(0, 5)
    assert t[0] == 0


@pytest.mark.parametrize(
    "op",
    [
        lambda m: m.read(0x3000 - 4, 8),
        lambda m: m.read(-1, 1),
        lambda m: m.write(0x2FFF, b"ab"),
        lambda m: m.read_u64(0x2FFC),
        lambda m: m.write_u64(0x3000, 1),
        lambda m: m.read_table(0x3000),
        lambda m: m.zero(0x2000, 0x1001),
        lambda m: m.write_u64s(0x2FF8, np.zeros(2, np.uint64)),
        lambda m: m.read_tables(np.array([0x1000, 0x5000], dtype=np.uint64)),
        lambda m: m.read(1 << 60, 1),
    ],
)
def test_bounds_checked(op):
    with pytest.raises(OutOfBounds):
        op(BufferMemory(bytearray(0x3000)))


def test_base_offset():
    mem = BufferMemory(bytearray(0x2000), base=0x10_0000)
    mem.write_u64(0x10_1000, 7)
    assert mem.read_table(0x10_1000)[0] == 7
    with pytest.raises(OutOfBounds):
        mem.read(0x1000, 1)
    with pytest.raises(Misaligned):
        BufferMemory(bytearray(16), base=0x10)


def test_misaligned_table():
    with pytest.raises(Misaligned):
        BufferMemory(bytearray(0x3000)).read_table(0x800)


def test_readonly_refused():
    with pytest.raises(ValueError):
        BufferMemory(bytes(4096))


def test_mmap_backing_and_close():
    m = mmap.mmap(-1, 1 << 20)
    with BufferMemory(m) as mem:
        mem.write_u64(0x8000, 42)
        assert m[0x8000] == 42
    m.close()  # no numpy view pins the mmap any more
