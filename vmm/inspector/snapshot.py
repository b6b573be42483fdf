"""One consistent look at a guest: page tables, frame bitmap, heap free list.

The guest keeps running while the host reads (the vCPU is held only to
copy what must be seen at one instant): ``Snapshotter.take``

1. walks the tables from the last known CR3 (``mm.walker.walk_traced``:
   every table it decodes, where it sits in the tree and what it read
   there; the previous snapshot's walk, brought up to date, where CR3 is
   unchanged), and walks the heap free list, recording every node it reads
   (reusing the unchanged stretches of the previous walk), while the guest
   runs; then reads those words again a moment later and walks again until
   they hold still (a heap being built changes faster than any hold could
   check it), for at most ``QUIET_WAIT_S``. A small heap (``WHOLE_PAGES``)
   is not walked now: the hold copies it whole (``heap_copy``), and so it
   does a larger one (``COPY_PAGES``) that never held still. A guest seen
   inside a long critical section is left to finish it first;
2. holds the guest once, only to copy (``capture``: the control
   registers, the inspect block, every traced table in one gather and the
   tables newly reached below entries that changed, the heap's pages or
   the words the heap walk read, the frame bitmaps; only the first two if
   the block says the guest is inside a critical section). A local guest is held on its own vCPU
   thread (``Vm.visit``): kicked out of KVM_RUN, it copies and goes
   straight back, with no other thread's wake-up inside the hold. Then,
   with the guest running again, it checks the copies: same CR3 and
   EFER.NXE, the block not mid-update (even ``seq``), the heap's bounds
   and head as walked, every heap word unchanged; and brings the walk up
   to date on the copied tables (``mm.rewalk.refresh``: a guest that maps
   and unmaps all the time changes a few leaf tables between any read and
   any check, and throwing the walk away would never converge); a heap
   copied whole is walked on its copy, once its pages are known to be
   where those tables map them. The hold costs copies, not comparisons or
   walks;
3. if the guest was held inside a critical section (odd ``seq``), the
   visit lets it run to the section's end first (an instruction breakpoint
   on the kernel's quiet hook) and copies there; a remote server does the
   same for a "quiet" pause. Still busy, it looks again a moment later
   without reading anything again (what was read may well still hold); if
   the heap changed (or the tables in a way the copy cannot settle: a new
   CR3, more new tables than it follows), it starts over from 1 (the heap
   walk then rereads only what changed), at most ``attempts`` times. Every
   hold is short; ``held_ms`` adds them up per snapshot;
4. after that, holds the guest for as long as a complete read takes
   (``method == "stopped"``), after waiting for it to leave any critical
   section; a guest that never does gives a snapshot marked ``busy``.

Everything else (labels, filters, audits, diffs) works on the snapshot
afterwards, without holding the guest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import time
import weakref
from dataclasses import dataclass

import numpy as np

from mm.addr import PageSize
from mm.findings import Finding, WalkReport
from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from mm.errors import NotCopied
from mm.physmem import BufferMemory
from mm.flags import ADDR_MASK, PteFlags
from mm.rewalk import Refreshed, TableCopier, refresh, spans_touch
from mm.walker import Run, RunArrays, WalkTrace, walk_arrays, walk_traced

from ..cpu import EFER_NXE
from .facts import GuestFacts
from .heap import HeapView, RunTranslator, physmem_contains, prepare_capture
from .capture import Capture, bitmap_span, block_span, capture
from .heap_copy import COPY_PAGES, WHOLE_PAGES, HeapCopier
from .inspect_block import (SEQ_OFFSET, InspectBlock, InspectBlockError, parked_busy, parse_inspect_block,
                            read_inspect_block)
from .labels import Labeler
from .target import ControlRegisters, Target
from .tlsf import walk_heap_any

#: Optimistic passes invalidated by guest changes before falling back.
MAX_ATTEMPTS = 6
#: A heap that changes between a walk and its hold costs a hold for nothing
#: (a fragmented heap being built changes on every allocation: every hold
#: found it changed again). So a hold waits until the heap looks quiet,
#: checked while the guest runs: walked, then its words unchanged
#: ``QUIET_GAP_S`` later. After ``QUIET_WAIT_S`` of that (in all, per
#: snapshot), a heap of at most ``COPY_PAGES`` is copied whole in the hold
#: (``heap_copy``: one moment, whatever the guest does), a larger one is
#: checked anyway.
QUIET_WAIT_S = 1.0
QUIET_GAP_S = 0.003
#: A guest seen (while it runs) inside one critical section is not held
#: until that section ends, for at most this long: a long section (the heap
#: growing page by page, tens of ms of emulated code here) would otherwise
#: cost a hold that runs on to its end for ``QUIET_TIMEOUT_S`` in vain.
SECTION_WAIT_S = 0.25
#: Parks that find the guest inside a critical section before falling back
#: (each is short: park, read the block's seq, resume).
BUSY_PARKS = 40

#: How a snapshot got consistent.
VALIDATED = "validated"  # read while the guest ran, checked unchanged in a short pause
STOPPED = "stopped"  # read with the guest held for as long as the reads took
NOT_RUNNING = "not running"  # the guest was not running: nothing to pause


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # time.time()
    registers: ControlRegisters
    runs: RunArrays
    walk_findings: list[Finding]
    table_frames: dict  # level -> array of table frame addresses
    tables_visited: int
    pause_ms: float  # the guest held by the last hold (local: its exit to its re-entry, on the vCPU thread)
    walk_ms: float  # reads done while it was held (copies; a complete read when ``method`` is stopped)
    facts: GuestFacts  # with the live inspect block read in the pause
    parked: bool = True
    method: str = VALIDATED
    #: Parks this snapshot took (the last one is ``pause_ms``); ``held_ms``
    #: is their total (each one cost the guest its length).
    attempts: int = 1
    held_ms: float = 0.0
    #: Parked inside a guest critical section even after waiting: heap and
    #: bitmap may be mid-update (their cross-checks are skipped).
    busy: bool = False
    #: A remote pause ran out before the reads ended (``parked`` is then False).
    pause_expired: bool = False
    bitmap_raw: bytes | None = None  # used then managed bitmap, as of the pause
    heap: HeapView | None = None
    #: The last hold as its requester saw it: kick, hold, answer (running on
    #: to the end of a critical section excluded). ``pause_ms`` is the guest's
    #: side of it: for a local guest, from its exit to its re-entry.
    round_trip_ms: float = 0.0
    #: ``pause_ms`` on the CPU: the vCPU thread's CPU time in the hold (None:
    #: not known, a remote pause). On a loaded host the difference is time
    #: the scheduler gave other processes, during which the guest could not
    #: have run either.
    pause_cpu_ms: float | None = None
    #: What the last hold's copies cost, by ``capture.PHASES`` (ms; empty: a complete read).
    copy_phases_ms: tuple[float, ...] = ()
    #: The heap was copied whole in the hold and walked on the copy (``heap_copy``).
    heap_copied: bool = False
    #: ``held_ms`` on the CPU: the holding thread's CPU time in all the holds
    #: (None: not known, a remote pause), robust to a loaded host's preemptions.
    held_cpu_ms: float | None = None

    @property
    def block(self) -> InspectBlock | None:
        return self.facts.block

    def iter_runs(self):
        return self.runs.runs()

    @property
    def page_table_frames(self) -> np.ndarray:
        frames = [np.asarray(v, dtype=np.uint64) for v in self.table_frames.values()]
        return np.unique(np.concatenate(frames)) if frames else np.zeros(0, dtype=np.uint64)


_warm = False


def _warm_up(physmem) -> None:
    """The first walk and the first refresh in a process pay numpy's one-time
    costs (~8 ms and ~2 ms): pay them on dummies before any pause, not while
    the guest is held."""
    global _warm
    if not _warm:
        walk_arrays(physmem, 0, max_tables=4)
        _warm_refresh()
        _warm = True


def _warm_refresh() -> None:
    """Both of ``refresh``'s paths on a tiny tree in a scratch buffer: a page
    unmapped (patched), then a mapping in a new top-level slot (re-walked)."""
    mem = BufferMemory(bytearray(1 << 20))
    tables = Mapper.new(mem, BumpFrameAllocator(0x1_0000, 1 << 20))
    flags = PteFlags.PRESENT | PteFlags.WRITABLE | PteFlags.NO_EXECUTE
    tables.map_range(0xFFFF_8000_0000_0000, 0x1000, 0x4000, flags, PageSize.SIZE_4K)
    report = WalkReport()
    runs, trace = walk_traced(mem, tables.root, report=report)
    tables.unmap(0xFFFF_8000_0000_1000)
    fixed = refresh(mem, runs, trace, report)
    tables.map(0x4000_0000, 0x2000, PageSize.SIZE_4K, flags)
    if fixed is not None:
        refresh(mem, fixed.runs, fixed.trace, fixed.report)


@dataclass
class _Tally:
    """Parks of one snapshot: how many, how many found the guest busy, how long
    in all, and on the holding thread's CPU (None once a hold's is not known)."""

    parks: int = 0
    busy: int = 0
    held_ns: int = 0
    cpu_ns: int | None = 0

    def park(self, ns: int, busy: bool, cpu_ns: int | None = None) -> None:
        self.parks += 1
        self.busy += busy
        self.held_ns += ns
        self.cpu_ns = None if self.cpu_ns is None or cpu_ns is None else self.cpu_ns + cpu_ns


@dataclass
class _Walked:
    """What one optimistic pass read while the guest ran."""

    cr3: int
    nxe: bool
    trace: WalkTrace  # every table the walk decoded, as it read them
    report: WalkReport
    runs: RunArrays
    heap: HeapView | None
    #: The runs the heap walk translated its addresses through (``runs`` may be newer).
    heap_runs: RunArrays | None = None
    #: Linear spans where ``runs`` differs from ``heap_runs`` (None: not known).
    touched: tuple[tuple[int, int], ...] | None = ()
    block: InspectBlock | None = None  # the inspect block as read with the walk
    #: A small heap is not walked while the guest runs: copied whole in the
    #: hold instead, and walked on the copy (``heap`` is then None).
    heap_copy: HeapCopier | None = None


class Snapshotter:
    """Takes snapshots of one target; remembers CR3, EFER.NXE and the last heap
    walk between them (the next optimistic pass starts from those)."""

    def __init__(self, target: Target, *, attempts: int = MAX_ATTEMPTS, whole_pages: int = WHOLE_PAGES,
                 copy_pages: int = COPY_PAGES):
        # ``attempts``: optimistic passes invalidated by changes before the
        # guest is held for a complete read. A heap of at most
        # ``whole_pages`` pages is always copied whole in the hold; one of at
        # most ``copy_pages`` when it does not hold still (0: never).
        self.target = target
        self.attempts = max(1, attempts)
        self.whole_pages, self.copy_pages = whole_pages, max(copy_pages, whole_pages)
        self._buffers: dict = {}  # what heap copies go into, kept from one snapshot to the next
        self.quiet_waits = 0  # passes read again because the heap changed while the guest ran (all snapshots)
        self._cr3: int | None = None
        self._nxe = True
        self._heap: HeapView | None = None
        self._walked: _Walked | None = None  # the last snapshot's tables (the next pass refreshes them)

    def take(self, facts: GuestFacts | None = None, *, max_tables: int = 1 << 16) -> Snapshot:
        facts = facts or self.target.facts()
        _warm_up(self.target.physmem)
        if self._cr3 is None:
            # Known before any hold, the first pass reads the tables while the
            # guest runs; unknown, the first hold only learns CR3 and a second
            # one copies.
            hint = getattr(self.target, "cr3_hint", None)
            cr3 = facts.report.cr3 if facts.report.cr3 is not None else hint() if hint is not None else None
            if cr3 is not None:
                self._cr3 = cr3 & ADDR_MASK
        tally = _Tally()
        walked, changed, whole = None, 0, False
        block_at = block_span(facts, self.target.physmem)
        quiet_by = time.monotonic() + QUIET_WAIT_S  # all of this snapshot's waits for a quiet heap
        while changed < self.attempts and tally.busy < BUSY_PARKS:
            if _after_section(self.target.physmem, block_at):
                walked = None  # it ended a long section: what was read is likely stale
            if walked is None:
                # The last pass before a complete read copies a small heap whole.
                whole = whole or changed == self.attempts - 1
                walked, quiet = (None, False) if whole else self._when_quiet(facts, max_tables, quiet_by)
                if not quiet:
                    whole = True
                    walked = self._read_running(facts, max_tables, whole=True)
            status, snap = self._validate(facts, walked, max_tables, tally)
            if snap is not None:
                return snap
            if status == "busy":
                # Parked inside a critical section (and it did not end in
                # time): what was read may still be valid once it ends. Look
                # again a little later (jittered so a periodic guest cannot
                # dodge us); no new pass unless it changed.
                time.sleep(random.uniform(0.0003, 0.0015))
            else:
                changed += 1
                if walked is not None:
                    self._walked = walked  # the next pass refreshes what this one read
                walked = None
                time.sleep(0.0002 * changed)
        return self._take_stopped(facts, max_tables, tally)

    def _when_quiet(self, facts: GuestFacts, max_tables: int, deadline: float) -> tuple[_Walked | None, bool]:
        """A pass made once the heap looks quiet (see ``QUIET_WAIT_S``), and
        whether it did before ``deadline`` (``time.monotonic``)."""
        physmem = self.target.physmem
        while time.monotonic() < deadline:
            walked = self._read_running(facts, max_tables)
            if walked is None or walked.heap is None:  # (a small heap is copied whole: nothing to check)
                return walked, True
            time.sleep(QUIET_GAP_S)
            block = read_block(physmem, facts)
            live = facts.with_block(block) if block is not None else facts
            if (block is None or not block.busy) and _heap_matches(walked.heap, walked.heap.capture(physmem), live):
                return walked, True
            self._walked = walked  # the next pass refreshes these tables
            self.quiet_waits += 1
        return None, False

    # -- 1. while the guest runs ----------------------------------------------------
    def _read_running(self, facts: GuestFacts, max_tables: int, *, whole: bool = False) -> _Walked | None:
        """``whole``: copy the heap whole in the hold if it is small enough,
        instead of walking it now."""
        if self._cr3 is None:
            return None  # learn CR3 in the first pause
        physmem = self.target.physmem
        try:
            tables = self._tables(physmem, self._walked, self._cr3, self._nxe, facts, max_tables)
        except Exception:  # a torn read of a table being rewritten: try again
            return None
        if tables is None:
            return None
        runs, report, trace, _ = tables
        block = read_block(physmem, facts)
        read_as = facts.with_block(block) if block else facts
        copier = self._heap_copier(physmem, runs, read_as, self.copy_pages if whole else self.whole_pages)
        heap = None
        if copier is None:
            heap = self._heap_unchanged(physmem, runs, read_as) or walk_heap(physmem, runs, read_as, prior=self._heap)
            if heap is not None:
                self._heap = heap
        walked = _Walked(self._cr3, self._nxe, trace, report, runs, heap, runs, block=block, heap_copy=copier)
        # Catch up with what the guest changed during the heap walk (a few
        # tables at most), so that the check after the pause finds little
        # to patch. A heap copied whole was not walked: nothing to catch up
        # with (a refresh costs the watcher ~0.5 ms, which a host without an
        # idle core takes from the guest).
        if heap is not None:
            self._catch_up(physmem, walked, facts, max_tables)
        return walked

    def _heap_unchanged(self, physmem, runs: RunArrays, facts: GuestFacts) -> HeapView | None:
        """The last snapshot's heap walk, if every word it read still holds
        and its pages are mapped as they were: one gather instead of a walk
        (tens of ms of Python for a 16,384-block list, at every refresh)."""
        prior, last = self._heap, self._walked
        if prior is None or last is None or last.heap is not prior or last.heap_runs is None:
            return None
        if not _heap_matches(prior, prior.capture(physmem), facts):
            return None
        return prior if same_translation(last.heap_runs, runs, prior.heap_start, prior.heap_end) else None

    def _heap_copier(self, physmem, runs: RunArrays, facts: GuestFacts, max_pages: int) -> HeapCopier | None:
        """A copier for the heap the facts place, if it has at most
        ``max_pages`` pages (``heap_copy``)."""
        bounds, head = facts.heap, facts.heap_free_head
        if not max_pages or bounds is None or head is None:
            return None
        index = facts.block.heap_index if facts.block is not None else None
        return HeapCopier.plan(physmem, runs, *bounds, index, self._buffers, max_pages=max_pages)

    def _catch_up(self, physmem, walked: "_Walked | None", facts: GuestFacts, max_tables: int) -> None:
        """While the guest runs: bring ``walked``'s tables up to date."""
        if walked is None:
            return
        try:
            again = self._tables(physmem, walked, walked.cr3, walked.nxe, facts, max_tables)
        except Exception:  # a torn read: the check after the pause decides
            return
        if again is not None:
            walked.runs, walked.report, walked.trace, walked.touched = again

    @staticmethod
    def _tables(physmem, walked: "_Walked | None", cr3: int, nxe: bool, facts: GuestFacts,
                max_tables: int) -> tuple[RunArrays, WalkReport, WalkTrace, tuple | None] | None:
        """The tables at ``cr3`` as they are now: ``walked`` brought up to date
        (only the subtrees under changed tables re-read) where it can be,
        else a full traced walk; last, the linear spans that changed from
        ``walked`` (None: all of them may have)."""
        if walked is not None and walked.cr3 == cr3 and walked.nxe == nxe:
            fixed = refresh(physmem, walked.runs, walked.trace, walked.report, max_tables=max_tables, nxe=nxe,
                            **_cpu(facts))
            if fixed is not None:
                touched = None if walked.touched is None else walked.touched + fixed.spans
                return fixed.runs, fixed.report, fixed.trace, touched
        report = WalkReport()
        runs, trace = walk_traced(physmem, cr3, report=report, max_tables=max_tables, nxe=nxe, **_cpu(facts))
        return runs, report, trace, None

    def _pause(self):
        """The target's pause; a remote one "quiet" (its server runs a guest
        parked inside a critical section to the section's end first: local
        targets do that in their visit, with ``run_on``)."""
        if getattr(self.target, "quiet_pause", False):
            return self.target.paused(quiet=True)
        return self.target.paused()

    def _hold(self, fn, run_on=None, *, short: bool = False) -> "_Held":
        """Hold the guest once and call ``fn`` meanwhile: on the vCPU thread
        itself where the target can (``visit``: local guests; ``run_on``
        may let it run to the end of a critical section first), else inside
        the target's pause. Not running: ``fn`` is not called."""
        visit = getattr(self.target, "visit", None)
        with _no_gc():
            t0 = time.perf_counter_ns()
            if visit is not None:
                v = visit(fn, run_on, short=short)
                rt = time.perf_counter_ns() - t0
                if v is None:
                    return _Held(False, None, 0, rt)
                return _Held(True, v.value, v.held_ns, rt - v.ran_ns, stops=v.stops, cpu_ns=v.cpu_ns)
            with self._pause() as parked:
                t0 += _ran_ns(parked)  # a remote guest's run to its quiet point is not held
                value = fn() if parked else None
            t3 = time.perf_counter_ns()
        return _Held(bool(parked), value, t3 - t0, t3 - t0, expired=_expired(parked))

    # -- 2. one short hold: copy; then check and patch on the copies ------------------
    def _validate(self, facts: GuestFacts, walked: _Walked | None, max_tables: int,
                  tally: "_Tally") -> tuple[str, Snapshot | None]:
        """("ok", snapshot), or ("busy" | "changed", None)."""
        physmem = self.target.physmem
        block_at = block_span(facts, physmem)
        hook = facts.report.quiet_hook
        read_as = facts.with_block(walked.block) if walked is not None and walked.block is not None else facts
        bitmap_at = bitmap_span(read_as)
        tables = TableCopier(physmem, walked.trace) if walked is not None else None
        heap = walked.heap if walked is not None else None
        copier = walked.heap_copy if walked is not None else None
        if heap is not None:
            prepare_capture(heap)
        # The same copies once now, thrown away: they bring what the hold
        # reads into the shared cache (guest RAM read cold costs ~3 us a
        # table here), touch the buffers they fill and run each code path
        # once before it counts.
        _warm_copies(physmem, tables, heap, copier)

        def copy() -> Capture:
            return capture(self.target, physmem, block_at=block_at, tables=tables, heap=heap, bitmap_at=bitmap_at,
                           heap_pages=copier)

        def run_on() -> int | None:
            # vCPU thread, first stop: inside a critical section (odd seq),
            # let the guest run to its end (the kernel's quiet hook) and copy there.
            return hook if parked_busy(physmem, block_at) else None

        held = self._hold(copy, run_on if hook and block_at is not None else None, short=True)
        if not held.parked and getattr(self.target, "running", False):
            return "changed", None  # running, yet not held in time (a stuck loop): never read it as stopped
        if not held.parked:  # not running: every read is consistent as it is
            return "ok", self._read_all(facts, max_tables)(tally, held, parked=False, method=NOT_RUNNING)
        cap: Capture = held.value
        block = _parse_block(cap.block, block_at)
        busy = block is not None and block.busy
        tally.park(held.held_ns, busy, held.cpu_ns)
        regs, nxe = cap.regs, bool(cap.regs.efer & EFER_NXE)
        self._cr3, self._nxe = regs.root, nxe
        if held.expired:  # a remote pause ran out mid-copy: the guest moved, read again
            return "changed", None
        live = facts.with_block(block) if block is not None else facts
        ok = (
            not busy
            and walked is not None
            and regs.root == walked.cr3
            and nxe == walked.nxe
            and bitmap_span(live) == cap.bitmap_at
        )
        if ok:
            ok = _heap_covered(copier, live) if copier is not None else _heap_matches(walked.heap, cap.heap, live)
        if ok:
            # The tables as of the hold: the walk, patched (or re-walked below
            # what changed) on the copy, with the guest running again.
            try:
                fixed = refresh(cap.tables, walked.runs, walked.trace, walked.report, max_tables=max_tables,
                                nxe=nxe, **_cpu(facts))
            except NotCopied:  # it built more tables than the copy followed
                fixed = None
            ok = fixed is not None and _heap_still_mapped(walked, fixed)
        heap, heap_runs = walked.heap if walked is not None else None, walked.heap_runs if walked is not None else None
        if ok and copier is not None:
            # The heap as copied in the hold, walked now: its pages must be
            # where the tables (as copied in the same hold) map them.
            heap = _walk_copy(copier, cap.heap_pages, fixed.runs, live, prior=self._heap)
            ok, heap_runs = heap is not None, fixed.runs
            if ok:
                self._heap = heap
        if not ok:
            return ("busy" if busy else "changed"), None
        self._walked = _Walked(walked.cr3, nxe, fixed.trace, fixed.report, fixed.runs, heap, heap_runs, block=block)
        snap = _snapshot(regs, fixed.runs, fixed.report, live, cap.bitmap, heap, tally, held, cap.copy_ns,
                         parked=True, method=VALIDATED, busy=False)
        return "ok", dataclasses.replace(snap, copy_phases_ms=tuple(ns / 1e6 for ns in cap.phases_ns),
                                         heap_copied=copier is not None)

    # -- 4. the guest held -----------------------------------------------------------------
    def _take_stopped(self, facts: GuestFacts, max_tables: int, tally: "_Tally") -> Snapshot:
        physmem = self.target.physmem
        block_at = block_span(facts, physmem)
        hook = facts.report.quiet_hook

        def run_on() -> int | None:
            return hook if parked_busy(physmem, block_at) else None

        for k in range(BUSY_PARKS):
            last = k == BUSY_PARKS - 1

            def read_all():
                # Inside a critical section (after running on to its end, where
                # that works): let it finish, unless this is the last try.
                return None if not last and parked_busy(physmem, block_at) else self._read_all(facts, max_tables)

            held = self._hold(read_all, run_on if hook and block_at is not None else None)
            if not held.parked and getattr(self.target, "running", False) and not last:
                tally.park(0, True, 0)  # running, yet not held in time: try again
                continue
            if not held.parked:
                # Not running; or, on the last try, running yet never held in
                # time: then read anyway, and the snapshot says it was not held.
                method = STOPPED if getattr(self.target, "running", False) else NOT_RUNNING
                return self._read_all(facts, max_tables)(tally, held, parked=False, method=method)
            if held.value is not None:
                # A remote pause that ran out let the guest go mid-read: the
                # snapshot says it was not parked (its reads may be torn).
                return held.value(tally, held, parked=not held.expired, method=STOPPED, expired=held.expired)
            tally.park(held.held_ns, True, held.cpu_ns)
            time.sleep(random.uniform(0.0003, 0.0015))
        raise AssertionError("unreachable: the last hold always reads")

    def _read_all(self, facts: GuestFacts, max_tables: int):
        """Every read with the guest not running (held, or stopped anyway);
        returns a function that makes the snapshot once the hold is over."""
        t1 = time.perf_counter_ns()
        physmem = self.target.physmem
        regs = self.target.control_registers()
        nxe = bool(regs.efer & EFER_NXE)
        report = WalkReport()
        runs, trace = walk_traced(physmem, regs.root, report=report, max_tables=max_tables, nxe=nxe, **_cpu(facts))
        block = read_block(physmem, facts)
        live = facts.with_block(block) if block is not None else facts
        bitmap = read_bitmaps(physmem, live)
        heap = walk_heap(physmem, runs, live, prior=self._heap)
        work_ns = time.perf_counter_ns() - t1
        self._cr3, self._nxe = regs.root, nxe
        self._walked = _Walked(regs.root, nxe, trace, report, runs, heap, runs, block=block)
        if heap is not None:
            self._heap = heap

        def finish(tally: _Tally, held: "_Held", *, parked: bool, method: str, expired: bool = False) -> Snapshot:
            busy = bool(parked and block is not None and block.busy)
            if parked or expired:
                tally.park(held.held_ns, busy, held.cpu_ns)
            return _snapshot(regs, runs, report, live, bitmap, heap, tally, held, work_ns, parked=parked,
                             method=method, busy=busy, expired=expired)

        return finish


