"""The guest's heap, walked from the host.

Which walk applies comes from the heap index (inspect block ``heap_index``,
docs/ABI.md "Heap index"): the TLSF allocator (the default) is walked by
``tlsf.walk_tlsf`` (tags and segregated lists); the first-fit list
(``allocator=list``, or a guest without a heap index) by ``walk_free_list``
below. Both fill a ``HeapView``.

The first-fit allocator keeps free blocks in address order, each
starting with a node ``{size: u64, next: u64}`` (guest/src/memory/firstfit.rs).
The walk trusts nothing: a pointer outside the heap, a misaligned or
unmapped node, a size that runs past the heap, a list that is not in
address order, or a cycle ends the walk with a finding; at most
``max_nodes`` nodes are read, so a hostile list costs a bounded time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from mm.findings import Finding, Severity
from mm.walker import RunArrays

NODE = struct.Struct("<QQ")
MIN_BLOCK = 16


class RunTranslator:
    """Virtual -> physical through a snapshot's coalesced runs (no re-walk)."""

    def __init__(self, runs: RunArrays):
        self.virt = runs.virt.astype(np.uint64)
        self.end = (runs.virt + runs.size).astype(np.uint64)
        self.phys = runs.phys.astype(np.uint64)

    def translate(self, virt: int) -> int | None:
        if self.virt.size == 0:
            return None
        i = int(np.searchsorted(self.virt, np.uint64(virt), side="right")) - 1
        if i < 0 or virt >= int(self.end[i]):
            return None
        return int(self.phys[i]) + (virt - int(self.virt[i]))


@dataclass
class HeapView:
    heap_start: int
    heap_end: int
    head: int
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (address, size)
    findings: list[Finding] = field(default_factory=list)
    truncated: bool = False
    allocator: str = "list"
    #: TLSF only: blocks in use (tag walk), of which held by the size-class caches,
    #: members per segregated list ("fl.sl"), findings the guest counted itself.
    used_blocks: int | None = None
    cached_blocks: int = 0
    lists: dict[str, int] = field(default_factory=dict)
    guest_findings: int = 0
    top: int = 0  # TLSF: the free block at the heap's end, on no list (0: none)

    @property
    def free_bytes(self) -> int:
        return sum(s for _, s in self.blocks)

    @property
    def largest_free(self) -> int:
        return max((s for _, s in self.blocks), default=0)

    @property
    def fragmentation(self) -> float:
        """1 - largest/total free: 0 when all free memory is one block."""
        total = self.free_bytes
        return 0.0 if total == 0 else 1.0 - self.largest_free / total

    def histogram(self) -> dict[str, int]:
        """Free blocks by size class (powers of two)."""
        out: dict[str, int] = {}
        for _, s in self.blocks:
            c = 1 << max(4, (s - 1).bit_length())
            key = f"<= {c}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: int(kv[0][3:])))

    def to_json(self) -> dict:
        return {
            "heap_start": self.heap_start,
            "heap_end": self.heap_end,
            "head": self.head,
            "free_blocks": len(self.blocks),
            "free_bytes": self.free_bytes,
            "largest_free": self.largest_free,
            "fragmentation": round(self.fragmentation, 4),
            "histogram": self.histogram(),
            "blocks": [[a, s] for a, s in self.blocks[:4096]],
            "truncated": self.truncated,
            "findings": [str(f) for f in self.findings],
            "allocator": self.allocator,
            "used_blocks": self.used_blocks,
            "cached_blocks": self.cached_blocks,
            "lists": {k: v for k, v in self.lists.items() if v},
            "guest_findings": self.guest_findings,
            "top": self.top,
        }


def walk_free_list(
    physmem, translator: RunTranslator, head: int, heap_start: int, heap_end: int, *, max_nodes: int = 65536
) -> HeapView:
    view = HeapView(heap_start, heap_end, head)

    def finding(kind: str, addr: int | None, detail: str) -> None:
        view.findings.append(Finding(kind, addr, 0, detail, Severity.ERROR))

    seen: set[int] = set()
    cur, prev_end = head, heap_start
    while cur:
        if len(view.blocks) >= max_nodes:
            view.truncated = True
            finding("heap-too-long", cur, f"free list longer than {max_nodes} nodes: stopped")
            break
        if not heap_start <= cur < heap_end:
            finding("heap-pointer-outside", cur, f"free-list pointer {cur:#x} is outside the heap")
            break
        if cur % MIN_BLOCK:
            finding("heap-misaligned", cur, f"free-list node {cur:#x} is not {MIN_BLOCK}-byte aligned")
            break
        if cur in seen:
            finding("heap-cycle", cur, f"free list loops back to {cur:#x}")
            break
        if cur < prev_end:
            finding("heap-order", cur, f"free-list node {cur:#x} is below the end of the previous block")
            break
        seen.add(cur)
        phys = translator.translate(cur)
        if phys is None or not physmem_contains(physmem, phys, NODE.size):
            finding("heap-unmapped", cur, f"free-list node {cur:#x} is not mapped to guest RAM")
            break
        size, nxt = NODE.unpack(physmem.read(phys, NODE.size))
        if size < MIN_BLOCK or cur + size > heap_end:
            finding("heap-bad-size", cur, f"free block at {cur:#x} has size {size:#x}")
            break
        view.blocks.append((cur, size))
        prev_end = cur + size
        cur = nxt
    return view


def physmem_contains(physmem, paddr: int, n: int) -> bool:
    size = getattr(physmem, "size", None)
    return size is None or (0 <= paddr and paddr + n <= size)
