"""One consistent look at a guest's page tables, taken with the vCPU parked.

``take_snapshot`` pauses the vCPU (immediate_exit plus a signal), reads the
control registers and walks the live tables from CR3 with ``mm``'s walker,
then lets the guest go: the pause lasts as long as one walk (a few ms for a
typical guest). Everything else (labels, filters, audits, diffs) works on
the snapshot afterwards, without holding the guest.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from mm.findings import Finding, WalkReport
from mm.flags import PteFlags
from mm.physmem import read_tables
from mm.walker import Run, RunArrays, walk_arrays

from ..cpu import EFER_NXE
from ..layout import PHYS_OFFSET
from .heap import RunTranslator
from .inspect_block import InspectBlockError, read_inspect_block
from .target import ControlRegisters, GuestFacts, Target
from .tlsf import walk_heap_any


@dataclass
class Snapshot:
    taken_at: float  # time.time()
    registers: ControlRegisters
    runs: RunArrays
    walk_findings: list[Finding]
    table_frames: dict  # level -> array of table frame addresses
    tables_visited: int
    pause_ms: float
    walk_ms: float
    facts: GuestFacts
    parked: bool = True
    extra: dict = field(default_factory=dict)

    def iter_runs(self):
        return self.runs.runs()

    @property
    def page_table_frames(self) -> np.ndarray:
        frames = [np.asarray(v, dtype=np.uint64) for v in self.table_frames.values()]
        return np.unique(np.concatenate(frames)) if frames else np.zeros(0, dtype=np.uint64)


_warm = False


def _warm_up(physmem) -> None:
    """The first walk in a process pays numpy's one-time costs (~8 ms): pay
    them on a dummy walk before any pause, not while the guest is held."""
    global _warm
    if not _warm:
        walk_arrays(physmem, 0, max_tables=4)
        _warm = True


BUSY_RETRIES = 20


def take_snapshot(target: Target, *, facts: GuestFacts | None = None, max_tables: int = 1 << 16) -> Snapshot:
    """A consistent snapshot. If the vCPU was parked inside one of the guest's
    allocator or paging critical sections (odd inspect-block seq), the guest
    is let go for a moment and the snapshot retaken, up to BUSY_RETRIES
    times; ``snap.extra["busy"]`` says if it never got a quiet moment."""
    facts = facts or target.facts()
    for attempt in range(BUSY_RETRIES):
        snap = _take_snapshot_once(target, facts, max_tables)
        block = snap.extra.get("inspect_block")
        retake = snap.extra.get("pause_expired") or (block is not None and block.busy and snap.parked)
        if not retake:
            break
        time.sleep(0.0002 * (attempt + 1))
    snap.extra["busy"] = bool(snap.extra.get("inspect_block") is not None and snap.extra["inspect_block"].busy)
    snap.extra["attempts"] = attempt + 1
    return snap


class _RecordingMemory:
    """Physical memory that remembers every page-table frame the walker read.

    A walk is a pure function of CR3 and the table frames it reads, so if
    every one of those frames still holds the same bytes later, the walk is
    exactly what a walk at that later moment would give.
    """

    def __init__(self, mem):
        self.mem = mem
        self.size = mem.size
        self.base = getattr(mem, "base", 0)
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []  # (paddrs, rows as read)

    def read_tables(self, paddrs: np.ndarray) -> np.ndarray:
        rows = read_tables(self.mem, paddrs)
        self.seen.append((np.asarray(paddrs, dtype=np.uint64).copy(), rows.copy()))
        return rows

    def read_table(self, paddr: int) -> np.ndarray:
        return self.read_tables(np.array([paddr], dtype=np.uint64))[0]

    def __getattr__(self, name):
        return getattr(self.mem, name)

    def unchanged(self) -> bool:
        return all(np.array_equal(read_tables(self.mem, p), rows) for p, rows in self.seen)


def _take_snapshot_once(target: Target, facts: GuestFacts, max_tables: int) -> Snapshot:
    """Walk while the guest runs, then park it and check that every table the
    walk read is unchanged (cheap: a few KiB compared). Only if something
    changed, or CR3 did, is the walk redone with the vCPU parked. The pause
    thus costs a table comparison instead of a walk."""
    _warm_up(target.physmem)
    guess_cr3 = getattr(target, "_last_cr3", None)
    nxe = getattr(target, "_last_nxe", True)
    optimistic = None
    if guess_cr3 is not None:
        rec = _RecordingMemory(target.physmem)
        pre_report = WalkReport()
        try:
            pre_runs = walk_arrays(rec, guess_cr3, report=pre_report, max_tables=max_tables, nxe=nxe, **_cpu(facts))
            optimistic = (rec, pre_report, pre_runs)
        except Exception:  # a torn read of a table being rewritten: walk parked instead
            optimistic = None
    t0 = time.perf_counter_ns()
    with target.paused() as parked:
        t1 = time.perf_counter_ns()
        regs = target.control_registers()
        nxe_now = bool(regs.efer & EFER_NXE)
        validated = (
            optimistic is not None and parked and regs.root == guess_cr3 and nxe_now == nxe and optimistic[0].unchanged()
        )
        if validated:
            _, report, runs = optimistic
        else:
            report = WalkReport()
            runs = walk_arrays(
                target.physmem, regs.root, report=report, max_tables=max_tables, nxe=nxe_now, **_cpu(facts)
            )
        block = _read_block(target.physmem, facts)
        if block is not None:  # live values override the INSPECT report's boot-time ones
            facts = dataclasses.replace(facts, inspect={**facts.inspect, **block.as_inspect_fields()})
        # The allocator state must match the tables: copy it inside the pause too.
        bitmap_raw = read_bitmaps(target.physmem, facts)
        heap = walk_heap(target.physmem, runs, facts)
        t2 = time.perf_counter_ns()
    t3 = time.perf_counter_ns()
    # A remote pause that ran out let the guest go mid-read: not a parked snapshot.
    expired = bool(getattr(parked, "expired", False))
    parked = bool(parked) and not expired
    try:
        target._last_cr3, target._last_nxe = regs.root, nxe_now
    except AttributeError:
        pass
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
        parked=bool(parked),
        extra={"inspect_block": block, "bitmap_raw": bitmap_raw, "heap": heap, "validated_walk": validated,
               "pause_expired": expired},
    )


def _cpu(facts: GuestFacts) -> dict:
    """The walker's CPU parameters from what the vCPU reports."""
    return {"maxphyaddr": facts.maxphyaddr, "gbpages": facts.gbpages}