@dataclass
class _Held:
    """One hold of the guest: was it parked, ``fn``'s value, how long it was
    held (exit to re-entry where the vCPU thread measures it), and the
    whole request (kick, hold, answer), running on excluded."""

    parked: bool
    value: object
    held_ns: int
    round_trip_ns: int
    expired: bool = False
    stops: int = 1
    cpu_ns: int | None = None  # the holding thread's CPU time (vCPU thread: visits only)


def _warm_copies(physmem, tables: TableCopier | None, heap: HeapView | None, copier: HeapCopier | None) -> None:
    try:
        if tables is not None:
            tables.copy()
        if heap is not None:
            heap.capture(physmem)
        if copier is not None:
            copier.warm()
    except Exception:  # a torn read of a table being rewritten: the hold copies again
        pass


def _parse_block(data: bytes | None, paddr: int | None) -> InspectBlock | None:
    if data is None or paddr is None:
        return None
    try:
        return parse_inspect_block(data, paddr)
    except (InspectBlockError, ValueError):
        return None


def _snapshot(regs, runs, report, facts, bitmap, heap, tally, held, work_ns, *, parked, method, busy,
              expired=False) -> Snapshot:
    return Snapshot(
        taken_at=time.time(),
        registers=regs,
        runs=runs,
        walk_findings=list(report.findings),
        table_frames=dict(report.tables),
        tables_visited=report.tables_visited,
        pause_ms=held.held_ns / 1e6 if parked else 0.0,
        walk_ms=work_ns / 1e6,
        facts=facts,
        parked=parked,
        method=method,
        attempts=max(1, tally.parks),
        held_ms=tally.held_ns / 1e6,
        held_cpu_ms=tally.cpu_ns / 1e6 if parked and tally.cpu_ns is not None else None,
        busy=busy,
        pause_expired=expired,
        bitmap_raw=bitmap,
        heap=heap,
        round_trip_ms=held.round_trip_ns / 1e6 if parked else 0.0,
        pause_cpu_ms=held.cpu_ns / 1e6 if parked and held.cpu_ns is not None else None,
    )


