"""Which guest pages were written since the last look, read from KVM.

``DirtyLog.take()`` gives the runs of guest pages written since its previous
call and re-arms tracking for exactly those pages, with the mechanism
``vmm.vm_builder.enable_dirty_tracking`` switched on for the VM (chosen from
KVM_CHECK_EXTENSION):

- "bitmap": KVM_GET_DIRTY_LOG per writable slot returns the slot's bitmap,
  clears it and write-protects the dirty pages again, in one ioctl;
- "manual" (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): KVM_GET_DIRTY_LOG only
  reads and clears, KVM_CLEAR_DIRTY_LOG then re-protects the pages read.

KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING) is not used: on KVM-PVM every
emulated CPL0 write pushes an entry, so a trivial test that dirtied 11 pages
left about 1,070 entries to harvest (the ring does not deduplicate as the
bitmap does), the harvest cost 250 us, and a longer test would fill the ring
(KVM_EXIT_DIRTY_RING_FULL) however large.

Every mechanism misses writes made by the host through its own mapping of
guest RAM (only KVM's accesses are tracked): whoever writes RAM from the host
accounts for those pages itself (the zygote's mailbox).
"""

from __future__ import annotations

import ctypes as C
import errno

from . import kvm_abi as K
from .kvm import KvmError

PAGE = 4096

# Why pure Python and no numpy here: this runs right after KVM_RUN returns,
# when the host's caches and TLBs are cold (on KVM-PVM a numpy call then
# costs 40-80 us, its first touch of numpy's code and data, against about 2 us
# warm); a few int operations per bitmap and per run touch far less.
#
# Most of a large bitmap is zero (a test writes a few hundred pages of a 1 to
# 64 GiB guest), so there zero stretches are skipped in C:
# bytearray.startswith(zeros, offset) is one memcmp, no copy. A chunk first,
# then each line of a chunk that is not all zero; only lines with a bit set are
# decoded, each as a small bitmap: the 512 KiB bitmap of a 16 GiB slot with
# 266 dirty pages in 5 runs decodes in about 50 us instead of 1.8 ms (warm).
# A small bitmap (up to SKIP_FROM bytes, a 128 MiB slot; the test suite's
# guests have 64 MiB) is decoded at once (bitmap_runs); the chunk and line
# skipping's own first calls cost more there right after KVM_RUN (8-10 us,
# measured alternating in resets). re.finditer over the bitmap was slower
# than a word loop: about 20 ns a byte.
_CHUNK = 32 * 1024  # bytes of bitmap: 256 Ki pages, 1 GiB of guest RAM
_LINE = 256  # bytes: 32 words, 2,048 pages, 8 MiB of guest RAM
SKIP_FROM = 4096  # bytes: bitmaps of slots over 128 MiB skip zeros
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_LINE = bytes(_LINE)
_NONZERO = bytes([0] + [1] * 255)  # bytes.translate table: 0 stays 0, any other byte becomes 1
_FEW_RUNS = 16  # _append_runs: up to this many runs, cut off the int one by one


