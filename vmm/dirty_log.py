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

from . import kvm_abi as K

PAGE = 4096

# Why pure Python and no numpy here: this runs right after KVM_RUN returns,
# when the host's caches and TLBs are cold (on KVM-PVM a numpy call then
# costs 40-80 us, its first touch of numpy's code and data, against about 2 us
# warm); a few small-int operations per dirty word touch far less.


def bitmap_runs(words, first_page: int, runs: list[tuple[int, int]]) -> int:
    """Append to ``runs`` the runs of set bits of a bitmap given as u64 words
    (``memoryview.cast("Q")``), bit 0 of word 0 being ``first_page``; a run
    that continues the last one in ``runs`` extends it. How many bits were set."""
    found = 0
    for i, word in enumerate(words):
        if not word:
            continue
        pos = first_page + 64 * i
        while word:
            tz = (word & -word).bit_length() - 1
            word >>= tz
            pos += tz
            ones = (word ^ (word + 1)).bit_length() - 1  # trailing ones
            if runs and runs[-1][0] + runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], runs[-1][1] + ones)
            else:
                runs.append((pos, ones))
            word >>= ones
            pos += ones
            found += ones
    return found


class DirtyLog:
    """The dirty pages of one VM (made by ``Vm`` on first use)."""

    def __init__(self, vm_fd, slots: list[tuple[int, int, bool]], mechanism: str):
        self.mechanism = mechanism
        self._vm = vm_fd
        self.slots = slots
        # (slot id, first page, pages, bitmap buffer, its words) of every writable slot.
        self._logs = []
        for slot, (gpa, size, readonly) in enumerate(slots):
            if readonly:
                continue  # nothing writes a read-only slot
            pages = size // PAGE
            bitmap = (C.c_uint64 * ((pages + 63) // 64))()
            self._logs.append((slot, gpa // PAGE, pages, bitmap, memoryview(bitmap).cast("B").cast("Q")))

    def close(self) -> None:
        """Drop the views of the bitmaps."""
        for log in self._logs:
            log[4].release()
        self._logs = []

    def take(self) -> list[tuple[int, int]]:
        """Runs ``(first page, count)`` of the guest pages written since the
        last call, ascending; the pages are write-protected again, so the
        next call sees new writes."""
        vm, manual = self._vm, self.mechanism == "manual"
        runs: list[tuple[int, int]] = []
        for slot, first, pages, bitmap, words in self._logs:
            vm.get_dirty_log(slot, bitmap)
            if bitmap_runs(words, first, runs) and manual:
                vm.clear_dirty_log(slot, 0, pages, bitmap)
        return runs

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