@contextlib.contextmanager
def _no_gc():
    """No garbage collection while the guest is held: a full collection of a
    process holding many small objects takes milliseconds (it runs after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ran_ns(pause) -> int:
    """How long a quiet remote pause let the guest run before parking it (ns)."""
    return int(getattr(pause, "ran_ms", 0.0) * 1e6)


def _expired(pause) -> bool:
    """Did the target's pause run out before the block ended (``target.Pause``)?"""
    return bool(getattr(pause, "expired", False))


def _heap_matches(heap: HeapView | None, captured: tuple | None, facts: GuestFacts) -> bool:
    """The optimistic heap walk still describes the heap the block describes,
    word for word as copied in the hold."""
    bounds, head = facts.heap, facts.heap_free_head
    if heap is None:
        return bounds is None or head is None
    if bounds is None or (heap.heap_start, heap.heap_end, heap.head) != (*bounds, head):
        return False
    return heap.matches(captured)


def _after_section(physmem, block_at: int | None) -> bool:
    """Guest running: if it is inside a critical section (odd ``seq``), wait
    until that one ends (``seq`` changes) or ``SECTION_WAIT_S`` passes. Did
    it wait for a long one (more than a few sleeps)?"""
    if block_at is None or not physmem_contains(physmem, block_at + SEQ_OFFSET, 8):
        return False
    seq = physmem.read_u64(block_at + SEQ_OFFSET)
    if not seq & 1:
        return False
    deadline = time.monotonic() + SECTION_WAIT_S
    sleeps = 0
    while physmem.read_u64(block_at + SEQ_OFFSET) == seq and time.monotonic() < deadline:
        time.sleep(0.0002)
        sleeps += 1
    return sleeps > 5


