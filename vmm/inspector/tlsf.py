"""The guest's TLSF heap (guest/src/memory/tlsf.rs), walked from the host.

The inspect block's ``heap_index`` points at the kernel's heap index
(docs/ABI.md, "Heap index"): which backing allocator runs, the findings the
guest counted itself, and the TLSF control block (first/second-level
bitmaps and the head of every segregated free list). Two walks:

- the *tags*: every block of ``[first, sentinel]`` in address order through
  its 8-byte tag (size, FREE, PREV_FREE, CACHED, a 16-bit check of address
  and size), with the footer of every free block;
- the *lists*: each non-empty list from its head through the ``next``
  links, each member checked against the ``prev`` link, its tag, its list
  (size class) and the tag walk. The *top* block (the free block that ends
  at the sentinel) is on no list: the guest uses it last.

Nothing read is trusted: a broken check (an overflow into a tag), a footer
that disagrees, two free neighbours, a list whose links disagree, a block on
two lists or in a loop (cross-linked), a free block on no list, or a bitmap
that disagrees with the heads gives a finding; reads are bounded
(``max_bytes`` of heap, ``max_blocks`` blocks), so a hostile heap costs a
bounded time. ``physmem.read`` is the only access, so the caller can wrap it
(record what was read, check it later inside a pause).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

import numpy as np

from mm.findings import Finding, Severity

from .heap import HeapView, RecordedReads, RunTranslator, walk_free_list

INDEX_MAGIC = int.from_bytes(b"PYHEAPX1", "little")
INDEX_HEADER = struct.Struct("<QIIIIQIIQ")  # magic version size backing caches findings last_kind reserved last_addr
INDEX_TLSF_OFFSET = 48
TLSF_HEADER = struct.Struct("<QQIIII")  # first sentinel fl_bitmap sl_count fl_count min_block
SL_BITMAP_OFFSET, HEADS_OFFSET = 32, 112
BACKING_TLSF, BACKING_LIST = 1, 2
BACKINGS = {BACKING_TLSF: "tlsf", BACKING_LIST: "list"}
FINDING_KINDS = {1: "double_free", 2: "bad_tag", 3: "overflow", 4: "bad_footer", 5: "cross_linked",
                 6: "not_heap", 7: "size_mismatch"}

FREE, PREV_FREE, CACHED = 1, 2, 4
SIZE_MASK = 0x0000_FFFF_FFFF_FFF0
CHECK_SHIFT = 48
GRAIN, TAG = 16, 8
SL_LOG2, FL_SHIFT = 4, 8
MAX_FL, MAX_SL = 32, 32
M64 = (1 << 64) - 1
PAGE = 4096


def tag_check(addr: int, size: int) -> int:
    """The guest's ``tag_check``: a 16-bit hash of a tag's address and size."""
    rot = ((size << 23) | (size >> 41)) & M64
    return (((addr ^ rot) * 0x9E37_79B9_7F4A_7C15) & M64) >> CHECK_SHIFT


def make_tag(addr: int, size: int, flags: int) -> int:
    return size | flags | (tag_check(addr, size) << CHECK_SHIFT)


def mapping(size: int) -> tuple[int, int]:
    """(first level, second level) of the list a free block of ``size`` bytes sits on."""
    if size < 1 << FL_SHIFT:
        return 0, size // GRAIN
    fl = size.bit_length() - 1
    return fl - FL_SHIFT + 1, (size >> (fl - SL_LOG2)) ^ (1 << SL_LOG2)


@dataclass
class IndexHeader:
    backing: int
    caches: bool
    findings: int
    last_kind: int
    last_addr: int

    @property
    def backing_name(self) -> str:
        return BACKINGS.get(self.backing, f"unknown ({self.backing})")


class VirtReader:
    """Reads guest-virtual ranges page by page through a translator; None if unmapped."""

    def __init__(self, physmem, translator):
        self.physmem = physmem
        self.translator = translator

    def read(self, virt: int, n: int) -> bytes | None:
        out = bytearray()
        size = getattr(self.physmem, "size", None)
        while n > 0:
            chunk = min(n, PAGE - virt % PAGE)
            phys = self.translator.translate(virt)
            if phys is None or phys < 0 or (size is not None and phys + chunk > size):
                return None
            out += self.physmem.read(phys, chunk)
            virt, n = virt + chunk, n - chunk
        return bytes(out)


def read_index_header(reader: VirtReader, index: int) -> IndexHeader | None:
    raw = reader.read(index, INDEX_HEADER.size)
    if raw is None:
        return None
    magic, _version, size, backing, caches, findings, last_kind, _r, last_addr = INDEX_HEADER.unpack(raw)
    if magic != INDEX_MAGIC or size < INDEX_TLSF_OFFSET:
        return None
    return IndexHeader(backing, bool(caches), findings, last_kind, last_addr)


def walk_tlsf(physmem, translator, index: int, heap_start: int, heap_end: int, *,
              max_bytes: int = 64 << 20, max_blocks: int = 1 << 20, view=None,
              span_physmem=None, touched: list | None = None):
    """Walk tags and lists of the TLSF heap whose index is at ``index``; fills and returns a HeapView.

    ``span_physmem`` (default ``physmem``) serves the one read of the whole
    block span; ``touched`` collects (addresses, values) array pairs of every
    word of it the walk used, so a caller that records reads (snapshots) can
    check just those later instead of the whole span (payloads change all the
    time)."""
    view = view or HeapView(heap_start, heap_end, 0)
    view.allocator = "tlsf"
    reader = VirtReader(physmem, translator)

    def finding(kind: str, addr: int | None, detail: str, sev: Severity = Severity.ERROR) -> None:
        view.findings.append(Finding(kind, addr, 0, detail, sev))

    hdr = read_index_header(reader, index)
    if hdr is None:
        finding("heap-index", index, f"no readable heap index at {index:#x}")
        return view
    view.guest_findings = hdr.findings
    if hdr.findings:
        kind = FINDING_KINDS.get(hdr.last_kind, str(hdr.last_kind))
        finding("heap-guest-finding", hdr.last_addr,
                f"the guest's heap refused {hdr.findings} operation(s); last: {kind} at {hdr.last_addr:#x}",
                Severity.WARNING)
    ctl = reader.read(index + INDEX_TLSF_OFFSET, TLSF_HEADER.size)
    if ctl is None:
        finding("heap-index", index, "TLSF control block unreadable")
        return view
    first, sentinel, fl_bitmap, sl_count, fl_count, min_block = TLSF_HEADER.unpack(ctl)
    if not (0 < fl_count <= MAX_FL and sl_count == 1 << SL_LOG2 and min_block >= 2 * GRAIN):
        finding("heap-index", index, f"TLSF geometry fl_count={fl_count} sl_count={sl_count} min_block={min_block} is not sane")
        return view
    lists_raw = reader.read(index + INDEX_TLSF_OFFSET + SL_BITMAP_OFFSET,
                            HEADS_OFFSET - SL_BITMAP_OFFSET + 8 * fl_count * sl_count + 8)
    if lists_raw is None:
        finding("heap-index", index, "TLSF lists unreadable")
        return view
    sl_bitmap = struct.unpack_from(f"<{fl_count}I", lists_raw, 0)
    heads = struct.unpack_from(f"<{fl_count * sl_count}Q", lists_raw, HEADS_OFFSET - SL_BITMAP_OFFSET)
    (top,) = struct.unpack_from("<Q", lists_raw, HEADS_OFFSET - SL_BITMAP_OFFSET + 8 * fl_count * sl_count)
    view.top = top
    if first == 0:
        return view
    if not (heap_start <= first < sentinel < heap_end and first % GRAIN == TAG and sentinel % GRAIN == TAG):
        finding("heap-bad-bounds", first, f"TLSF blocks [{first:#x}, {sentinel:#x}] are not inside the heap "
                                          f"[{heap_start:#x}, {heap_end:#x})")
        return view
    span = sentinel + TAG - first
    if span > max_bytes:
        view.truncated = True
        finding("heap-too-long", first, f"heap of {span} bytes is larger than {max_bytes}: stopped")
        return view
    mem = (VirtReader(span_physmem, translator) if span_physmem is not None else reader).read(first, span)
    if mem is None:
        finding("heap-unmapped", first, f"heap [{first:#x}, {sentinel + TAG:#x}) is not all mapped to guest RAM")
        return view

    # The span as qwords (span and first are 8-aligned): a Python list for
    # the pointer chases, a numpy array for the checks, done on all blocks
    # at once (a fragmented heap has tens of thousands of blocks).
    w = np.frombuffer(mem, dtype="<u8")
    words = w.tolist()
    last = len(words) - 1  # the sentinel's qword
    min_q = min_block >> 3

    # 1. Tags, in address order: chase the sizes, then check every tag.
    chain: list[int] = []
    append = chain.append
    i, n_chain = 0, 0
    while i < last:
        if n_chain >= max_blocks:
            view.truncated = True
            finding("heap-too-long", first + 8 * i, f"more than {max_blocks} blocks: stopped")
            break
        q = (words[i] & SIZE_MASK) >> 3
        append(i)  # a bad size is reported below only if the tag itself is sound
        n_chain += 1
        if q < min_q or i + q > last:
            break
        i += q
    complete = i == last
    idx = np.array(chain, dtype=np.int64)
    tags = w[idx]
    addrs = np.uint64(first) + idx.astype(np.uint64) * np.uint64(8)
    sizes = tags & np.uint64(SIZE_MASK)
    with np.errstate(over="ignore"):
        rot = (sizes << np.uint64(23)) | (sizes >> np.uint64(41))
        checks = ((addrs ^ rot) * np.uint64(0x9E37_79B9_7F4A_7C15)) >> np.uint64(CHECK_SHIFT)
    bad = np.flatnonzero(checks != tags >> np.uint64(CHECK_SHIFT))
    cut = len(chain)
    if bad.size:
        k = int(bad[0])
        b, t = int(addrs[k]), int(tags[k])
        finding("heap-bad-tag", b, f"tag {t:#018x} at {b:#x} fails its check (an overflow from the block below?)")
        cut, complete = k, False
    elif cut and (int(sizes[-1]) < min_block or int(addrs[-1]) + int(sizes[-1]) > sentinel):
        b = int(addrs[-1])
        finding("heap-bad-size", b, f"block at {b:#x} has size {int(sizes[-1]):#x}")
        cut, complete = cut - 1, False
    idx, tags, addrs, sizes = idx[:cut], tags[:cut], addrs[:cut], sizes[:cut]
    is_free = (tags & np.uint64(FREE)) != 0
    prev_flag = (tags & np.uint64(PREV_FREE)) != 0
    below_free = np.concatenate(([False], is_free[:-1])) if cut else is_free
    for k in np.flatnonzero(prev_flag != below_free)[:64]:
        b = int(addrs[k])
        finding("heap-bad-tag", b, f"PREV_FREE of the block at {b:#x} is {bool(prev_flag[k])}, the block below is "
                                   f"{'free' if below_free[k] else 'in use'}")
    for k in np.flatnonzero(is_free & below_free)[:64]:
        b = int(addrs[k])
        finding("heap-uncoalesced", b, f"free blocks at {b:#x} and below it were not merged")
    fidx = np.flatnonzero(is_free)
    f_addr, f_size = addrs[fidx], sizes[fidx]
    footers = w[idx[fidx] + (f_size >> np.uint64(3)).astype(np.int64) - 1]
    for k in np.flatnonzero(footers != f_size)[:64]:
        b, size = int(f_addr[k]), int(f_size[k])
        finding("heap-bad-footer", b + size - 8, f"footer of the free block at {b:#x} is {int(footers[k]):#x}, "
                                                 f"its size {size:#x}")
    at_end = (f_addr + f_size) == np.uint64(sentinel)
    for k in np.flatnonzero(at_end != (f_addr == np.uint64(top)))[:64]:
        b = int(f_addr[k])
        finding("heap-bad-top", b, f"free block at {b:#x} {'ends' if at_end[k] else 'does not end'} at the "
                                   f"sentinel but the top block is {top:#x}")
    used = ~is_free
    view.used_blocks = int(used.sum())
    view.cached_blocks = int(((tags & np.uint64(CACHED)) != 0)[used].sum())
    if complete:
        t = words[last]
        if t & SIZE_MASK or t >> CHECK_SHIFT != tag_check(sentinel, 0):
            finding("heap-bad-tag", sentinel, f"end sentinel at {sentinel:#x} is broken ({t:#018x})")

    # 2. Segregated lists: chase every list, then check the members at once.
    owner = array("H", bytes(2 * len(words)))  # per qword: 1 + list id of the member there
    members: list[int] = []  # qword index of each member
    expect_prev: list[int] = []
    m_fl: list[int] = []
    m_sl: list[int] = []
    m_pos: list[int] = []
    budget = max_blocks
    for fl in range(fl_count):
        if bool(fl_bitmap >> fl & 1) != bool(sl_bitmap[fl]):
            finding("heap-bitmap", index, f"first-level bit {fl} is {fl_bitmap >> fl & 1}, second-level map {sl_bitmap[fl]:#x}")
        for sl in range(sl_count):
            head = heads[fl * sl_count + sl]
            if bool(sl_bitmap[fl] >> sl & 1) != bool(head):
                finding("heap-bitmap", head or index, f"list ({fl}, {sl}): bitmap bit {sl_bitmap[fl] >> sl & 1}, head {head:#x}")
            cur, prev, n = head, 0, 0
            lid = fl * sl_count + sl + 1
            while cur:
                budget -= 1
                if budget < 0:
                    view.truncated = True
                    finding("heap-too-long", cur, f"lists hold more than {max_blocks} blocks: stopped")
                    break
                if not (first <= cur < sentinel and cur % GRAIN == TAG):
                    finding("heap-pointer-outside", cur, f"list ({fl}, {sl}) member {n} at {cur:#x} is outside the heap or misaligned")
                    break
                q = (cur - first) >> 3
                other = owner[q]
                if other:
                    finding("heap-cross-linked", cur, f"list ({fl}, {sl}) member {n} at {cur:#x} is already on list "
                                                      f"{divmod(other - 1, sl_count)} (cross-linked or a loop)")
                    break
                owner[q] = lid
                members.append(q)
                expect_prev.append(prev)
                m_fl.append(fl)
                m_sl.append(sl)
                m_pos.append(n)
                prev, cur, n = cur, words[q + 1], n + 1
            view.lists[f"{fl}.{sl}"] = n
    if members:
        m = np.array(members, dtype=np.int64)
        m_addr = np.uint64(first) + m.astype(np.uint64) * np.uint64(8)
        m_size = w[m] & np.uint64(SIZE_MASK)
        fl_of = np.zeros(m.size, dtype=np.int64)
        sl_of = (m_size >> np.uint64(4)).astype(np.int64)
        big = m_size >= np.uint64(1 << FL_SHIFT)
        if big.any():
            msb = np.floor(np.log2(m_size[big].astype(np.float64))).astype(np.int64)
            fl_of[big] = msb - FL_SHIFT + 1
            sl_of[big] = ((m_size[big] >> (msb - SL_LOG2).astype(np.uint64)) ^ np.uint64(1 << SL_LOG2)).astype(np.int64)
        if complete:  # f_addr is sorted (address order)
            pos = np.minimum(np.searchsorted(f_addr, m_addr), max(f_addr.size - 1, 0))
            listed_free = (f_addr[pos] == m_addr) if f_addr.size else np.zeros(m.size, dtype=bool)
        else:
            listed_free = np.ones(m.size, dtype=bool)
        wrong = (fl_of != np.array(m_fl, dtype=np.int64)) | (sl_of != np.array(m_sl, dtype=np.int64))
        prev_bad = w[m + 2] != np.array(expect_prev, dtype=np.uint64)
        for k in np.flatnonzero(~listed_free | wrong | prev_bad)[:64]:
            fl, sl, n = m_fl[k], m_sl[k], m_pos[k]
            cur = int(m_addr[k])
            where = f"list ({fl}, {sl}) member {n} at {cur:#x}"
            if not listed_free[k]:
                finding("heap-listed-not-free", cur, f"{where} is not a free block in the tag walk")
            elif wrong[k]:
                size = int(m_size[k])
                finding("heap-wrong-list", cur, f"{where} has size {size:#x}, which belongs on list {mapping(size)}")
            if prev_bad[k]:
                finding("heap-cross-linked", cur, f"{where}: prev link {int(w[m[k] + 2]):#x}, expected {expect_prev[k]:#x}")
    if top and complete and not (f_addr == np.uint64(top)).any():
        finding("heap-bad-top", top, f"top block {top:#x} is not a free block in the tag walk")
    if budget >= 0:
        own = np.frombuffer(owner, dtype=np.uint16)
        for k in np.flatnonzero((own[idx[fidx]] == 0) & (f_addr != np.uint64(top)))[:64]:
            addr, size = int(f_addr[k]), int(f_size[k])
            finding("heap-unlisted", addr, f"free block at {addr:#x} ({size:#x} bytes) is on no list")
    view.blocks = list(zip(f_addr.tolist(), f_size.tolist()))  # address order
    if touched is not None:
        # Every word the verdicts above rest on: the chased tags, the free
        # blocks' footers, the list members' links, the sentinel.
        q = [idx, idx[fidx] + (f_size >> np.uint64(3)).astype(np.int64) - 1]
        if members:
            q += [m + 1, m + 2]
        if complete:
            q.append(np.array([last], dtype=np.int64))
        q = np.concatenate(q)
        touched.append((np.uint64(first) + q.astype(np.uint64) * np.uint64(8), w[q].astype(np.uint64)))
    return view


def walk_heap_any(physmem, translator: RunTranslator, heap_start: int, heap_end: int, head: int,
                  index: int | None, *, prior: HeapView | None = None) -> HeapView:
    """The walk the guest's heap index asks for: TLSF, or the first-fit list.

    Every read is recorded so that ``HeapView.unchanged`` can tell, inside a
    pause, whether the walk still holds; a list walk can reuse ``prior``."""
    if index:
        reads = RecordedReads(physmem)
        hdr = read_index_header(VirtReader(reads, translator), index)
        if hdr is not None and hdr.backing == BACKING_TLSF:
            # The block span is read in one piece, but only the words the walk
            # used (tags, footers, links) say anything: record just those.
            touched: list[tuple[np.ndarray, np.ndarray]] = []
            view = walk_tlsf(reads, translator, index, heap_start, heap_end, span_physmem=physmem, touched=touched)
            if touched:
                virt = np.concatenate([a for a, _ in touched])
                vals = np.concatenate([v for _, v in touched])
                reads.add_words(translator.translate_many(virt), vals)
            view.reads = reads.prepare()
            return view
        view = walk_free_list(physmem, translator, head, heap_start, heap_end, prior=prior)
        view.reads = reads.prepare()
        if hdr is None:
            view.findings.append(Finding("heap-index", index, 0, f"no readable heap index at {index:#x}", Severity.ERROR))
        elif hdr.findings:
            view.guest_findings = hdr.findings
        return view
    return walk_free_list(physmem, translator, head, heap_start, heap_end, prior=prior)