def read_bitmaps(physmem, facts: GuestFacts) -> bytes | None:
    """Both frame bitmaps (used, then managed) as raw bytes, bounds-checked."""
    paddr, bits = facts.inspect_int("bitmap_phys"), facts.inspect_int("bitmap_bits")
    if paddr is None or not bits or bits > facts.ram_size // 4096 + 64:
        return None
    n = 2 * (-(-bits // 64)) * 8
    if paddr < 0 or paddr + n > facts.ram_size:
        return None
    return physmem.read(paddr, n)


def walk_heap(physmem, runs: RunArrays, facts: GuestFacts):
    start, end, head = (facts.inspect_int(k) for k in ("heap_start", "heap_end", "heap_free_head"))
    if start is None or end is None or head is None:
        return None
    return walk_heap_any(physmem, RunTranslator(runs), start, end, head, facts.inspect_int("heap_index"))


def _read_block(physmem, facts: GuestFacts):
    """The guest's inspect block, if it reported one and it reads back sane."""
    paddr = facts.inspect_int("inspect_block_phys")
    if paddr is None:
        return None
    try:
        return read_inspect_block(physmem, paddr)
    except (InspectBlockError, ValueError):
        return None


# --- labels ----------------------------------------------------------------------------
_SEGMENT_NAMES = {"R-X": "kernel .text", "R--": "kernel .rodata", "RW-": "kernel .data/.bss"}


def label_ranges(facts: GuestFacts) -> list[tuple[int, int, str]]:
    """(start, end, name) for every region the host can name, most specific first."""
    out: list[tuple[int, int, str]] = []
    for start, end, perms in facts.segments:
        out.append((start & ~0xFFF, (end + 0xFFF) & ~0xFFF, _SEGMENT_NAMES.get(perms, f"kernel {perms}")))
    heap_start, heap_end = facts.inspect_int("heap_start"), facts.inspect_int("heap_end")
    if heap_start is not None and heap_end is not None:
        out.append((heap_start, max(heap_end, heap_start), "heap"))
    for lo, hi, task in facts.stacks():
        out.append((lo, hi, f"stack (task {task})"))
    scratch, scratch_size = facts.inspect_int("scratch_start"), facts.inspect_int("scratch_size")
    if scratch is not None and scratch_size:
        out.append((scratch, scratch + scratch_size, "scratch (tests, workload)"))
    demand_lo, demand_hi = facts.inspect_int("demand_start"), facts.inspect_int("demand_end")
    if demand_lo is not None and demand_hi is not None:
        out.append((demand_lo, demand_hi, "demand-paged region"))
    for d in facts.memmap:
        if d.get("type") == "FRAMEBUFFER":
            out.append((PHYS_OFFSET + d["phys_start"], PHYS_OFFSET + d["end"], "framebuffer (direct map)"))
    out.append((PHYS_OFFSET, PHYS_OFFSET + facts.ram_size, "direct map"))
    return out


def labeler(facts: GuestFacts):
    ranges = label_ranges(facts)

    def label(run: Run) -> str:
        for a, b, name in ranges:
            if a <= run.virt < b:
                return name
        return ""

    return label


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
    label = labeler(snap.facts)
    out = []
    for run in snap.iter_runs():
        name = label(run)
        if flt is None or flt.matches(run, name):
            out.append((run, name))
    return out