def _heap_covered(copier: HeapCopier, facts: GuestFacts) -> bool:
    """Was the heap the block (as copied in the hold) describes copied whole?"""
    bounds, head = facts.heap, facts.heap_free_head
    index = facts.block.heap_index if facts.block is not None else None
    return bounds is not None and head is not None and copier.covers(*bounds, index)


def _walk_copy(copier: HeapCopier, pages, runs: RunArrays, facts: GuestFacts, *,
               prior: HeapView | None) -> HeapView | None:
    """The heap walked on its copy (None: the copy does not hold it all as
    ``runs``, the tables of the same hold, map it)."""
    translator = RunTranslator(runs)
    start, end = facts.heap
    if pages is None or not copier.maps_same(translator, start, end):
        return None
    index = facts.block.heap_index if facts.block is not None else None
    try:
        return walk_heap_any(pages, translator, start, end, facts.heap_free_head, index, prior=prior)
    except NotCopied:  # it read outside the heap and its index: never from guest RAM as it is now
        return None


def _heap_still_mapped(walked: _Walked, fixed: Refreshed) -> bool:
    """The heap walk translated its addresses through ``walked.heap_runs``:
    still right if no edit since touched the heap's pages (known from the
    spans the refreshes re-decoded; compared run by run where not known)."""
    heap = walked.heap
    if heap is None or fixed.runs is walked.heap_runs:
        return True
    if walked.touched is not None:
        return not spans_touch(walked.touched + fixed.spans, heap.heap_start, heap.heap_end)
    return same_translation(walked.heap_runs, fixed.runs, heap.heap_start, heap.heap_end)