def bitmap_runs(bitmap: bytearray | bytes, first_page: int, runs: list[tuple[int, int]],
                mask: bytes | None = None, others: list[tuple[int, int]] | None = None) -> int:
    """Append to ``runs`` the runs of set bits of a little-endian bitmap of
    whole u64 words (KVM's dirty bitmap), bit 0 being ``first_page``; a run
    that continues the last one in ``runs`` extends it. With ``mask`` (a
    bitmap of the same length), the bits also set in the
    mask go to ``runs``, the others to ``others``, and a clear bit between
    two set bits of one list may join them (for a reset: see below;
    ``others`` never gets a bit set in the mask). How many bits were set."""
    size = len(bitmap)
    if size % 8 or (mask is not None and len(mask) != size):
        raise ValueError(f"a dirty bitmap (and its mask) is whole u64 words ({size} bytes"
                         + (f", mask {len(mask)})" if mask is not None else ")"))
    if size > SKIP_FROM:
        return _skipping_zeros(bitmap, first_page, runs, mask, others)
    # The span from the first to the last byte with a bit set, found in C (a
    # byte is 1 in ``flags`` where the bitmap's is not zero; find and rfind
    # are memchr), read as one int: the split and the joining below are a
    # few int operations on it, and each run costs a few more, whatever the
    # number of words (a loop over the dirty words took 19 us warm for 7
    # words of a 64 MiB slot, this 11-16; every other frame written, 13 and
    # 8 runs against 4 us and 1 run).
    flags = bitmap.translate(_NONZERO)
    lo = flags.find(1)
    if lo < 0:
        return 0
    lo &= ~7
    hi = flags.rfind(1) + 1
    dirty = int.from_bytes(bitmap[lo:hi], "little")
    pos = first_page + 8 * lo
    if mask is None:
        _append_runs(dirty, pos, runs)
        return dirty.bit_count()
    data = int.from_bytes(mask[lo:hi], "little")
    inside = dirty & data
    outside = dirty ^ inside
    # A reset may also restore a clean page between two written ones (it is
    # the zygote's already), so they join into one run, one copy call: a
    # page copied back (runs) changes nothing, nor does one zeroed (others)
    # if it is zero in the zygote, so never over a page set in the mask.
    # Every other frame written: one run instead of 256.
    inside |= (inside << 1) & (inside >> 1) & ~dirty
    outside |= (outside << 1) & (outside >> 1) & ~(dirty | data)
    _append_runs(inside, pos, runs)
    _append_runs(outside, pos, others)
    return dirty.bit_count()


def _append_runs(bits: int, pos: int, out: list[tuple[int, int]]) -> None:
    """Append the runs of set bits of ``bits`` (bit 0 is page ``pos``) to
    ``out``, extending its last run where one continues it. The runs' edges
    (``bits ^ bits << 1``: a bit where a run starts or ends) are found a
    nonzero byte at a time with translate and find, so the work is one pass
    over the int plus a little per run (shifting the int once per run was
    O(runs x size): 13 ms for 5,334 runs of a 64 MiB slot, 4 ms this way).
    A few runs are cut off the int one by one: fewer steps per run."""
    if not bits:
        return
    edges = bits ^ (bits << 1)
    if edges.bit_count() <= 2 * _FEW_RUNS:
        while bits:
            tz = (bits & -bits).bit_length() - 1
            bits >>= tz
            pos += tz
            ones = (bits ^ (bits + 1)).bit_length() - 1  # trailing ones
            if out and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + ones)
            else:
                out.append((pos, ones))
            bits >>= ones
            pos += ones
        return
    raw = edges.to_bytes((edges.bit_length() + 7) // 8, "little")
    flags = raw.translate(_NONZERO)
    start = -1
    at = flags.find(1)
    while at >= 0:
        byte = raw[at]
        while byte:
            low = byte & -byte
            edge = pos + 8 * at + low.bit_length() - 1
            byte ^= low
            if start < 0:
                start = edge
            elif out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + edge - start)
                start = -1
            else:
                out.append((start, edge - start))
                start = -1
        at = flags.find(1, at + 1)


def _skipping_zeros(bitmap, first_page: int, runs, mask, others) -> int:
    """bitmap_runs of a large bitmap: zero chunks and lines skipped, each
    other line decoded as a small bitmap of its own."""
    size = len(bitmap)
    found = 0
    for chunk in range(0, size, _CHUNK):
        if bitmap.startswith(_ZERO_CHUNK, chunk):
            continue
        for line in range(chunk, min(chunk + _CHUNK, size), _LINE):
            if not bitmap.startswith(_ZERO_LINE, line):
                end = min(line + _LINE, size)
                found += bitmap_runs(bitmap[line:end], first_page + 8 * line, runs,
                                     None if mask is None else mask[line:end], others)
    return found


