"""The guest's inspect block (docs/ABI.md, "Inspect block"), read live.

The kernel keeps one 800-byte ``#[repr(C)]`` block current (heap free-list
head, heap bounds, frame counts, bitmap location, stack records). Each update
is bracketed by two increments of ``seq``; a read is consistent when ``seq``
is even and unchanged across it. The block's physical address comes from the
INSPECT report; everything in it is untrusted and only ever used as a hint
for bounded walks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..abi import INSPECT_BLOCK_MAGIC, INSPECT_BLOCK_SIZE, MAX_STACKS, STACK_IN_USE, InspectBlockRaw, StackRecord

__all__ = [
    "INSPECT_BLOCK_MAGIC", "INSPECT_BLOCK_SIZE", "MAX_STACKS", "SEQ_OFFSET", "STACK_IN_USE", "InspectBlock",
    "InspectBlockError", "InspectBlockRaw", "Stack", "StackRecord", "parked_busy", "parse_inspect_block",
    "read_inspect_block",
]

#: Offset of ``seq`` in the block: odd while the guest is inside a critical section.
SEQ_OFFSET = InspectBlockRaw.seq.offset


def parked_busy(physmem, paddr: int | None) -> bool:
    """With the vCPU parked: is the guest inside a critical section? The
    block's ``seq`` word alone (odd while a section is open): one read, no
    parse; False where there is no block to read."""
    size = getattr(physmem, "size", None)
    if paddr is None or paddr < 0 or (size is not None and paddr + SEQ_OFFSET + 8 > size):
        return False
    return bool(physmem.read_u64(paddr + SEQ_OFFSET) & 1)


class InspectBlockError(ValueError):
    pass


@dataclass(frozen=True)
class Stack:
    task_id: int
    base: int
    top: int
    guard_low: int
    guard_high: int


@dataclass(frozen=True)
class InspectBlock:
    """One consistent (or, if ``busy``, mid-update) copy of the guest's block."""

    seq: int
    heap_free_head: int
    heap_start: int
    heap_end: int
    heap_free_bytes: int
    heap_large_bytes: int
    frames_free: int
    bitmap_phys: int
    bitmap_bits: int
    current_task: int
    demand_start: int
    demand_end: int
    demand_faults: int
    heap_allocs: int
    heap_frees: int
    heap_cached_bytes: int
    workload_iters: int
    #: Virtual address of the guest's heap index (docs/ABI.md "Heap index"), 0 if none.
    heap_index: int = 0
    stacks: tuple[Stack, ...] = ()

    @property
    def busy(self) -> bool:
        """The guest was inside an allocator/paging critical section (odd seq):
        heap, bitmap and tables may be mid-update."""
        return self.seq % 2 == 1

    @classmethod
    def from_raw(cls, raw: InspectBlockRaw) -> "InspectBlock":
        if not _SCALAR_FIELDS:
            _SCALAR_FIELDS.extend(f.name for f in dataclasses.fields(cls) if f.name != "stacks")
        stacks = tuple(
            Stack(r.task_id, r.base, r.top, r.guard_low, r.guard_high)
            for r in raw.stacks
            if r.flags & STACK_IN_USE and r.base < r.top
        )
        return cls(**{n: getattr(raw, n) for n in _SCALAR_FIELDS}, stacks=stacks)


#: InspectBlock's fields but ``stacks`` (filled on first use: dataclasses.fields is slow).
_SCALAR_FIELDS: list[str] = []


def read_inspect_block(physmem, paddr: int, retries: int = 8) -> InspectBlock:
    """Read a consistent copy (seq even and unchanged); raises InspectBlockError.

    Still odd after ``retries`` reads: with the vCPU parked that means "inside
    a critical section"; the caller decides (``InspectBlock.busy``) what to do
    (with the vCPU parked, one read is all it takes: nothing changes it).
    """
    size = getattr(physmem, "size", None)
    if paddr < 0 or (size is not None and paddr + INSPECT_BLOCK_SIZE > size):
        raise InspectBlockError(f"inspect block at {paddr:#x} lies outside guest RAM")
    for _ in range(retries):
        raw = _raw(physmem.read(paddr, INSPECT_BLOCK_SIZE), paddr)
        seq_after = int.from_bytes(physmem.read(paddr + InspectBlockRaw.seq.offset, 8), "little")
        if raw.seq == seq_after and raw.seq % 2 == 0:
            break
    return InspectBlock.from_raw(raw)


def parse_inspect_block(data: bytes, paddr: int) -> InspectBlock:
    """A block from bytes copied at one instant (the vCPU held: no seq
    re-read needed; ``busy`` says whether a section was open)."""
    return InspectBlock.from_raw(_raw(data, paddr))


def _raw(data: bytes, paddr: int) -> InspectBlockRaw:
    raw = InspectBlockRaw.from_buffer_copy(data)
    if raw.magic != INSPECT_BLOCK_MAGIC or raw.size != INSPECT_BLOCK_SIZE:
        raise InspectBlockError(f"no inspect block at {paddr:#x} (bad magic or size)")
    return raw
