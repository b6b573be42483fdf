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

A walk of a fragmented heap (16,384 nodes) takes tens of milliseconds in
Python, far too long to hold the vCPU for. So snapshots walk while the guest
runs and keep what they read (``HeapView.record``: every node's physical
address and the two words read there). Inside the pause, ``unchanged``
re-reads those words in one vectorized gather and compares them: if all are
equal (and the tables, hence the translations, are unchanged), the walk is
exactly what a walk at that moment would give. A later walk can start from
an earlier one (``prior``): every node whose words are unchanged is taken
over with the whole unchanged stretch of the list behind it, so only the
nodes the guest changed are read again.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

import numpy as np

from mm.findings import Finding, Severity
from mm.walker import RunArrays

NODE = struct.Struct("<QQ")
MIN_BLOCK = 16
_EMPTY = np.zeros(0, dtype=np.uint64)


def _buffer(owner: dict, name: str, n: int) -> np.ndarray:
    """``n`` u64s kept in ``owner`` for the next capture, allocated and touched
    on first use: a gather into fresh memory would take page faults inside
    the pause. Reused by the next capture of the same walk (by then the
    previous one has been compared)."""
    buf = owner.get(name)
    if buf is None or buf.size != n:
        buf = owner[name] = np.zeros(n, dtype=np.uint64)
    return buf


def prepare_capture(heap: "HeapView") -> None:
    """Allocate what ``HeapView.capture`` copies into (outside a pause)."""
    if heap.reads is not None and heap.reads.words is not None:
        _buffer(heap.reads.__dict__, "_capture_out", heap.reads.words.size)
    if heap.record.words is not None and heap.record.phys.size:
        _buffer(heap.__dict__, "_capture_out", heap.record.words.size)


class RunTranslator:
    """Virtual -> physical through a snapshot's coalesced runs (no re-walk)."""

    def __init__(self, runs: RunArrays):
        self.virt = runs.virt.astype(np.uint64)
        self.end = (runs.virt + runs.size).astype(np.uint64)
        self.phys = runs.phys.astype(np.uint64)
        # Plain lists for the scalar path: bisect on a list is ~20x faster
        # than np.searchsorted on one value.
        self._virt_l, self._end_l, self._phys_l = self.virt.tolist(), self.end.tolist(), self.phys.tolist()

    def translate(self, virt: int) -> int | None:
        i = bisect.bisect_right(self._virt_l, virt) - 1
        if i < 0 or virt >= self._end_l[i]:
            return None
        return self._phys_l[i] + (virt - self._virt_l[i])

    def translate_many(self, virt: np.ndarray) -> np.ndarray:
        """Vectorized ``translate``; unmapped addresses give 2**64-1."""
        virt = np.asarray(virt, dtype=np.uint64)
        out = np.full(virt.size, np.uint64(2**64 - 1))
        if self.virt.size == 0 or virt.size == 0:
            return out
        i = np.searchsorted(self.virt, virt, side="right") - 1
        ok = i >= 0
        j = np.where(ok, i, 0)
        ok &= virt < self.end[j]
        out[ok] = self.phys[j[ok]] + (virt[ok] - self.virt[j[ok]])
        return out


@dataclass
class HeapRecord:
    """Every node a walk read: virtual and physical address, the words read."""

    addr: np.ndarray = field(default_factory=lambda: _EMPTY)
    phys: np.ndarray = field(default_factory=lambda: _EMPTY)
    size: np.ndarray = field(default_factory=lambda: _EMPTY)
    next: np.ndarray = field(default_factory=lambda: _EMPTY)
    #: Checked word indices of every (size, next) pair and the words read
    #: there, prepared by ``prepare`` so the check in the pause is one gather.
    words: np.ndarray | None = None
    expect: np.ndarray | None = None

    def prepare(self, physmem) -> None:
        # A walk of a copy (``heap_copy``) is never checked again: nothing to prepare.
        indices = getattr(physmem, "u64_indices", None)
        if indices is None:
            self.words = self.expect = None
            return
        try:
            # Each node's two words side by side and all of them in address
            # order: the gather in the pause then streams through the heap
            # once, each cache line fetched once (size then next, two passes
            # over 16,384 nodes, fetched every line twice: ~25 % slower cold).
            paddrs = np.stack([self.phys, self.phys + np.uint64(8)], axis=1).ravel()
            order = np.argsort(paddrs, kind="stable")
            self.words = indices(paddrs[order])
            self.expect = np.stack([self.size, self.next], axis=1).ravel()[order]
        except (ValueError, IndexError):
            self.words = self.expect = None


