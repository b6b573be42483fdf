"""Guest physical memory: one sparse host mapping, bounds-checked access.

RAM is a memfd (so another process can map the same pages, see the inspector)
mapped MAP_SHARED | MAP_NORESERVE: a 64 GiB guest costs nothing until its
pages are touched. Every accessor checks ``[paddr, paddr + n)`` against the
RAM size before touching the mapping, so no guest-supplied address can make
the host read or write outside guest RAM.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import struct

from .layout import GuestMemoryError, check_ram_size

__all__ = ["GuestMemory", "GuestMemoryError", "check_ram_size"]  # the size check lives in layout

# Python < 3.12 lacks the constant; 0x4000 is MAP_NORESERVE on Linux x86-64.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


# Writes at least this large go through pwrite(2) on the memfd.
PWRITE_MIN = 4096


class GuestMemory:
    """Guest RAM at guest-physical 0..size, owned by this object."""

    def __init__(self, size: int, *, shared: bool = True, copy_on_write_of: int | None = None):
        """``copy_on_write_of``: a memfd holding a saved RAM image (not owned);
        this RAM starts as that image and every write makes a private copy of
        the page (MAP_PRIVATE), so the image itself never changes."""
        check_ram_size(size)
        self.size = size
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
        self._anchor = C.c_char.from_buffer(self.mmap)
        self.host_address = C.addressof(self._anchor)
        self._view = memoryview(self.mmap)
        self._physmem = None

    # --- lifetime -----------------------------------------------------------
    def close(self) -> None:
        if self.mmap is None:
            return
        # Every exported view must go before the mmap can close.
        if self._physmem is not None:
            self._physmem.close()
            self._physmem = None
        self._view.release()
        del self._anchor
        self.mmap.close()
        self.mmap = None  # type: ignore[assignment]
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- bounds ---------------------------------------------------------------
    def contains(self, paddr: int, n: int = 1) -> bool:
        return 0 <= paddr and n >= 0 and paddr + n <= self.size

    def _check(self, paddr: int, n: int) -> None:
        if not (0 <= paddr and 0 <= n and paddr + n <= self.size):
            raise GuestMemoryError(
                f"guest-physical access [{paddr:#x}, {paddr + n:#x}) is outside guest RAM [0, {self.size:#x})"
            )

    # --- access -----------------------------------------------------------------
    def read(self, paddr: int, n: int) -> bytes:
        self._check(paddr, n)
        return self._view[paddr : paddr + n].tobytes()

    def view(self, paddr: int, n: int) -> memoryview:
        """A zero-copy window; valid only while this object is open."""
        self._check(paddr, n)
        return self._view[paddr : paddr + n]

    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._check(paddr, n)
        if n >= PWRITE_MIN and self.fd is not None:
            # Through the file, not the mapping: the kernel fills the memfd's
            # pages directly, with no page fault per fresh page in this
            # process (about 3x faster for a kernel image on a new VM).
            done = os.pwrite(self.fd, data, paddr)
            if done == n:
                return
            data = memoryview(data)[done:]
            paddr += done
            n -= done
        self._view[paddr : paddr + n] = data

    def copy_pages_from(self, other: "GuestMemory", pages) -> None:
        """Copy the 4 KiB pages numbered ``pages`` (sorted) from ``other``,
        a RAM of the same size; contiguous pages go in one slice copy."""
        src, dst = other._view, self._view
        run_start = prev = None
        for p in pages:
            if prev is not None and p == prev + 1:
                prev = p
                continue
            if run_start is not None:
                dst[run_start * 4096 : (prev + 1) * 4096] = src[run_start * 4096 : (prev + 1) * 4096]
            run_start = prev = p
        if run_start is not None:
            dst[run_start * 4096 : (prev + 1) * 4096] = src[run_start * 4096 : (prev + 1) * 4096]

    def zero(self, paddr: int, n: int) -> None:
        self._check(paddr, n)
        C.memset(self.host_address + paddr, 0, n)

    def read_u64(self, paddr: int) -> int:
        self._check(paddr, 8)
        return struct.unpack_from("<Q", self.mmap, paddr)[0]

    def write_u64(self, paddr: int, value: int) -> None:
        self._check(paddr, 8)
        struct.pack_into("<Q", self.mmap, paddr, value)

    def read_cstruct(self, paddr: int, ctype: type):
        """A copy of a ctypes structure read from guest memory."""
        n = C.sizeof(ctype)
        self._check(paddr, n)
        return ctype.from_buffer_copy(self._view[paddr : paddr + n])

    def write_cstruct(self, paddr: int, value) -> None:
        self.write(paddr, bytes(value))

    @property
    def physmem(self):
        """This RAM as an ``mm`` physical-memory interface (mapper, walker)."""
        if self._physmem is None:
            from mm.physmem import BufferMemory

            self._physmem = BufferMemory(self.mmap)
        return self._physmem

    def resident_bytes(self) -> int:
        """Host memory actually backing guest RAM (pages touched so far)."""
        if self.fd is None:
            return 0
        return os.fstat(self.fd).st_blocks * 512