def same_translation(old: RunArrays, new: RunArrays, start: int, end: int) -> bool:
    """Do ``old`` and ``new`` map ``[start, end)`` the same way (virtual to physical)?"""
    lo, hi = np.uint64(start), np.uint64(end)

    def clipped(r: RunArrays):
        sel = (r.virt < hi) & (r.virt + r.size > lo)
        v, p, n = r.virt[sel], r.phys[sel], r.size[sel]
        first, last = np.maximum(v, lo), np.minimum(v + n, hi)
        return first, p + (first - v), last - first

    return all(np.array_equal(x, y) for x, y in zip(clipped(old), clipped(new)))


_snapshotters: "weakref.WeakKeyDictionary[object, Snapshotter]" = weakref.WeakKeyDictionary()


def take_snapshot(target: Target, *, facts: GuestFacts | None = None, max_tables: int = 1 << 16) -> Snapshot:
    """A consistent snapshot of ``target`` (see the module comment), through
    one ``Snapshotter`` per target kept for as long as the target lives."""
    snapper = _snapshotters.get(target)
    if snapper is None:
        snapper = _snapshotters[target] = Snapshotter(target)
    return snapper.take(facts, max_tables=max_tables)


def _cpu(facts: GuestFacts) -> dict:
    """The walker's CPU parameters from what the vCPU reports."""
    return {"maxphyaddr": facts.maxphyaddr, "gbpages": facts.gbpages}


