"""Building page tables: the host-side mapper.

The mapper writes tables through the :class:`~mm.physmem.PhysicalMemory`
protocol and takes table frames from a :class:`~mm.frames.FrameAllocator`, so
it is independent of where the tables live (the x86_64 crate's
``OffsetPageTable`` idea). Intermediate entries get P|W (and U when a leaf
below is U) and never XD: the leaf alone decides the permissions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .addr import PAGE_4K, PageSize, canonicalize, is_canonical
from .entry import LEVELS, Level, leaf_addr_mask
from .levels import ENTRIES_PER_TABLE, linear_bits
from .errors import AddressError, AlreadyMapped, Misaligned, NotMapped, ParentIsHuge, WXViolation
from .flags import ADDR_MASK, PteFlags
from .frames import FrameAllocator
from .physmem import PhysicalMemory
from .walker import Translation, translate

__all__ = ["Mapper"]

_P = int(PteFlags.PRESENT)
_W = int(PteFlags.WRITABLE)
_U = int(PteFlags.USER)
_PS = int(PteFlags.HUGE)
_NX = int(PteFlags.NO_EXECUTE)
_ARANGE = np.arange(ENTRIES_PER_TABLE, dtype=np.uint64)


def _zeroed_frame(mem: PhysicalMemory, frames: FrameAllocator) -> int:
    """A new table frame, zeroed (all 512 entries not present)."""
    frame = frames.allocate()
    if frame % PAGE_4K:
        raise Misaligned(frame, PAGE_4K)
    mem.zero(frame, PAGE_4K)
    return frame


class Mapper:
    """Maps pages into the table rooted at ``root`` (the CR3 value), with the
    paging ``levels`` (4-level by default; ``(PML5, *LEVELS)`` for 5-level)."""

    def __init__(
        self,
        mem: PhysicalMemory,
        root: int,
        frames: FrameAllocator,
        forbid_wx: bool = True,
        free_frame: Callable[[int], None] | None = None,
        levels: Sequence[Level] = LEVELS,
    ) -> None:
        if root % PAGE_4K:
            raise Misaligned(root, PAGE_4K)
        self.levels = tuple(levels)
        self._bits = linear_bits(self.levels)
        #: Index into ``levels`` of the level whose leaves map each page size.
        self._leaf_index = {lv.span: i for i, lv in enumerate(self.levels) if lv.may_be_huge or lv.is_last}
        self.mem = mem
        self.frames = frames
        self.forbid_wx = forbid_wx
        self._root = root
        #: Called with each table frame that ``unmap`` empties; None keeps them.
        self.free_frame = free_frame if free_frame is not None else getattr(frames, "free", None)

    @classmethod
    def new(cls, mem: PhysicalMemory, frames: FrameAllocator, forbid_wx: bool = True, **kw: object) -> "Mapper":
        """A mapper over a freshly allocated, zeroed root table (the PML4 with 4 levels)."""
        root = _zeroed_frame(mem, frames)
        return cls(mem, root, frames, forbid_wx, **kw)  # type: ignore[arg-type]

    @property
    def root(self) -> int:
        """Physical address of the root table: the value to load into CR3."""
        return self._root

    def __repr__(self) -> str:
        return f"Mapper(root={self._root:#_x})"

    # -- helpers ---------------------------------------------------------

    def _new_table(self) -> int:
        return _zeroed_frame(self.mem, self.frames)

    def _leaf_bits(self, virt: int, flags: PteFlags | int, size: int) -> int:
        """The non-address bits of a leaf of ``size`` for the requested ``flags``."""
        bits = int(flags) | _P
        if size == PAGE_4K:
            # In a 4 KiB PTE bit 7 is the PAT bit, bit 12 is an address bit.
            if bits & ADDR_MASK:
                raise ValueError(f"flags {bits:#_x} overlap the 4 KiB address field")
        else:
            bits |= _PS  # PS=1 makes a PDPTE/PDE a leaf (SDM 4.5.4)
            if bits & ADDR_MASK & ~int(PteFlags.PAT_HUGE):
                raise ValueError(f"flags {bits:#_x} overlap the large-page address field")
        if self.forbid_wx and bits & _W and not bits & _NX:
            raise WXViolation(virt)
        return bits

    def _check_range(self, virt: int, phys: int, length: int, size: int) -> int:
        """Validate a mapping request; returns ``virt`` as a linear address (48 bits with 4 levels)."""
        size = int(PageSize(size))
        if not is_canonical(virt, self._bits):
            raise AddressError(virt, "non-canonical virtual address")
        for a in (virt, phys, length):
            if a % size:
                raise Misaligned(a, size)
        if phys < 0 or phys + length > 1 << 52:
            raise AddressError(phys, "physical range beyond 2**52")
        half = 1 << (self._bits - 1)
        lin = virt & ((1 << self._bits) - 1)
        half_end = half if lin < half else 1 << self._bits
        if lin + length > half_end:
            raise AddressError(virt, f"range of {length:#_x} bytes crosses the canonical hole")
        return lin

    # -- mapping ---------------------------------------------------------

    def map(self, virt: int, phys: int, size: PageSize | int = PageSize.SIZE_4K, flags: PteFlags | int = PteFlags.PRESENT) -> None:
        """Map one page of ``size`` at ``virt`` to ``phys``."""
        self.map_range(virt, phys, int(size), flags, size)

    def map_range(
        self,
        virt: int,
        phys: int,
        length: int,
        flags: PteFlags | int,
        page_size: PageSize | int = PageSize.SIZE_4K,
    ) -> None:
        """Map ``length`` bytes with pages of ``page_size``, a table slice at a time.

        All or nothing: if a page in the range is already mapped, the leaves
        written so far are cleared again and AlreadyMapped is raised (tables
        allocated on the way stay, empty).
        """
        lin = self._check_range(virt, phys, length, page_size)
        if length == 0:
            return
        leaf_bits = self._leaf_bits(virt, flags, int(page_size))
        inter = _P | _W | (leaf_bits & _U)
        leaf_index = self._leaf_index[int(page_size)]
        written: list[tuple[int, int, int]] = []
        try:
            self._map_level(self._root, 0, lin, lin + length, phys, leaf_index, leaf_bits, inter, False, written)
        except BaseException:
            for table, i0, n in written:
                self.mem.write_u64s(table + 8 * i0, np.zeros(n, dtype=np.uint64))
            raise

    def _map_level(
        self,
        table: int,
        li: int,
        lin: int,
        end: int,
        phys: int,
        leaf_index: int,
        leaf_bits: int,
        inter: int,
        fresh: bool,
        written: list[tuple[int, int, int]],
    ) -> None:
        """Map linear ``[lin, end)`` (inside this table's span) at ``phys``."""
        lv = self.levels[li]
        shift = lv.shift
        i0 = lv.index(lin)
        n = ((end - 1) >> shift) - (lin >> shift) + 1
        if li == leaf_index:
            if not fresh:
                cur = self.mem.read_table(table)[i0 : i0 + n]
                hit = np.flatnonzero(cur & np.uint64(_P))
                if hit.size:
                    k = int(hit[0])
                    raise AlreadyMapped(canonicalize(lin + (k << shift), self._bits), lv.number, int(cur[k]))
            vals = _ARANGE[:n] * np.uint64(lv.span) + np.uint64(phys | leaf_bits)
            self.mem.write_u64s(table + 8 * i0, vals)
            written.append((table, i0, n))
            return

        if fresh:
            cur = np.zeros(n, dtype=np.uint64)
        else:
            cur = self.mem.read_table(table)[i0 : i0 + n]
            if lv.may_be_huge:
                huge = np.flatnonzero((cur & np.uint64(_P | _PS)) == np.uint64(_P | _PS))
                if huge.size:
                    k = int(huge[0])
                    raise ParentIsHuge(canonicalize(lin + (k << shift), self._bits), lv.number, int(cur[k]))
        new = cur.copy()
        children: list[tuple[int, bool]] = []
        for k in range(n):
            e = int(cur[k])
            if e & _P:
                new[k] = (e | inter) & ~_NX  # leaf flags decide: never restrict here
                children.append((e & ADDR_MASK, False))
            else:
                child = self._new_table()
                new[k] = child | inter
                children.append((child, True))
        if fresh or (new != cur).any():
            self.mem.write_u64s(table + 8 * i0, new)

        span = lv.span
        entry_base = (lin >> shift) << shift
        for k, (child, child_fresh) in enumerate(children):
            lo = max(lin, entry_base + k * span)
            hi = min(end, entry_base + (k + 1) * span)
            self._map_level(child, li + 1, lo, hi, phys + (lo - lin), leaf_index, leaf_bits, inter, child_fresh, written)

    # -- leaf lookup -----------------------------------------------------

    def _find_leaf(self, virt: int) -> tuple[list[tuple[int, int]], int, int]:
        """``(path, level_index, entry)``: the slots walked down to the leaf of ``virt``."""
        if not is_canonical(virt, self._bits):
            raise AddressError(virt, "non-canonical virtual address")
        table = self._root
        path: list[tuple[int, int]] = []
        for li, lv in enumerate(self.levels):
            slot = table + 8 * lv.index(virt)
            e = self.mem.read_u64(slot)
            if not e & _P:
                raise NotMapped(virt, lv.number, e)
            path.append((table, slot))
            if lv.is_last or (lv.may_be_huge and e & _PS):
                return path, li, e
            table = e & ADDR_MASK
        raise AssertionError("unreachable: PT entries are always leaves")

    def unmap(self, virt: int) -> tuple[int, PageSize]:
        """Remove the page that starts at ``virt``; returns ``(phys, size)``.

        Tables left empty are unlinked and handed to ``free_frame`` when the
        mapper has one (the root is kept).
        """
        path, li, e = self._find_leaf(virt)
        lv = self.levels[li]
        if virt % lv.span:
            raise Misaligned(virt, lv.span)
        self.mem.write_u64(path[-1][1], 0)
        if self.free_frame is not None:
            for depth in range(len(path) - 1, 0, -1):
                table = path[depth][0]
                if self.mem.read_table(table).any():
                    break
                self.mem.write_u64(path[depth - 1][1], 0)
                self.free_frame(table)
        return e & leaf_addr_mask(lv.number), PageSize(lv.span)

    def set_flags(self, virt: int, flags: PteFlags | int) -> None:
        """Replace the flags of the leaf mapping ``virt`` (its address is kept)."""
        path, li, e = self._find_leaf(virt)
        lv = self.levels[li]
        bits = self._leaf_bits(virt, flags, lv.span)
        inter = _P | _W | (bits & _U)
        for _, slot in path[:-1]:
            old = self.mem.read_u64(slot)
            new = (old | inter) & ~_NX
            if new != old:
                self.mem.write_u64(slot, new)
        self.mem.write_u64(path[-1][1], (e & leaf_addr_mask(lv.number)) | bits)

    def translate(self, virt: int) -> "Translation | None":
        """Hardware translation of ``virt`` through these tables (see walker.translate)."""
        return translate(self.mem, self._root, virt, levels=self.levels)
