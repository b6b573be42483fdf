"""A small heap, copied whole while the guest is held and walked afterwards.

The optimistic way (``heap.HeapView.capture``) walks the heap while the
guest runs and copies, in the hold, every word the walk read: the walk
holds only if none of them changed. A guest that changes its heap all the
time (the first-fit list's head on every allocation, a fragmented heap
being built) fails that comparison again and again, and every failure costs
another hold. A heap small enough is copied whole instead: its pages and
those of the heap index, in one gather into a buffer allocated and touched
beforehand. The walk then runs on the copy (``mm.physmem.FrameCopy``) after
the guest runs again: whatever the guest did to its heap, the copy is one
moment, the one the inspect block (even ``seq``) and the tables were copied
at. What can still make it miss: the heap grew past the pages copied, or
its pages were mapped elsewhere in between (checked on the tables as
copied in the same hold, ``maps_same``).

The size bound keeps the copy inside the hold's budget (``COPY_PAGES``);
a larger heap keeps the optimistic word gather.
"""

from __future__ import annotations

import numpy as np

from mm.physmem import FrameCopy
from mm.walker import RunArrays

from .heap import RunTranslator, _buffer
from .tlsf import HEADS_OFFSET, INDEX_TLSF_OFFSET, MAX_FL, MAX_SL

PAGE = 4096
UNMAPPED = np.uint64(2**64 - 1)  # RunTranslator's answer for an unmapped address
#: Largest heap copied whole, in 4 KiB pages (heap index pages included).
#: Measured on the development host (AMD EPYC, KVM-PVM, 2 cores): a gather of
#: 544 scattered pages into a touched buffer costs 0.15 ms with the pages in
#: cache (the hold's warm-up copy just before puts them there) and 0.57 ms
#: evicted; 0.3-0.4 us a page up to 1,024 pages, then 0.9 us a page at 2,048
#: (past the cache). The rest of a hold is 0.1-0.35 ms at p99, so 768 pages
#: (3 MiB: ~0.3 ms hot) keeps a hold under 1 ms; a 16,384-block fragmented
#: heap is about 550 pages.
COPY_PAGES = 768
#: A heap this small is always copied whole: at 0.3-1 us a page, no dearer
#: than the optimistic word gather of a list of a few thousand blocks (a
#: 1,024-block list: 81 pages), and no heap change can cost a second hold.
WHOLE_PAGES = 128
#: Bytes of the heap index a walk may read (header, TLSF control block,
#: all segregated list heads and the top).
INDEX_BYTES = INDEX_TLSF_OFFSET + HEADS_OFFSET + 8 * MAX_FL * MAX_SL + 8


def _pages(start: int, end: int) -> np.ndarray:
    """Virtual page addresses covering ``[start, end)``."""
    first, last = start & ~(PAGE - 1), (end + PAGE - 1) & ~(PAGE - 1)
    return np.arange(first, last, PAGE, dtype=np.uint64)


class HeapCopier:
    """The pages of one heap, found while the guest runs (``plan``), copied
    in a hold (``copy``), checked and walked after it."""

    def __init__(self, physmem, virt: np.ndarray, phys: np.ndarray, heap_start: int, heap_end: int,
                 index: int | None, owner: dict):
        self.physmem = physmem
        # Per page the walk may read: virtual, and physical as mapped when
        # planned (UNMAPPED: an index page not mapped to RAM, not copied).
        self.virt, self.phys = virt, phys
        self.frames = phys[phys != UNMAPPED]  # what is copied
        self.heap_start, self.heap_end, self.index = heap_start, heap_end, index
        self._at = physmem.frame_indices(self.frames)
        # Kept by the owner (a Snapshotter) for the next plan; capacity in
        # steps of 64 pages so a growing heap rarely needs a new one.
        n = len(self.frames)
        cap = -(-n // 64) * 64
        fresh = owner.get("_heap_pages") is None or owner["_heap_pages"].size != cap * 512
        self._out = _buffer(owner, "_heap_pages", cap * 512).reshape(cap, 512)[:n]
        if fresh:
            # Touched now: a hold that wrote fresh memory would take a page
            # fault per page (~1.5 ms for 564 pages here).
            self._out.base.fill(1)
        # ``warm`` reads into another buffer: writing the hold's buffer from
        # this thread would leave its cache lines owned by this CPU, and the
        # hold (on the vCPU thread, another CPU) would pay to take them back.
        self._scratch = _buffer(owner, "_heap_scratch", cap * 512).reshape(cap, 512)[:n]

    @classmethod
    def plan(cls, physmem, runs: RunArrays, heap_start: int, heap_end: int, index: int | None, owner: dict,
             *, max_pages: int = COPY_PAGES) -> "HeapCopier | None":
        """A copier for the heap ``[heap_start, heap_end)`` (and the index at
        ``index``) as ``runs`` map it; None if it is larger than ``max_pages``,
        not all mapped to RAM, or ``physmem`` cannot gather frames."""
        if not hasattr(physmem, "frame_indices") or not heap_start < heap_end:
            return None
        if (heap_end - heap_start) // PAGE > max_pages:
            return None
        virt = _pages(heap_start, heap_end)
        if index:
            virt = np.union1d(virt, _pages(index, index + INDEX_BYTES))
        if virt.size > max_pages:
            return None
        phys = RunTranslator(runs).translate_many(virt)
        size = int(getattr(physmem, "size", 0))
        base = int(getattr(physmem, "base", 0))
        bad = (phys < np.uint64(base)) | (phys > np.uint64(base + size - PAGE)) | (phys % np.uint64(PAGE) != 0)
        in_heap = (virt >= np.uint64(heap_start & ~(PAGE - 1))) & (virt < np.uint64(heap_end))
        if (bad & in_heap).any():
            return None  # a hole in the heap: the word path reports it
        # Index pages past the index's end may be unmapped: the walk finds them so on the copy too.
        phys = np.where(bad, UNMAPPED, phys)
        return cls(physmem, virt, phys, heap_start, heap_end, index, owner)

    def warm(self) -> None:
        """Read the pages once, with the guest running: they are then in the
        shared cache when the hold copies them."""
        self.physmem.gather_frames(self._at, self._scratch)

    def copy(self) -> FrameCopy:
        """The pages as they are now (the guest held): one gather."""
        rows = self.physmem.gather_frames(self._at, self._out)
        return FrameCopy(int(getattr(self.physmem, "base", 0)), int(self.physmem.size), self.frames, rows)

    def covers(self, heap_start: int, heap_end: int, index: int | None) -> bool:
        """Was the heap these bounds describe (the block as copied) copied?"""
        return heap_start == self.heap_start and heap_start < heap_end <= self.heap_end and index == self.index

    def maps_same(self, translator: RunTranslator, heap_start: int, heap_end: int) -> bool:
        """Do the tables as copied (``translator``) map every page the walk
        may read, those of ``[heap_start, heap_end)`` and the index, to the
        frames copied?"""
        need = (self.virt >= np.uint64(heap_start & ~(PAGE - 1))) & (self.virt < np.uint64(heap_end))
        if self.index:
            first, end = np.uint64(self.index & ~(PAGE - 1)), np.uint64(self.index + INDEX_BYTES)
            need |= (self.virt >= first) & (self.virt < end)
        now = translator.translate_many(self.virt[need])
        size = int(getattr(self.physmem, "size", 0))
        base = int(getattr(self.physmem, "base", 0))
        now = np.where((now < np.uint64(base)) | (now > np.uint64(base + size - PAGE)), UNMAPPED, now)
        return bool(np.array_equal(now, self.phys[need]))
