"""What a snapshot copies while the guest is held, and nothing more.

A snapshot reads everything while the guest runs, then holds it once to
learn whether what it read still holds. Everything that must be seen at
one instant is copied here, raw: the control registers, the inspect
block's bytes, every page table the optimistic walk decoded (one gather,
``mm.rewalk.TableCopier``, with the tables newly reached below entries
that changed), the heap (a small one whole, ``heap_copy.HeapCopier``;
else the words the heap walk read), and the frame bitmaps. The
comparisons, the patching of the walk and the parsing all happen on these
copies after the guest runs again (``snapshot.Snapshotter``), so the hold
costs copies only, however much the guest changed.

Local targets call ``capture`` on the vCPU thread itself (``Vm.visit``):
no other thread's wake-up is inside the pause.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mm.physmem import FrameCopy
from mm.rewalk import TableCopier

from .facts import GuestFacts
from .heap import HeapView
from .heap_copy import HeapCopier
from .inspect_block import INSPECT_BLOCK_SIZE, SEQ_OFFSET
from .target import ControlRegisters


@dataclass
class Capture:
    """Raw copies made at one instant with the guest held."""

    regs: ControlRegisters
    block: bytes | None  # the inspect block's bytes (None: no block, or outside RAM)
    tables: FrameCopy | None  # every traced table, as it is now (None: nothing traced)
    heap: tuple | None  # ``HeapView.capture``: the words the heap walk read
    heap_pages: FrameCopy | None  # ``HeapCopier.copy``: the whole heap (walked after the hold)
    bitmap: bytes | None  # both frame bitmaps (used, then managed)
    bitmap_at: tuple[int, int] | None  # where ``bitmap`` was copied from (address, bytes)
    copy_ns: int = 0  # the copies alone
    #: Each copy's share of ``copy_ns`` (ns), in the order of ``PHASES``.
    phases_ns: tuple[int, ...] = ()


#: What ``capture`` copies, in order (``Capture.phases_ns``).
PHASES = ("registers", "block", "tables", "heap", "bitmap")


def bitmap_span(facts: GuestFacts) -> tuple[int, int] | None:
    """(physical address, bytes) of both frame bitmaps, if sane for this RAM."""
    if facts.bitmap is None:
        return None
    paddr, bits = facts.bitmap
    if bits > facts.ram_size // 4096 + 64:
        return None
    n = 2 * (-(-bits // 64)) * 8
    if paddr < 0 or paddr + n > facts.ram_size:
        return None
    return paddr, n


def block_span(facts: GuestFacts, physmem) -> int | None:
    """The inspect block's physical address, if it lies inside RAM."""
    paddr = facts.report.inspect_block_phys
    size = getattr(physmem, "size", None)
    if paddr is None or paddr < 0 or (size is not None and paddr + INSPECT_BLOCK_SIZE > size):
        return None
    return paddr


def capture(target, physmem, *, block_at: int | None, tables: TableCopier | None, heap: HeapView | None,
            bitmap_at: tuple[int, int] | None, heap_pages: HeapCopier | None = None) -> Capture:
    """Copy everything a snapshot needs consistent (the guest held); ``tables``
    and ``heap_pages`` are prepared beforehand, with the guest running (one
    of ``heap`` and ``heap_pages``, or neither)."""
    now = time.perf_counter_ns
    t0 = now()
    regs = target.control_registers()
    t1 = now()
    block = physmem.read(block_at, INSPECT_BLOCK_SIZE) if block_at is not None else None
    t2 = now()
    if block is not None and block[SEQ_OFFSET] & 1:
        # Inside a critical section (odd seq, even after running on): the
        # snapshot cannot use this hold, so it copies nothing more.
        return Capture(regs, block, None, None, None, None, None, t2 - t0, (t1 - t0, t2 - t1, 0, 0, 0))
    frames = tables.copy() if tables is not None else None
    t3 = now()
    words = heap.capture(physmem) if heap is not None else None
    pages = heap_pages.copy() if heap_pages is not None else None
    t4 = now()
    bitmap = physmem.read(*bitmap_at) if bitmap_at is not None else None
    t5 = now()
    return Capture(regs, block, frames, words, pages, bitmap, bitmap_at, t5 - t0,
                   (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4))
