"""Physical memory as seen by the mapper and the walker.

The mapper and walker only use the :class:`PhysicalMemory` protocol, so they
run on a ``bytearray`` in unit tests and on the VMM's guest-RAM ``mmap``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .addr import PAGE_4K
from .errors import Misaligned, OutOfBounds

__all__ = ["PhysicalMemory", "BufferMemory", "read_tables", "TABLE_BYTES"]

TABLE_BYTES = PAGE_4K
_U64 = np.dtype("<u8")  # page-table entries are little-endian u64


@runtime_checkable
class PhysicalMemory(Protocol):
    """Guest-physical memory covering ``[base, base + size)``.

    Every method raises :class:`~mm.errors.OutOfBounds` for an access that
    is not entirely inside that range.
    """

    base: int
    size: int

    def read(self, paddr: int, n: int) -> bytes: ...

    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None: ...

    def read_u64(self, paddr: int) -> int: ...

    def write_u64(self, paddr: int, value: int) -> None: ...

    def write_u64s(self, paddr: int, values: np.ndarray) -> None: ...

    def read_table(self, paddr: int) -> np.ndarray:
        """The 512 little-endian u64 entries of the 4 KiB-aligned table at ``paddr``."""
        ...

    def zero(self, paddr: int, n: int) -> None: ...


def read_tables(mem: PhysicalMemory, paddrs: np.ndarray) -> np.ndarray:
    """Read many tables as one ``(k, 512)`` uint64 array (a copy).

    Uses ``mem.read_tables`` when the implementation has it (one gather),
    else stacks :meth:`PhysicalMemory.read_table`.
    """
    fast = getattr(mem, "read_tables", None)
    if fast is not None:
        return fast(paddrs)
    if len(paddrs) == 0:
        return np.zeros((0, 512), dtype=np.uint64)
    return np.stack([np.asarray(mem.read_table(int(p)), dtype=np.uint64) for p in paddrs])


class BufferMemory:
    """:class:`PhysicalMemory` over any writable buffer (``bytearray``, ``mmap``).

    The buffer is viewed through numpy without copying, and only the pages an
    access touches are read, so a sparse ``MAP_NORESERVE`` mapping stays
    sparse. Tables returned by :meth:`read_table` are snapshots (copies): the
    guest may rewrite its tables while we decode them. Call :meth:`close` (or
    use ``with``) before closing an ``mmap`` so no exported view pins it.
    """

    def __init__(self, buffer: bytearray | memoryview | object, base: int = 0) -> None:
        if base < 0 or base % PAGE_4K:
            raise Misaligned(base, PAGE_4K)
        mv = memoryview(buffer)  # type: ignore[arg-type]
        if mv.readonly:
            raise ValueError("BufferMemory needs a writable buffer")
        mv.release()
        self._bytes = np.frombuffer(buffer, dtype=np.uint8)  # type: ignore[call-overload]
        n = self._bytes.size
        self._u64 = self._bytes[: n - n % 8].view(_U64)
        self._frames = self._bytes[: n - n % PAGE_4K].view(_U64).reshape(-1, 512)
        self.base = base
        self.size = n

    # -- bookkeeping ---------------------------------------------------

    def close(self) -> None:
        """Drop the numpy views of the buffer (no access is possible after)."""
        self._bytes = self._u64 = self._frames = None  # type: ignore[assignment]

    def __enter__(self) -> "BufferMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BufferMemory(base={self.base:#_x}, size={self.size:#_x})"

    def _offset(self, paddr: int, n: int) -> int:
        """Offset of ``[paddr, paddr+n)`` in the buffer, or OutOfBounds."""
        paddr, n = int(paddr), int(n)
        off = paddr - self.base
        if n < 0 or off < 0 or off + n > self.size:
            raise OutOfBounds(paddr, n, self.base, self.size)
        return off

    # -- byte access ---------------------------------------------------

    def read(self, paddr: int, n: int) -> bytes:
        off = self._offset(paddr, n)
        return self._bytes[off : off + n].tobytes()

    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        off = self._offset(paddr, src.size)
        self._bytes[off : off + src.size] = src

    def zero(self, paddr: int, n: int) -> None:
        off = self._offset(paddr, n)
        self._bytes[off : off + n] = 0

    # -- u64 access ----------------------------------------------------

    def read_u64(self, paddr: int) -> int:
        off = self._offset(paddr, 8)
        if off % 8:
            return int.from_bytes(self._bytes[off : off + 8].tobytes(), "little")
        return int(self._u64[off >> 3])

    def u64_indices(self, paddrs: np.ndarray) -> np.ndarray:
        """Checked word indices of the 8-byte aligned ``paddrs``, for
        :meth:`gather_u64`: check once, gather many times (the gather is then
        one numpy indexing, e.g. while a vCPU is held)."""
        paddrs = np.asarray(paddrs, dtype=np.uint64)
        if paddrs.size == 0:
            return np.zeros(0, dtype=np.intp)
        lo, hi = int(paddrs.min()), int(paddrs.max())
        if (paddrs & np.uint64(7)).any():
            raise Misaligned(int(paddrs[np.argmax(paddrs & np.uint64(7) != 0)]), 8)
        if lo < self.base or hi + 8 > self.base + 8 * len(self._u64):
            raise OutOfBounds(lo if lo < self.base else hi, 8, self.base, self.size)
        return ((paddrs - np.uint64(self.base)) >> np.uint64(3)).astype(np.intp)

    def gather_u64(self, indices: np.ndarray) -> np.ndarray:
        """The u64s at ``indices`` (from :meth:`u64_indices`), as a copy."""
        return self._u64[indices]

    def read_u64s(self, paddrs: np.ndarray) -> np.ndarray:
        """Gather the u64s at the 8-byte aligned ``paddrs`` (any order) in one
        vectorized read: a copy, like every read."""
        return self.gather_u64(self.u64_indices(paddrs))

    def write_u64(self, paddr: int, value: int) -> None:
        off = self._offset(paddr, 8)
        if off % 8:
            self._bytes[off : off + 8] = np.frombuffer(int(value).to_bytes(8, "little"), np.uint8)
        else:
            self._u64[off >> 3] = value

    def write_u64s(self, paddr: int, values: np.ndarray) -> None:
        """Store consecutive u64 values at the 8-byte aligned ``paddr``."""
        values = np.asarray(values, dtype=np.uint64)
        off = self._offset(paddr, 8 * values.size)
        if off % 8:
            raise Misaligned(int(paddr), 8)
        self._u64[off >> 3 : (off >> 3) + values.size] = values

    # -- tables --------------------------------------------------------

    def read_table(self, paddr: int) -> np.ndarray:
        off = self._offset(paddr, PAGE_4K)
        if off % PAGE_4K:
            raise Misaligned(int(paddr), PAGE_4K)
        return self._frames[off >> 12].copy()

    def read_tables(self, paddrs: np.ndarray) -> np.ndarray:
        """Gather the tables at ``paddrs`` (all 4 KiB aligned) into a ``(k, 512)`` copy."""
        paddrs = np.asarray(paddrs, dtype=np.uint64)
        if paddrs.size == 0:
            return np.zeros((0, 512), dtype=np.uint64)
        bad = (paddrs < self.base) | (paddrs >= self.base + len(self._frames) * PAGE_4K)
        if bad.any():
            p = int(paddrs[np.argmax(bad)])
            raise OutOfBounds(p, PAGE_4K, self.base, self.size)
        if (paddrs % PAGE_4K).any():
            raise Misaligned(int(paddrs[np.argmax(paddrs % PAGE_4K != 0)]), PAGE_4K)
        return self._frames[((paddrs - np.uint64(self.base)) >> np.uint64(12)).astype(np.intp)]
