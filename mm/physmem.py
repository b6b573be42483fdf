"""Physical memory as seen by the mapper and the walker.

The mapper and walker only use the :class:`PhysicalMemory` protocol, so they
run on a ``bytearray`` in unit tests and on the VMM's guest RAM, which *is* a
:class:`BufferMemory` (``vmm.memory.GuestMemory`` owns the mapping and adds
its lifetime): one bounds check and one error, :class:`~mm.errors.OutOfBounds`,
for every access to guest-physical memory.

Byte and single-word access use only the standard library; numpy is imported
on the first table or vectorized access, so a VMM that never walks tables
(a plain ``vmm run``) never loads it (fast start).
"""

from __future__ import annotations

import ctypes as C
import struct
from functools import cached_property
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .addr import PAGE_4K
from .levels import ENTRIES_PER_TABLE
from .errors import Misaligned, NotCopied, OutOfBounds

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PhysicalMemory", "BufferMemory", "FrameCopy", "read_tables", "TABLE_BYTES"]

TABLE_BYTES = PAGE_4K
_U64 = struct.Struct("<Q")  # page-table entries are little-endian u64


def _numpy():
    """numpy, loaded on first use (see the module docstring)."""
    import numpy

    return numpy


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
        """The ENTRIES_PER_TABLE (512) little-endian u64 entries of the 4 KiB-aligned table at ``paddr``."""
        ...

    def zero(self, paddr: int, n: int) -> None: ...


def read_tables(mem: PhysicalMemory, paddrs: np.ndarray) -> np.ndarray:
    """Read many tables as one ``(k, ENTRIES_PER_TABLE)`` uint64 array (a copy).

    Uses ``mem.read_tables`` when the implementation has it (one gather),
    else stacks :meth:`PhysicalMemory.read_table`.
    """
    fast = getattr(mem, "read_tables", None)
    if fast is not None:
        return fast(paddrs)
    np = _numpy()
    if len(paddrs) == 0:
        return np.zeros((0, ENTRIES_PER_TABLE), dtype=np.uint64)
    return np.stack([np.asarray(mem.read_table(int(p)), dtype=np.uint64) for p in paddrs])


