"""Guest physical memory: one sparse host mapping, owned here.

RAM is a memfd (so another process can map the same pages, see the inspector)
mapped MAP_SHARED | MAP_NORESERVE: a 64 GiB guest costs nothing until its
pages are touched.

:class:`GuestMemory` *is* ``mm``'s physical-memory implementation
(:class:`mm.physmem.BufferMemory`) over that mapping: one bounds check for
every access, so no guest-supplied address can make the host read or write
outside guest RAM, and one error for it (``mm``'s ``OutOfBounds``, exit code
2 at the command line). The mapper, the walker and the inspector take a
``GuestMemory`` as it is. This module adds the mapping's lifetime and what
only the VMM needs (memfd writes, page copies between two RAMs, ctypes
records).
"""

from __future__ import annotations

import ctypes as C
import errno
import functools
import mmap
import os

from mm.errors import OutOfBounds
from mm.physmem import BufferMemory

from .layout import GuestMemoryError, check_ram_size

# GuestMemoryError is a bad RAM *size* (layout's check); a bad *access* is OutOfBounds.
__all__ = ["GuestMemory", "GuestMemoryError", "OutOfBounds", "check_ram_size"]

# Python < 3.12 lacks the constant; 0x4000 is MAP_NORESERVE on Linux x86-64.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


# Writes at least this large go through pwrite(2) on the memfd.
PWRITE_MIN = 4096

PAGE = 4096
_ZERO_PAGE = bytes(PAGE)
_SCAN_CHUNK = 1 << 20  # nonzero_runs copies RAM out a MiB at a time
_ZERO_RUN_PAGES = 8  # put_back: zero runs up to this long are copied from _ZERO_RUN
_ZERO_RUN = memoryview(bytes(_ZERO_RUN_PAGES * PAGE))


@functools.cache
def _zeros(size: int) -> bytes:
    """``size`` zero bytes, made on first use: nonzero_runs compares a MiB
    at a time, and a MiB made at import would be paid by every start of the
    VMM, most of which never scan RAM."""
    return bytes(size)