class DirtyLog:
    """The dirty pages of one VM (made by ``Vm`` on first use)."""

    def __init__(self, vm_fd, slots: list[tuple[int, int, bool]], mechanism: str):
        self.mechanism = mechanism
        self._vm = vm_fd
        self.slots = slots
        # (slot id, first page, pages, bitmap, KVM's view of it,
        # KVM_GET_DIRTY_LOG of it prepared) of every writable slot: KVM
        # writes the bitmap through the ctypes view, bitmap_runs reads the
        # bytearray. The ioctl's argument is built once: built
        # per call, with a layer of ours around the ioctl, a reset's dirty
        # log step took ~20 us more (measured alternating in resets).
        self._logs = []
        for slot, (gpa, size, readonly) in enumerate(slots):
            if readonly:
                continue  # KVM_MEM_READONLY: the guest cannot write it, so there is no log to read
            pages = size // PAGE
            bitmap = bytearray((pages + 63) // 64 * 8)
            for_kvm = (C.c_char * len(bitmap)).from_buffer(bitmap)
            read = vm_fd.prepared(K.KVM_GET_DIRTY_LOG, vm_fd.dirty_log_arg(slot, for_kvm))
            self._logs.append((slot, gpa // PAGE, pages, bitmap, for_kvm, read))
        self._split = None  # (the pages take_split was given, the slots' masks cut from them)

    def close(self) -> None:
        """Drop the bitmaps and the prepared reads."""
        self._split = None
        self._logs = []

    def take(self) -> list[tuple[int, int]]:
        """Runs ``(first page, count)`` of the guest pages written since the
        last call, ascending; the pages are write-protected again, so the
        next call sees new writes."""
        return self._collect(None)[0]

    def take_split(self, pages: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``take()`` in two: the runs of written pages whose bit is set in
        ``pages`` (a bitmap over all of guest RAM, bit p for page p, as
        ``GuestMemory.data_pages`` gives), and the runs of the others."""
        if self._split is None or self._split[0] is not pages:
            every = int.from_bytes(pages, "little")
            masks = []
            for _slot, first, n, bitmap, *_rest in self._logs:
                masks.append(((every >> first) & ((1 << n) - 1)).to_bytes(len(bitmap), "little"))
            self._split = (pages, masks)
        return self._collect(self._split[1])

    def _collect(self, masks) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Read (and, with manual protection, clear) every slot's log; the
        runs of written pages, split by ``masks`` (one per slot) if given."""
        vm, manual = self._vm, self.mechanism == "manual"
        inside: list[tuple[int, int]] = []
        outside: list[tuple[int, int]] = []
        for i, (slot, first, n, bitmap, for_kvm, read) in enumerate(self._logs):
            try:
                read()  # KVM_GET_DIRTY_LOG
            except OSError as exc:
                raise KvmError(exc.errno or errno.EIO, "KVM_GET_DIRTY_LOG") from None
            if bitmap_runs(bitmap, first, inside, None if masks is None else masks[i], outside) and manual:
                vm.clear_dirty_log(slot, 0, n, for_kvm)
        return inside, outside

    def reads(self) -> list:
        """The KVM_GET_DIRTY_LOG of each writable slot, prepared (calls of no
        arguments; the bitmaps land in this log's buffers, undecoded): ``vmm
        bench`` times them alone. A read takes what was dirty, so call them
        only where nothing is pending (right after ``take``, the guest not
        run since)."""
        return [log[5] for log in self._logs]

    def bitmaps(self) -> list[tuple[int, int, bytes]]:
        """``take()`` as ``(first page, pages, little-endian bitmap)`` per
        slot, read-only slots included (all clear)."""
        runs = self.take()
        out = []
        for gpa, size, _ro in self.slots:
            first, count = gpa // PAGE, size // PAGE
            value = 0
            for start, n in runs:
                lo, hi = max(start, first), min(start + n, first + count)
                if lo < hi:
                    value |= ((1 << (hi - lo)) - 1) << (lo - first)
            out.append((first, count, value.to_bytes(((count + 63) // 64) * 8, "little")))
        return out