@dataclass
class HeapView:
    heap_start: int
    heap_end: int
    head: int
    addrs: np.ndarray = field(default_factory=lambda: _EMPTY)  # free blocks, address order
    sizes: np.ndarray = field(default_factory=lambda: _EMPTY)
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
    record: HeapRecord = field(default_factory=HeapRecord)
    #: Nodes read from guest memory by this walk (the rest came from ``prior``).
    nodes_read: int = 0

    #: Walks other than the first-fit list (TLSF): every read they made, to
    #: check in a pause (``unchanged``).
    reads: "RecordedReads | None" = None

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """(address, size) of every free block."""
        return list(zip(self.addrs.tolist(), self.sizes.tolist()))

    @blocks.setter
    def blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.addrs = np.array([a for a, _ in pairs], dtype=np.uint64)
        self.sizes = np.array([s for _, s in pairs], dtype=np.uint64)

    @property
    def free_blocks(self) -> int:
        """How many free blocks (``len(blocks)`` without building the list)."""
        return int(self.addrs.size)

    def free_size(self, addr: int) -> int:
        """The size of the free block at ``addr`` (0: none starts there)."""
        i = int(np.searchsorted(self.addrs, np.uint64(addr)))
        return int(self.sizes[i]) if i < self.addrs.size and int(self.addrs[i]) == addr else 0

    @property
    def free_bytes(self) -> int:
        return int(self.sizes.sum()) if self.sizes.size else 0

    @property
    def largest_free(self) -> int:
        return int(self.sizes.max()) if self.sizes.size else 0

    @property
    def fragmentation(self) -> float:
        """1 - largest/total free: 0 when all free memory is one block."""
        total = self.free_bytes
        return 0.0 if total == 0 else 1.0 - self.largest_free / total

    def histogram(self) -> dict[str, int]:
        """Free blocks by size class (powers of two)."""
        out: dict[str, int] = {}
        for s in self.sizes.tolist():
            c = 1 << max(4, (s - 1).bit_length())
            key = f"<= {c}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: int(kv[0][3:])))

    def unchanged(self, physmem) -> bool:
        """True if every node this walk read still holds the words it read
        (one vectorized gather; the caller checks that the translations and
        the heap bounds/head are unchanged too)."""
        return self.matches(self.capture(physmem))

    def capture(self, physmem) -> tuple | None:
        """The words this walk read, as they are now: copies only (made for a
        pause; ``matches`` compares them after). None: nothing to copy from."""
        reads = self.reads.capture(physmem) if self.reads is not None else ()
        r = self.record
        if r.phys.size == 0:
            return reads, _EMPTY
        if r.words is None:
            return None
        return reads, physmem.gather_u64(r.words, _buffer(self.__dict__, "_capture_out", r.words.size))

    def matches(self, captured: tuple | None) -> bool:
        """Does ``capture``'s copy hold exactly the words the walk read?"""
        if captured is None:
            return False
        reads, words = captured
        if self.reads is not None and not self.reads.matches(reads):
            return False
        return self.record.phys.size == 0 or bool(np.array_equal(words, self.record.expect))

    def to_json(self) -> dict:
        return {
            "heap_start": self.heap_start,
            "heap_end": self.heap_end,
            "head": self.head,
            "free_blocks": self.free_blocks,
            "free_bytes": self.free_bytes,
            "largest_free": self.largest_free,
            "fragmentation": round(self.fragmentation, 4),
            "histogram": self.histogram(),
            "blocks": [[a, s] for a, s in zip(self.addrs[:4096].tolist(), self.sizes[:4096].tolist())],
            "truncated": self.truncated,
            "findings": [str(f) for f in self.findings],
            "allocator": self.allocator,
            "used_blocks": self.used_blocks,
            "cached_blocks": self.cached_blocks,
            "lists": {k: v for k, v in self.lists.items() if v},
            "guest_findings": self.guest_findings,
            "top": self.top,
        }


