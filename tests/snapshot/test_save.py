"""Saving without KVM: which pages are stored, and atomic file replacement."""

from __future__ import annotations

import os

import pytest

from vmm.memory import GuestMemory
from vmm.snapshot.save import atomic_write


def test_nonzero_runs_are_exactly_the_pages_that_are_not_zero():
    with GuestMemory(16 << 20) as mem:
        mem.write(0x1000, b"\x01")
        mem.write(0x2FFF, b"\x02")  # last byte of the next page: same run
        mem.write(0x10_0000, bytes(4096) + b"\x03" * 8192)  # a written zero page is not stored
        mem.write(0xFF_F000, b"\x04" * 4096)  # the last page of RAM
        assert mem.nonzero_runs() == [(0x1, 2), (0x101, 2), (0xFFF, 1)]
        # The scan only looks where the memfd has pages.
        touched = sum(n for _, n in mem.allocated_extents())
        assert touched < 1 << 20


def test_huge_untouched_ram_costs_nothing_to_scan():
    with GuestMemory(64 << 30) as mem:
        mem.write((64 << 30) - 4096, b"\xff")
        assert mem.nonzero_runs() == [((64 << 30) // 4096 - 1, 1)]


def test_private_memory_is_scanned_whole():
    with GuestMemory(16 << 20, shared=False) as mem:
        mem.write(0x5000, b"\x07")
        assert mem.nonzero_runs() == [(5, 1)]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device"), RuntimeError("boom")])
def test_atomic_write_leaves_nothing_on_failure(tmp_path, exc):
    target = tmp_path / "snap.core"

    def write(fd):
        os.write(fd, b"partial" * 1000)
        raise exc

    with pytest.raises(exc if isinstance(exc, type) else type(exc)):
        atomic_write(str(target), write)
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "snap.core"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), lambda fd: (os.write(fd, b"new"), (_ for _ in ()).throw(KeyboardInterrupt)))
    assert target.read_bytes() == b"old"
    atomic_write(str(target), lambda fd: os.write(fd, b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["snap.core"]