def read_bitmaps(physmem, facts: GuestFacts) -> bytes | None:
    """Both frame bitmaps (used, then managed) as raw bytes, bounds-checked."""
    span = bitmap_span(facts)
    return physmem.read(*span) if span is not None else None


def walk_heap(physmem, runs: RunArrays, facts: GuestFacts, *, prior: HeapView | None = None) -> HeapView | None:
    """The heap as the facts place it (None if the guest reported no heap): the
    walk the guest's heap index asks for (TLSF or the first-fit list)."""
    bounds, head = facts.heap, facts.heap_free_head
    if bounds is None or head is None:
        return None
    index = facts.block.heap_index if facts.block is not None else None
    return walk_heap_any(physmem, RunTranslator(runs), *bounds, head, index, prior=prior)


def read_block(physmem, facts: GuestFacts, *, parked: bool = False) -> InspectBlock | None:
    """The guest's inspect block, if it reported one and it reads back sane
    (``parked``: the vCPU is held, so one read tells whether it is busy)."""
    paddr = facts.report.inspect_block_phys
    if paddr is None:
        return None
    try:
        return read_inspect_block(physmem, paddr, retries=1 if parked else 8)
    except (InspectBlockError, ValueError):
        return None


# --- filters ---------------------------------------------------------------------------------
@dataclass
class RunFilter:
    writable: bool | None = None
    executable: bool | None = None
    user: bool | None = None
    kernel_half: bool | None = None
    page_size: int | None = None
    start: int | None = None
    end: int | None = None
    label: str | None = None

    def matches(self, run: Run, label: str = "") -> bool:
        f = run.flags
        if self.writable is not None and bool(f & PteFlags.WRITABLE) != self.writable:
            return False
        if self.executable is not None and (not (f & PteFlags.NO_EXECUTE)) != self.executable:
            return False
        if self.user is not None and bool(f & PteFlags.USER) != self.user:
            return False
        if self.kernel_half is not None and (run.virt >= 1 << 63) != self.kernel_half:
            return False
        if self.page_size is not None and run.page_size != self.page_size:
            return False
        if self.start is not None and run.virt + run.size <= self.start:
            return False
        if self.end is not None and run.virt >= self.end:
            return False
        if self.label is not None and self.label.lower() not in label.lower():
            return False
        return True


def filtered_runs(snap: Snapshot, flt: RunFilter | None = None) -> list[tuple[Run, str]]:
    """Runs split at every owner edge, each piece with its label, filtered."""
    pieces = Labeler.for_facts(snap.facts).label_runs(snap.iter_runs())
    return [(run, name) for run, name in pieces if flt is None or flt.matches(run, name)]
