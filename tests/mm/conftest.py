"""Helpers for the pure memory-model tests (no KVM anywhere here)."""

from __future__ import annotations

import pytest

from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from mm.physmem import BufferMemory

#: Page-table pool used by the tests: frames [POOL, MEM_SIZE).
POOL = 0x10000
MEM_SIZE = 4 << 20


def new_mapper(size: int = MEM_SIZE, forbid_wx: bool = True, free: bool = False) -> Mapper:
    """A mapper over a zeroed bytearray with its tables in [POOL, size)."""
    mem = BufferMemory(bytearray(size))
    frames = BumpFrameAllocator(POOL, size)
    freed: list[int] = []
    m = Mapper.new(mem, frames, forbid_wx=forbid_wx, free_frame=freed.append if free else None)
    m.freed = freed  # type: ignore[attr-defined]
    return m


@pytest.fixture
def mapper() -> Mapper:
    return new_mapper()
