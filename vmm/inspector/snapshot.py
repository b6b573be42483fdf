"""One consistent look at a guest: page tables, frame bitmap, heap free list.

The guest keeps running while the host reads (the vCPU is parked only to
check): ``Snapshotter.take``

1. walks the tables from the last known CR3 (``mm.walker.walk_traced``:
   every table it decodes, where it sits in the tree and what it read
   there; the previous snapshot's walk, brought up to date, where CR3 is
   unchanged), and walks the heap free list, recording every node it reads
   (reusing the unchanged stretches of the previous walk), while the guest
   runs;
2. parks the vCPU and validates: same CR3 and EFER.NXE, the inspect block
   not mid-update (even ``seq``), the heap's bounds and head as walked,
   every recorded heap node unchanged (one vectorized gather); re-reads
   every traced table in one gather and re-walks only below the ones that
   changed (``mm.rewalk.refresh``: a guest that maps and unmaps all the time
   changes a few leaf tables between any read and any check, and throwing
   the walk away would never converge); then copies the frame bitmaps (a
   memcpy of RAM/32768 bytes: 8 KiB at 128 MiB, cheaper than comparing a
   copy made earlier) and lets the guest go. The pause costs comparisons
   and a few tables, not walks;
3. if the vCPU was parked inside a critical section (odd ``seq``), lets it
   run to the section's end (an instruction breakpoint on the kernel's quiet
   hook, local targets) and checks there, or parks again a moment later,
   without reading anything again (what was read may well still hold); if
   the heap changed (or the tables in a way only a full walk can judge:
   findings, a new CR3), starts over from 1 (the heap walk then rereads
   only what changed), at most ``attempts`` times. Every park is short;
   ``held_ms`` adds them up per snapshot;
4. after that, holds the guest for as long as a complete read takes
   (``method == "stopped"``), after waiting for it to leave any critical
   section; a guest that never does gives a snapshot marked ``busy``.

Everything else (labels, filters, audits, diffs) works on the snapshot
afterwards, without holding the guest.
"""

from __future__ import annotations

import contextlib
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
from mm.physmem import BufferMemory
from mm.flags import ADDR_MASK, PteFlags
from mm.rewalk import Refreshed, refresh, spans_touch
from mm.walker import Run, RunArrays, WalkTrace, walk_arrays, walk_traced

from ..cpu import EFER_NXE
from .facts import GuestFacts
from .heap import HeapView, RunTranslator
from .inspect_block import InspectBlock, InspectBlockError, parked_busy, read_inspect_block
from .labels import Labeler
from .target import ControlRegisters, Target
from .tlsf import walk_heap_any

#: Optimistic passes invalidated by guest changes before falling back.
MAX_ATTEMPTS = 6
#: Parks that find the guest inside a critical section before falling back
#: (each is short: park, read the block's seq, resume).
BUSY_PARKS = 40
#: How long a parked-busy guest may run to the end of its critical section.
QUIET_TIMEOUT_S = 0.05

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
    pause_ms: float  # the vCPU held, park and resume included
    walk_ms: float  # reads and checks done while it was held
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
    """Parks of one snapshot: how many, how many found the guest busy, how long in all."""

    parks: int = 0
    busy: int = 0
    held_ns: int = 0

    def park(self, ns: int, busy: bool) -> None:
        self.parks += 1
        self.busy += busy
        self.held_ns += ns


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