class _Reuse:
    """What of a prior walk can be taken over: for each of its nodes, whether
    it is unchanged (same translation, same words) and where the unchanged
    stretch starting there ends."""

    def __init__(self, prior: HeapView, physmem, translator: RunTranslator, heap_start: int, heap_end: int):
        r = prior.record
        n = prior.addrs.size  # only nodes that became blocks (the rest ended the walk)
        ok = np.zeros(n, dtype=bool)
        if n and prior.heap_start == heap_start and r.addr.size >= n:  # a list walk (TLSF walks record no nodes)
            ph = r.phys[:n]
            ok = translator.translate_many(r.addr[:n]) == ph
            try:
                words = physmem.read_u64s(np.concatenate([ph[ok], ph[ok] + np.uint64(8)]))
                m = int(ok.sum())
                same = (words[:m] == r.size[:n][ok]) & (words[m:] == r.next[:n][ok])
                ok[np.flatnonzero(ok)[~same]] = False
            except (ValueError, LookupError):  # outside RAM, or (a copy) outside what was copied
                ok[:] = False
            ok &= prior.addrs + prior.sizes <= np.uint64(heap_end)
        self.prior, self.ok = prior, ok
        # stop[k]: first index >= k whose node changed (n if none).
        idx = np.where(ok, n, np.arange(n))
        self.stop = np.minimum.accumulate(idx[::-1])[::-1] if n else idx
        self.pos = {a: k for k, a in enumerate(prior.addrs.tolist())} if ok.any() else {}


def walk_free_list(
    physmem,
    translator: RunTranslator,
    head: int,
    heap_start: int,
    heap_end: int,
    *,
    max_nodes: int = 65536,
    prior: HeapView | None = None,
) -> HeapView:
    """Walk the list from ``head``; with ``prior`` (an earlier walk of the
    same heap), reuse every stretch of it the guest has not changed."""
    view = HeapView(heap_start, heap_end, head)
    reuse = _Reuse(prior, physmem, translator, heap_start, heap_end) if prior is not None else None

    def finding(kind: str, addr: int | None, detail: str) -> None:
        view.findings.append(Finding(kind, addr, 0, detail, Severity.ERROR))

    # Pieces of the result: ("fresh", lists) read now, or ("prior", k, j) taken over.
    addr_l, phys_l, size_l, next_l = [], [], [], []  # fresh nodes read (record)
    pieces: list[tuple[int, int] | tuple[int, int, int]] = []  # (start, end) fresh block index / (k, j, -1) prior
    fresh_blocks = 0
    count = 0
    cur, prev_end = head, heap_start
    read = physmem.read
    size_of_mem = getattr(physmem, "size", None)
    while cur:
        if count >= max_nodes:
            view.truncated = True
            finding("heap-too-long", cur, f"free list longer than {max_nodes} nodes: stopped")
            break
        if not heap_start <= cur < heap_end:
            finding("heap-pointer-outside", cur, f"free-list pointer {cur:#x} is outside the heap")
            break
        if cur % MIN_BLOCK:
            finding("heap-misaligned", cur, f"free-list node {cur:#x} is not {MIN_BLOCK}-byte aligned")
            break
        if cur < prev_end:
            # Addresses strictly increase along a valid list, so a node below
            # the previous block's end is either a revisit (a cycle) or disorder.
            seen = cur in set(_addresses(pieces, addr_l, reuse))
            if seen:
                finding("heap-cycle", cur, f"free list loops back to {cur:#x}")
            else:
                finding("heap-order", cur, f"free-list node {cur:#x} is below the end of the previous block")
            break
        if reuse is not None:
            k = reuse.pos.get(cur)
            if k is not None and reuse.ok[k]:
                j = min(int(reuse.stop[k]), k + max_nodes - count)
                pieces.append((k, j, -1))
                count += j - k
                p = reuse.prior
                prev_end = int(p.addrs[j - 1]) + int(p.sizes[j - 1])
                cur = int(reuse.prior.record.next[j - 1])
                continue
        phys = translator.translate(cur)
        if phys is None or (size_of_mem is not None and not 0 <= phys <= size_of_mem - NODE.size):
            finding("heap-unmapped", cur, f"free-list node {cur:#x} is not mapped to guest RAM")
            break
        size, nxt = NODE.unpack(read(phys, NODE.size))
        addr_l.append(cur)
        phys_l.append(phys)
        size_l.append(size)
        next_l.append(nxt)
        if size < MIN_BLOCK or cur + size > heap_end:
            finding("heap-bad-size", cur, f"free block at {cur:#x} has size {size:#x}")
            break
        if pieces and len(pieces[-1]) == 2:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + 1)
        else:
            pieces.append((fresh_blocks, fresh_blocks + 1))
        fresh_blocks += 1
        count += 1
        prev_end = cur + size
        cur = nxt

    view.nodes_read = len(addr_l)
    fresh = [np.array(x, dtype=np.uint64) for x in (addr_l, phys_l, size_l, next_l)]
    cols: list[list[np.ndarray]] = [[], [], [], []]  # addr, phys, size, next of the blocks
    for piece in pieces:
        if len(piece) == 2:
            a, b = piece
            src = fresh
        else:
            a, b, _ = piece
            r = reuse.prior.record
            src = [r.addr, r.phys, r.size, r.next]
        for c, arr in zip(cols, src):
            c.append(arr[a:b])
    blocks = [np.concatenate(c) if c else _EMPTY for c in cols]
    # Record: the blocks, then a node read that ended the walk (bad size), if any.
    extra = slice(fresh_blocks, None)
    view.record = HeapRecord(*(np.concatenate([b, f[extra]]) for b, f in zip(blocks, fresh)))
    view.record.prepare(physmem)
    view.addrs, view.sizes = blocks[0], blocks[2]
    return view