class BufferMemory:
    """:class:`PhysicalMemory` over any writable buffer (``bytearray``, ``mmap``).

    Only the pages an access touches are read, so a sparse ``MAP_NORESERVE``
    mapping stays sparse. Reads return copies (``bytes``, and tables as numpy
    arrays): the guest may rewrite its tables while we decode them; only
    :meth:`view` lends a window. Call :meth:`close` (or use ``with``) before
    closing an ``mmap``, so that no view of ours pins it.
    """

    def __init__(self, buffer: bytearray | memoryview | object, base: int = 0) -> None:
        if base < 0 or base % PAGE_4K:
            raise Misaligned(base, PAGE_4K)
        mv = memoryview(buffer)  # type: ignore[arg-type]
        if mv.readonly:
            mv.release()
            raise ValueError("BufferMemory needs a writable buffer")
        self._mem = mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
        self.base = base
        self.size = self._mem.nbytes
        self._anchor = (C.c_char * self.size).from_buffer(self._mem)
        #: host virtual address of ``base`` (memset here; KVM memory slots in the VMM)
        self.host_address = C.addressof(self._anchor)

    # -- bookkeeping ---------------------------------------------------

    def close(self) -> None:
        """Drop every view of the buffer (no access is possible after)."""
        if self._mem is None:
            return
        self.__dict__.pop("_frames", None)  # the numpy views, if any was made
        self.__dict__.pop("_u64", None)
        del self._anchor
        self._mem.release()
        self._mem = None  # type: ignore[assignment]

    def __enter__(self) -> "BufferMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base:#_x}, size={self.size:#_x})"

    def contains(self, paddr: int, n: int = 1) -> bool:
        off = paddr - self.base
        return 0 <= off and 0 <= n and off + n <= self.size

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
        return self._mem[off : off + n].tobytes()

    def view(self, paddr: int, n: int) -> memoryview:
        """A zero-copy window; valid only while this object is open, and it
        must be released before :meth:`close` can close the mapping."""
        off = self._offset(paddr, n)
        return self._mem[off : off + n]

    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")  # any C-contiguous buffer (a numpy array, a ctypes record), as bytes
        off = self._offset(paddr, src.nbytes)
        self._mem[off : off + src.nbytes] = src

    def zero(self, paddr: int, n: int) -> None:
        off = self._offset(paddr, n)
        C.memset(self.host_address + off, 0, n)

    # -- u64 access ----------------------------------------------------

    def read_u64(self, paddr: int) -> int:
        return _U64.unpack_from(self._mem, self._offset(paddr, 8))[0]

    def write_u64(self, paddr: int, value: int) -> None:
        _U64.pack_into(self._mem, self._offset(paddr, 8), value)

    # -- vectorized access (numpy) -----------------------------------------------

    @cached_property
    def _u64(self) -> np.ndarray:
        """Every whole u64 of the buffer, viewed (made on first use)."""
        np = _numpy()
        return np.frombuffer(self._mem, dtype="<u8", count=self.size // 8)

    @cached_property
    def _frames(self) -> np.ndarray:
        """Every whole 4 KiB frame of the buffer as a row of ENTRIES_PER_TABLE u64, viewed."""
        return self._u64[: self.size // PAGE_4K * ENTRIES_PER_TABLE].reshape(-1, ENTRIES_PER_TABLE)

    def u64_indices(self, paddrs: np.ndarray) -> np.ndarray:
        """Checked word indices of the 8-byte aligned ``paddrs``, for
        :meth:`gather_u64`: check once, gather many times (the gather is then
        one numpy indexing, e.g. while a vCPU is held)."""
        np = _numpy()
        paddrs = np.asarray(paddrs, dtype=np.uint64)
        if paddrs.size == 0:
            return np.zeros(0, dtype=np.intp)
        lo, hi = int(paddrs.min()), int(paddrs.max())
        if (paddrs & np.uint64(7)).any():
            raise Misaligned(int(paddrs[np.argmax(paddrs & np.uint64(7) != 0)]), 8)
        if lo < self.base or hi + 8 > self.base + 8 * len(self._u64):
            raise OutOfBounds(lo if lo < self.base else hi, 8, self.base, self.size)
        return ((paddrs - np.uint64(self.base)) >> np.uint64(3)).astype(np.intp)

    def gather_u64(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The u64s at ``indices`` (from :meth:`u64_indices`), as a copy (into
        ``out`` if given: memory allocated and touched beforehand, so that a
        gather made while a vCPU is held takes no page faults)."""
        if out is None:
            return self._u64[indices]
        return _numpy().take(self._u64, indices, out=out)

    def read_u64s(self, paddrs: np.ndarray) -> np.ndarray:
        """Gather the u64s at the 8-byte aligned ``paddrs`` (any order) in one
        vectorized read: a copy, like every read."""
        return self.gather_u64(self.u64_indices(paddrs))

    def write_u64s(self, paddr: int, values: np.ndarray) -> None:
        """Store consecutive u64 values at the 8-byte aligned ``paddr``."""
        np = _numpy()
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

    def frame_indices(self, paddrs: np.ndarray) -> np.ndarray:
        """Checked frame indices of the 4 KiB aligned ``paddrs``, for
        :meth:`gather_frames` (check once, gather many times, like
        :meth:`u64_indices`)."""
        np = _numpy()
        paddrs = np.asarray(paddrs, dtype=np.uint64)
        if paddrs.size == 0:
            return np.zeros(0, dtype=np.intp)
        bad = (paddrs < self.base) | (paddrs >= self.base + len(self._frames) * PAGE_4K)
        if bad.any():
            p = int(paddrs[np.argmax(bad)])
            raise OutOfBounds(p, PAGE_4K, self.base, self.size)
        if (paddrs % PAGE_4K).any():
            raise Misaligned(int(paddrs[np.argmax(paddrs % PAGE_4K != 0)]), PAGE_4K)
        return ((paddrs - np.uint64(self.base)) >> np.uint64(12)).astype(np.intp)

    def gather_frames(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The tables at ``indices`` (from :meth:`frame_indices`) as a
        ``(k, ENTRIES_PER_TABLE)`` copy (into ``out`` if given, as :meth:`gather_u64`)."""
        if out is None:
            return self._frames[indices]
        return _numpy().take(self._frames, indices, axis=0, out=out)

    def read_tables(self, paddrs: np.ndarray) -> np.ndarray:
        """Gather the tables at ``paddrs`` (all 4 KiB aligned) into a ``(k, ENTRIES_PER_TABLE)`` copy."""
        np = _numpy()
        if len(paddrs) == 0:
            return np.zeros((0, ENTRIES_PER_TABLE), dtype=np.uint64)
        return self._frames[self.frame_indices(paddrs)]


class FrameCopy:
    """Some 4 KiB frames of a memory, copied at one instant, read as tables.

    What a snapshot's short pause copies (``mm.rewalk.copy_tables``, and a
    small heap's pages) so that the tables can be compared and patched, and
    the heap walked, after the guest runs again: the walker,
    ``mm.rewalk.refresh`` and the heap walks read it like the memory it came
    from (same ``base`` and ``size``), and a read of a frame it does not hold
    raises :class:`~mm.errors.NotCopied`. Read-only; reads return copies.
    """

    def __init__(self, base: int, size: int, frames: "np.ndarray", rows: "np.ndarray") -> None:
        self.base, self.size = base, size
        self.frames, self.rows = frames, rows  # (k,) frame addresses, (k, ENTRIES_PER_TABLE) their entries

    @cached_property
    def _row_of(self) -> dict[int, int]:
        # Built on the first read, after the pause: the pause only copies.
        return {p: i for i, p in enumerate(self.frames.tolist())}

    def _rows(self, paddrs) -> list[int]:
        row_of = self._row_of
        try:
            return [row_of[p] for p in paddrs]
        except KeyError as exc:
            raise NotCopied(int(exc.args[0])) from None

    def read_table(self, paddr: int) -> "np.ndarray":
        return self.rows[self._rows([int(paddr)])[0]].copy()

    def read_tables(self, paddrs: "np.ndarray") -> "np.ndarray":
        np = _numpy()
        paddrs = np.asarray(paddrs, dtype=np.uint64)
        if paddrs.size == 0:
            return np.zeros((0, ENTRIES_PER_TABLE), dtype=np.uint64)
        return self.rows[self._rows(paddrs.tolist())]

    # Byte and word reads: a heap copied wholesale (its pages, one gather) is
    # walked on a FrameCopy like on the memory it came from.
    def read(self, paddr: int, n: int) -> bytes:
        paddr = int(paddr)
        if n < 0 or paddr < self.base or paddr + n > self.base + self.size:
            raise OutOfBounds(paddr, n, self.base, self.size)
        out = bytearray()
        while n > 0:
            frame = paddr & ~(PAGE_4K - 1)
            off = paddr - frame
            chunk = min(n, PAGE_4K - off)
            out += self.rows[self._rows([frame])[0]].view("u1")[off : off + chunk].tobytes()
            paddr, n = paddr + chunk, n - chunk
        return bytes(out)

    def read_u64(self, paddr: int) -> int:
        if paddr % 8:
            raise Misaligned(int(paddr), 8)
        return _U64.unpack(self.read(paddr, 8))[0]

    @cached_property
    def _sorted(self) -> tuple["np.ndarray", "np.ndarray"]:
        np = _numpy()
        order = np.argsort(self.frames, kind="stable")
        return self.frames[order].astype(np.uint64), order

    def read_u64s(self, paddrs: "np.ndarray") -> "np.ndarray":
        """The u64s at the 8-byte aligned ``paddrs`` (any order), vectorized."""
        np = _numpy()
        paddrs = np.asarray(paddrs, dtype=np.uint64)
        if paddrs.size == 0:
            return np.zeros(0, dtype=np.uint64)
        if (paddrs & np.uint64(7)).any():
            raise Misaligned(int(paddrs[np.argmax(paddrs & np.uint64(7) != 0)]), 8)
        frames, order = self._sorted
        page = paddrs & ~np.uint64(PAGE_4K - 1)
        i = np.minimum(np.searchsorted(frames, page), max(frames.size - 1, 0))
        missing = frames.size == 0 or (frames[i] != page).any()
        if missing:
            bad = page if frames.size == 0 else page[frames[i] != page]
            raise NotCopied(int(bad[0]))
        word = (paddrs & np.uint64(PAGE_4K - 1)) >> np.uint64(3)
        return self.rows.reshape(-1)[order[i] * ENTRIES_PER_TABLE + word.astype(np.intp)]