class GuestMemory(BufferMemory):
    """Guest RAM at guest-physical 0..size, owned by this object."""

    def __init__(self, size: int, *, shared: bool = True, copy_on_write_of: int | None = None):
        """``copy_on_write_of``: a memfd holding a saved RAM image (not owned);
        this RAM starts as that image and every write makes a private copy of
        the page (MAP_PRIVATE), so the image itself never changes."""
        check_ram_size(size)
        self.fd: int | None = None
        if copy_on_write_of is not None:
            # fd stays None: writes must go through the private mapping, never
            # pwrite(2) into the shared image.
            self.mmap = mmap.mmap(copy_on_write_of, size, mmap.MAP_PRIVATE | MAP_NORESERVE)
        elif shared:
            self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED | MAP_NORESERVE)
        else:
            self.mmap = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        super().__init__(self.mmap)

    # --- lifetime -----------------------------------------------------------
    def close(self) -> None:
        if self.mmap is None:
            return
        super().close()  # every view of ours goes before the mmap can close
        self.mmap.close()
        self.mmap = None  # type: ignore[assignment]
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "GuestMemory":
        return self

    # --- what only the VMM needs ------------------------------------------------
    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data)
        if src.nbytes < PWRITE_MIN or self.fd is None:
            super().write(paddr, src)
            return
        self._offset(paddr, src.nbytes)  # the bounds check, before the file is touched
        # Through the file, not the mapping: the kernel fills the memfd's
        # pages directly, with no page fault per fresh page in this
        # process (about 3x faster for a kernel image on a new VM).
        done = os.pwrite(self.fd, src, paddr)
        if done < src.nbytes:
            super().write(paddr + done, src.cast("B")[done:])

    def put_back(self, other: "GuestMemory | None", copied, zeroed, at: int = 0, data: bytes = b"") -> None:
        """Runs of 4 KiB pages, ``(first page, count)``: ``copied`` from
        ``other`` (a RAM of the same size; one slice copy per run),
        ``zeroed`` zeroed, then ``data`` written at ``at``: what a reset in
        place does to RAM, in one call (it runs right after KVM_RUN, when
        each Python frame costs cache misses: as three calls and
        ``write``'s two layers, ~10 us more). A short zero run is a slice
        copy from a zero buffer (its few KiB stay in cache), a long one a
        memset: a ctypes call costs about 1 us, a slice copy a tenth."""
        dst, pages = self._mem, self.size // PAGE
        if copied:
            if other.size != self.size:
                raise ValueError(f"page copy between RAMs of {other.size:#x} and {self.size:#x} bytes")
            src = other._mem
            for first, n in copied:
                if first < 0 or n < 0 or first + n > pages:
                    raise OutOfBounds(first * PAGE, n * PAGE, 0, self.size)
                dst[first * PAGE : (first + n) * PAGE] = src[first * PAGE : (first + n) * PAGE]
        for first, n in zeroed:
            if first < 0 or n < 0 or first + n > pages:
                raise OutOfBounds(first * PAGE, n * PAGE, 0, self.size)
            if n <= _ZERO_RUN_PAGES:
                dst[first * PAGE : (first + n) * PAGE] = _ZERO_RUN[: n * PAGE]
            else:
                C.memset(self.host_address + first * PAGE, 0, n * PAGE)
        if data:
            if at < 0 or at + len(data) > self.size:
                raise OutOfBounds(at, len(data), 0, self.size)
            dst[at : at + len(data)] = data

    def nonzero_runs(self) -> list[tuple[int, int]]:
        """Runs ``(first page, count)``, ascending and joined, of the 4 KiB
        pages that hold a byte other than zero now. Pages the memfd never
        allocated (SEEK_HOLE) are zero without being read; the others are
        compared with zeros a MiB at a time, then page by page (one memcmp
        each). Right only while nothing writes this RAM (a zygote's, a
        stopped guest's)."""
        runs: list[tuple[int, int]] = []
        for start, size in self.allocated_extents():
            end = start + size
            for off in range(start, end, _SCAN_CHUNK):
                chunk = self._mem[off : min(off + _SCAN_CHUNK, end)].tobytes()
                if chunk == _zeros(len(chunk)):
                    continue
                for at in range(0, len(chunk), PAGE):
                    if not chunk.startswith(_ZERO_PAGE, at):
                        page = (off + at) // PAGE
                        if runs and runs[-1][0] + runs[-1][1] == page:
                            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                        else:
                            runs.append((page, 1))
        return runs

    def data_pages(self) -> bytes:
        """``nonzero_runs`` as a bitmap, bit ``p`` for page ``p``
        (little-endian, whole u64 words, as KVM's dirty bitmaps)."""
        pages = self.size // PAGE
        bits = 0
        for first, n in self.nonzero_runs():
            bits |= ((1 << n) - 1) << first
        return bits.to_bytes((pages + 63) // 64 * 8, "little")

    def allocated_extents(self) -> list[tuple[int, int]]:
        """Page-aligned (start, size) ranges of RAM that may hold data: the
        memfd's data ranges (SEEK_DATA/SEEK_HOLE: the kernel knows which pages
        were never touched, so a 64 GiB guest that touched 5 MiB is 5 MiB to
        look at), or all of RAM without a memfd or where the file system
        cannot tell."""
        if self.fd is None:
            return [(0, self.size)]
        out, pos = [], 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                return [(0, self.size)]  # no SEEK_DATA here: everything may hold data
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            start -= start % PAGE
            end = min(-(-end // PAGE) * PAGE, self.size)
            out.append((start, end - start))
            pos = end
        return out

    def read_cstruct(self, paddr: int, ctype: type):
        """A copy of a ctypes structure read from guest memory."""
        return ctype.from_buffer_copy(self.view(paddr, C.sizeof(ctype)))

    def write_cstruct(self, paddr: int, value) -> None:
        self.write(paddr, bytes(value))

    def resident_bytes(self) -> int:
        """Host memory actually backing guest RAM (pages touched so far)."""
        if self.fd is None:
            return 0
        return os.fstat(self.fd).st_blocks * 512