class Snapshotter:
    """Takes snapshots of one target; remembers CR3, EFER.NXE and the last heap
    walk between them (the next optimistic pass starts from those)."""

    def __init__(self, target: Target, *, attempts: int = MAX_ATTEMPTS):
        # ``attempts``: optimistic passes invalidated by changes before the
        # guest is held for a complete read.
        self.target = target
        self.attempts = max(1, attempts)
        self._cr3: int | None = None
        self._nxe = True
        self._heap: HeapView | None = None
        self._walked: _Walked | None = None  # the last snapshot's tables (the next pass refreshes them)

    def take(self, facts: GuestFacts | None = None, *, max_tables: int = 1 << 16) -> Snapshot:
        facts = facts or self.target.facts()
        _warm_up(self.target.physmem)
        if self._cr3 is None and facts.report.cr3 is not None:
            self._cr3 = facts.report.cr3 & ADDR_MASK
        tally = _Tally()
        walked, changed = None, 0
        while changed < self.attempts and tally.busy < BUSY_PARKS:
            if walked is None:
                walked = self._read_running(facts, max_tables)
            # Until the last pass, the pause only patches edits of the two lowest
            # levels (pages, leaf tables); a re-walk from higher up waits for the
            # next pass, made while the guest runs.
            status, snap = self._validate(facts, walked, max_tables, tally, patch_only=changed < self.attempts - 1)
            if snap is not None:
                return snap
            if status == "busy":
                # Parked inside a critical section: what was read may still be
                # valid once it ends. Park again a little later (jittered so a
                # periodic guest cannot dodge us); no new pass unless it changed.
                time.sleep(random.uniform(0.0003, 0.0015))
            else:
                changed += 1
                if walked is not None:
                    self._walked = walked  # the next pass refreshes what this one read
                walked = None
                time.sleep(0.0002 * changed)
        return self._take_stopped(facts, max_tables, tally)

    # -- 1. while the guest runs ----------------------------------------------------
    def _read_running(self, facts: GuestFacts, max_tables: int) -> _Walked | None:
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
        heap = walk_heap(physmem, runs, facts.with_block(block) if block else facts, prior=self._heap)
        if heap is not None:
            self._heap = heap
        walked = _Walked(self._cr3, self._nxe, trace, report, runs, heap, runs)
        # Catch up with what the guest changed during the heap walk (a few
        # tables at most), so that the pause, which follows at once, finds
        # as little as possible to re-walk.
        self._catch_up(physmem, walked, facts, max_tables)
        return walked

    def _catch_up(self, physmem, walked: "_Walked | None", facts: GuestFacts, max_tables: int) -> None:
        """While the guest runs: bring ``walked``'s tables up to date."""
        if walked is None:
            return
        try:
            again = self._tables(physmem, walked, walked.cr3, walked.nxe, facts, max_tables)
        except Exception:  # a torn read: the check in the pause decides
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
        targets do that here, with ``run_to``)."""
        if getattr(self.target, "quiet_pause", False):
            return self.target.paused(quiet=True)
        return self.target.paused()

    # -- 2. in a short pause -------------------------------------------------------------
    def _validate(self, facts: GuestFacts, walked: _Walked | None, max_tables: int,
                  tally: "_Tally", *, patch_only: bool = False) -> tuple[str, Snapshot | None]:
        """("ok", snapshot), or ("busy" | "changed", None)."""
        physmem = self.target.physmem
        t0 = time.perf_counter_ns()
        with _no_gc(), self._pause() as parked:
            t1 = time.perf_counter_ns()
            t0 += _ran_ns(parked)  # a remote guest's run to its quiet point is not held
            if not parked:  # not running: every read is consistent as it is
                finish = self._read_all(facts, max_tables)
                return "ok", finish(t0, t1, time.perf_counter_ns(), tally, parked=False, method=NOT_RUNNING)
            run_to = getattr(self.target, "run_to", None)  # local targets only
            if run_to is not None and facts.report.quiet_hook and parked_busy(physmem, facts.report.inspect_block_phys):
                # Inside a critical section: let the guest run to its end (the
                # kernel's quiet hook, an instruction breakpoint) and look there.
                # It runs meanwhile (not counted as held), and the tables are
                # caught up with meanwhile, so the check at the hook finds
                # only the section's last edits.
                tr = time.perf_counter_ns()
                quiet = run_to(facts.report.quiet_hook, QUIET_TIMEOUT_S,
                               lambda: self._catch_up(physmem, walked, facts, max_tables))
                ran = (quiet if quiet is not None else time.perf_counter_ns()) - tr
                t0, t1 = t0 + ran, t1 + ran
            regs = self.target.control_registers()
            block = read_block(physmem, facts, parked=True)
            busy = block is not None and block.busy
            nxe = bool(regs.efer & EFER_NXE)
            live = facts.with_block(block) if block is not None else facts
            ok = (
                not busy
                and walked is not None
                and regs.root == walked.cr3
                and nxe == walked.nxe
                and _heap_unchanged(physmem, walked.heap, live)
            )
            if ok:
                # The tables as of this pause: the walk, re-walked below what changed.
                fixed = refresh(physmem, walked.runs, walked.trace, walked.report, max_tables=max_tables, nxe=nxe,
                                patch_only=patch_only, **_cpu(facts))
                ok = fixed is not None and _heap_still_mapped(walked, fixed)
            bitmap = read_bitmaps(physmem, live) if ok else None
            t2 = time.perf_counter_ns()
        t3 = time.perf_counter_ns()
        self._cr3, self._nxe = regs.root, nxe
        if _expired(parked):  # a remote pause ran out mid-read: the guest moved, read again
            tally.park(t3 - t0, False)
            return "changed", None
        if not ok:
            tally.park(t3 - t0, busy)
            return ("busy" if busy else "changed"), None
        self._walked = _Walked(walked.cr3, nxe, fixed.trace, fixed.report, fixed.runs, walked.heap, walked.heap_runs)
        return "ok", _snapshot(regs, fixed.runs, fixed.report, live, bitmap, walked.heap, t0, t1, t2, t3, tally,
                               parked=True, method=VALIDATED, busy=False)

    # -- 4. the guest held -----------------------------------------------------------------
    def _take_stopped(self, facts: GuestFacts, max_tables: int, tally: "_Tally") -> Snapshot:
        physmem = self.target.physmem
        for k in range(BUSY_PARKS):
            t0 = time.perf_counter_ns()
            with _no_gc(), self._pause() as parked:
                t1 = time.perf_counter_ns()
                t0 += _ran_ns(parked)
                block = read_block(physmem, facts, parked=True) if parked else None
                if parked and block is not None and block.busy and k < BUSY_PARKS - 1:
                    finish = None  # inside a critical section: let it finish
                else:
                    finish = self._read_all(facts, max_tables)
            t3 = time.perf_counter_ns()
            if finish is not None:
                # A remote pause that ran out let the guest go mid-read: the
                # snapshot says it was not parked (its reads may be torn).
                held = bool(parked) and not _expired(parked)
                return finish(t0, t1, t3, tally, parked=held, method=STOPPED if parked else NOT_RUNNING,
                              expired=_expired(parked))
            tally.park(t3 - t0, True)
            time.sleep(random.uniform(0.0003, 0.0015))
        raise AssertionError("unreachable: the last park always reads")

    def _read_all(self, facts: GuestFacts, max_tables: int):
        """Every read with the guest not running (held, or stopped anyway);
        returns a function that makes the snapshot once the pause is over
        (from its timestamps: start, parked, resumed)."""
        physmem = self.target.physmem
        regs = self.target.control_registers()
        nxe = bool(regs.efer & EFER_NXE)
        report = WalkReport()
        runs, trace = walk_traced(physmem, regs.root, report=report, max_tables=max_tables, nxe=nxe, **_cpu(facts))
        block = read_block(physmem, facts)
        live = facts.with_block(block) if block is not None else facts
        bitmap = read_bitmaps(physmem, live)
        heap = walk_heap(physmem, runs, live, prior=self._heap)
        t2 = time.perf_counter_ns()
        self._cr3, self._nxe = regs.root, nxe
        self._walked = _Walked(regs.root, nxe, trace, report, runs, heap, runs)
        if heap is not None:
            self._heap = heap

        def finish(t0: int, t1: int, t3: int, tally: _Tally, *, parked: bool, method: str,
                   expired: bool = False) -> Snapshot:
            return _snapshot(regs, runs, report, live, bitmap, heap, t0, t1, t2, t3, tally, parked=parked,
                             method=method, busy=bool(parked and block is not None and block.busy), expired=expired)

        return finish


def _snapshot(regs, runs, report, facts, bitmap, heap, t0, t1, t2, t3, tally, *, parked, method, busy,
              expired=False) -> Snapshot:
    if parked or expired:
        tally.park(t3 - t0, busy)
    return Snapshot(
        taken_at=time.time(),
        registers=regs,
        runs=runs,
        walk_findings=list(report.findings),
        table_frames=dict(report.tables),
        tables_visited=report.tables_visited,
        pause_ms=(t3 - t0) / 1e6 if parked else 0.0,
        walk_ms=(t2 - t1) / 1e6,
        facts=facts,
        parked=parked,
        method=method,
        attempts=max(1, tally.parks),
        held_ms=tally.held_ns / 1e6,
        busy=busy,
        pause_expired=expired,
        bitmap_raw=bitmap,
        heap=heap,
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


def _heap_unchanged(physmem, heap: HeapView | None, facts: GuestFacts) -> bool:
    """The optimistic heap walk still describes the heap the block describes."""
    bounds, head = facts.heap, facts.heap_free_head
    if heap is None:
        return bounds is None or head is None
    if bounds is None or (heap.heap_start, heap.heap_end, heap.head) != (*bounds, head):
        return False
    return heap.unchanged(physmem)


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
    if facts.bitmap is None:
        return None
    paddr, bits = facts.bitmap
    if bits > facts.ram_size // 4096 + 64:
        return None
    n = 2 * (-(-bits // 64)) * 8
    if paddr < 0 or paddr + n > facts.ram_size:
        return None
    return physmem.read(paddr, n)


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