def _addresses(pieces, addr_l, reuse):
    for piece in pieces:
        if len(piece) == 2:
            yield from addr_l[piece[0] : piece[1]]
        else:
            yield from reuse.prior.addrs[piece[0] : piece[1]].tolist()


def physmem_contains(physmem, paddr: int, n: int) -> bool:
    size = getattr(physmem, "size", None)
    return size is None or (0 <= paddr and paddr + n <= size)


class RecordedReads:
    """Physical memory that records every read, to check them all later with
    one gather (``prepare`` outside the pause, ``unchanged`` inside it)."""

    def __init__(self, physmem):
        self.physmem = physmem
        self.size = getattr(physmem, "size", None)
        self.base = getattr(physmem, "base", 0)
        self._reads: list[tuple[int, bytes]] = []
        self.words: np.ndarray | None = None
        self.expect: np.ndarray | None = None
        self.odd: list[tuple[int, bytes]] = []
        self._words: tuple[np.ndarray, np.ndarray] | None = None

    def read(self, paddr: int, n: int) -> bytes:
        data = self.physmem.read(paddr, n)
        self._reads.append((paddr, data))
        return data

    def __getattr__(self, name):
        return getattr(self.physmem, name)

    def add_words(self, paddrs: np.ndarray, values: np.ndarray) -> None:
        """Words read by other means (values as read), checked like the reads."""
        self._words = (np.asarray(paddrs, dtype=np.uint64), np.asarray(values, dtype=np.uint64))

    def prepare(self) -> "RecordedReads":
        addrs, expect = [], []
        if self._words is not None:
            addrs.append(self._words[0])
            expect.append(self._words[1])
        for paddr, data in self._reads:
            if paddr % 8 == 0 and len(data) % 8 == 0:
                addrs.append(np.arange(paddr, paddr + len(data), 8, dtype=np.uint64))
                expect.append(np.frombuffer(data, dtype="<u8"))
            else:
                self.odd.append((paddr, data))
        indices = getattr(self.physmem, "u64_indices", None)
        if indices is None:  # reads of a copy (``heap_copy``): never checked again
            self.words = self.expect = None
            return self
        try:
            self.words = indices(np.concatenate(addrs) if addrs else _EMPTY)
            self.expect = np.concatenate(expect) if expect else _EMPTY
        except (ValueError, IndexError):
            self.words = self.expect = None
        return self

    def unchanged(self, physmem) -> bool:
        return self.matches(self.capture(physmem))

    def capture(self, physmem) -> tuple | None:
        """Every recorded read, made again: copies only (for a pause)."""
        if self.words is None:
            return None
        out = _buffer(self.__dict__, "_capture_out", self.words.size)
        return physmem.gather_u64(self.words, out), [physmem.read(p, len(d)) for p, d in self.odd]

    def matches(self, captured: tuple | None) -> bool:
        if captured is None or self.words is None:
            return False
        words, odd = captured
        return bool(np.array_equal(words, self.expect)) and all(a == d for a, (_p, d) in zip(odd, self.odd))
