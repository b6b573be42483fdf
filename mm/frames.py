"""Allocators of 4 KiB physical frames for page tables."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .addr import PAGE_4K
from .errors import Misaligned, OutOfFrames

__all__ = ["FrameAllocator", "BumpFrameAllocator"]


@runtime_checkable
class FrameAllocator(Protocol):
    """Hands out 4 KiB-aligned physical frames.

    An allocator that can take frames back may also define ``free(paddr)``;
    the mapper then returns page-table frames emptied by ``unmap``.
    """

    def allocate(self) -> int:
        """Physical address of a fresh 4 KiB frame; raises OutOfFrames."""
        ...


class BumpFrameAllocator:
    """Allocates frames upwards from ``start`` to ``end`` (exclusive), never frees."""

    def __init__(self, start: int, end: int) -> None:
        for a in (start, end):
            if a % PAGE_4K:
                raise Misaligned(a, PAGE_4K)
        if end < start:
            raise ValueError(f"end {end:#_x} below start {start:#_x}")
        self.start, self.end = start, end
        #: Physical address of the next frame to hand out.
        self.next = start
        #: Every frame handed out, in order.
        self.allocated: list[int] = []

    @property
    def used_end(self) -> int:
        """End (exclusive) of the frames used so far (BootInfo.boot_pt_end)."""
        return self.next

    def allocate(self) -> int:
        if self.next + PAGE_4K > self.end:
            raise OutOfFrames(f"bump allocator [{self.start:#_x}, {self.end:#_x}) exhausted")
        frame = self.next
        self.next += PAGE_4K
        self.allocated.append(frame)
        return frame

    def __repr__(self) -> str:
        return f"BumpFrameAllocator({self.start:#_x}, {self.end:#_x}, next={self.next:#_x})"
