"""Views of a snapshot: page tables, audits, physical memory, heap; JSON and rich.

``inspect(snapshot, physmem)`` computes every view once and returns an
``Inspection``; ``to_json()`` gives the documented schema (docs/INSPECT.md)
and ``render()`` a rich renderable for the terminal and the live view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from mm.audit import audit_user_in_kernel_half, audit_wx, pt_alias_findings
from mm.findings import Finding, Severity, WalkReport

from ..box_table import BoxTable
from ..cpu import decode_bits
from ..layout import PHYS_OFFSET
from ..render import flags_str
from ..units import hex_addr, human_size
from .diff import Change, diff_runs, summarize
from .heap import HeapView, RunTranslator
from .physical import PhysicalView, physical_view
from .snapshot import STOPPED, RunFilter, Snapshot, filtered_runs, walk_heap

SCHEMA_VERSION = 1




def audits(snap: Snapshot) -> list[Finding]:
    """Live security audits: W+X, user pages in the kernel half, writable
    aliases of page tables (outside the direct map), stack guard pages."""
    found = list(snap.walk_findings)
    found += audit_wx(snap.runs)
    found += audit_user_in_kernel_half(snap.runs)
    report = WalkReport()
    report.tables = snap.table_frames
    direct = (PHYS_OFFSET, PHYS_OFFSET + snap.facts.ram_size)
    found += pt_alias_findings(snap.runs, report, [direct])
    translator = RunTranslator(snap.runs)
    for st in snap.facts.stacks:
        lo, hi = st.base, st.top
        for where, page in (("below", lo - 4096), ("above", hi)):
            phys = translator.translate(page)
            if phys is not None:
                found.append(
                    Finding("guard_page_mapped", page, 4096, f"guard page {where} stack [{lo:#x}, {hi:#x}) is mapped to {phys:#x}",
                            Severity.ERROR)
                )
    return sorted(found, key=lambda f: (-f.severity, f.virt if f.virt is not None else -1))


@dataclass
class Inspection:
    snapshot: Snapshot
    runs: list  # (Run, label)
    findings: list[Finding]
    physical: PhysicalView | None
    heap: HeapView | None
    changes: list[Change] | None = None
    timings_ms: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        s = self.snapshot
        out = {
            "schema": SCHEMA_VERSION,
            "taken_at": s.taken_at,
            "registers": s.registers.to_json(),
            "kaslr_slide": s.facts.kaslr_slide,
            "ram_size": s.facts.ram_size,
            "pause_ms": round(s.pause_ms, 4),
            "walk_ms": round(s.walk_ms, 4),
            "tables_visited": s.tables_visited,
            "consistency": {"method": s.method, "attempts": s.attempts, "held_ms": round(s.held_ms, 4),
                            "busy": s.busy, "heap_copied": s.heap_copied},
            "runs": [
                {
                    "virt": r.virt,
                    "phys": r.phys,
                    "size": r.size,
                    "page_size": int(r.page_size),
                    "level": r.level,
                    "flags": flags_str(r.flags),
                    "writable": bool(r.flags & 2),
                    "user": bool(r.flags & 4),
                    "executable": not (r.flags >> 63) & 1,
                    "label": label,
                }
                for r, label in self.runs
            ],
            "findings": [
                {"kind": f.kind, "severity": f.severity.name, "virt": f.virt, "size": f.size, "detail": f.detail}
                for f in self.findings
            ],
            "physical": self.physical.to_json() if self.physical else None,
            "heap": self.heap.to_json() if self.heap else None,
            "timings_ms": {k: round(v, 4) for k, v in self.timings_ms.items()},
        }
        if self.changes is not None:
            out["diff"] = {"summary": summarize(self.changes), "changes": [c.to_json() for c in self.changes[:2000]]}
        return out

    def summary_line(self) -> str:
        s = self.snapshot
        errors = sum(1 for f in self.findings if f.severity == Severity.ERROR)
        parts = [f"{len(s.runs)} runs", f"pause {s.pause_ms:.2f} ms", f"{errors} audit errors"]
        if s.method == STOPPED:
            parts.append(f"guest held for consistency after {s.attempts - 1} attempts")
        if self.changes is not None:
            parts.append(f"{len(self.changes)} changes")
        if self.physical is not None:
            parts.append(f"{self.physical.allocated} frames allocated")
        if self.heap is not None:
            parts.append(f"heap {self.heap.free_blocks} free blocks")
        return ", ".join(parts)

    # --- rich --------------------------------------------------------------------------------
    def render(self, max_rows: int = 40) -> Group:
        s = self.snapshot
        r = s.registers
        head = Text()
        head.append(f"CR3 {r.cr3:#x}  RIP {r.rip:#x}  KASLR slide {s.facts.kaslr_slide:#x}  ", style="bold")
        head.append(f"CR0[{' '.join(decode_bits('cr0', r.cr0))}] CR4[{' '.join(decode_bits('cr4', r.cr4))}] "
                    f"EFER[{' '.join(decode_bits('efer', r.efer))}]\n")
        head.append(
            f"{len(s.runs)} runs from {s.tables_visited} tables; vCPU paused {s.pause_ms:.2f} ms "
            f"({s.method}, attempt {s.attempts})"
        )
        parts = [head, self._runs_table(max_rows), self._findings_table()]
        if self.changes is not None:
            parts.append(self._diff_table())
        if self.physical is not None:
            parts.append(self._physical_table())
        if self.heap is not None:
            parts.append(self._heap_text())
        return Group(*parts)

    def _runs_table(self, max_rows: int) -> BoxTable:
        t = BoxTable(title="page tables (effective flags)", pad_edge=False)
        for col in ("virtual", "physical", "size", "page", "flags", "what"):
            t.add_column(col, no_wrap=True, justify="right" if col in ("size", "page") else "left")
        for run, label in self.runs[:max_rows]:
            t.add_row(hex_addr(run.virt), hex_addr(run.phys, 12), human_size(run.size), human_size(run.page_size),
                      flags_str(run.flags), label)
        if len(self.runs) > max_rows:
            t.add_row("...", "", "", "", "", f"{len(self.runs) - max_rows} more")
        return t

    def _findings_table(self) -> BoxTable | Text:
        if not self.findings:
            return Text("audits: no findings (no W+X, no user page in the kernel half, guard pages unmapped)", style="green")
        t = BoxTable(title=f"audits: {len(self.findings)} findings")
        for col in ("severity", "kind", "where", "detail"):
            t.add_column(col)
        style = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
        for f in self.findings[:20]:
            t.add_row(Text(f.severity.name, style=style[f.severity]), f.kind, hex_addr(f.virt) if f.virt is not None else "",
                      f.detail)
        return t

    def _diff_table(self) -> BoxTable | Text:
        if not self.changes:
            return Text("diff: no change since the previous snapshot", style="dim")
        t = BoxTable(title=f"changes since previous snapshot ({len(self.changes)})")
        for col in ("change", "virtual", "size", "old", "new"):
            t.add_column(col, no_wrap=True)
        colour = {"mapped": "green", "unmapped": "red", "moved": "magenta", "flags": "yellow"}
        for c in self.changes[:15]:
            old = "" if c.old_phys is None else f"{hex_addr(c.old_phys, 12)} {flags_str(c.old_flags)}"
            new = "" if c.new_phys is None else f"{hex_addr(c.new_phys, 12)} {flags_str(c.new_flags)}"
            t.add_row(Text(c.kind, style=colour[c.kind]), hex_addr(c.virt), human_size(c.size), old, new)
        return t

    def _physical_table(self) -> BoxTable:
        p = self.physical
        t = BoxTable(title=f"physical memory: {p.allocated} frames allocated, {p.free} free, {p.leaked_frames} unreachable")
        for col in ("region", "start", "frames", "allocated", "free"):
            t.add_column(col, no_wrap=True)
        for r in p.regions:
            t.add_row(str(r["type"]), hex_addr(r["phys_start"], 12), str(r["frames"]), str(r["allocated"]), str(r["free"]))
        return t

    def _heap_text(self) -> Text:
        h = self.heap
        text = Text(
            f"heap ({h.allocator}) [{h.heap_start:#x}, {h.heap_end:#x}): {h.free_blocks} free blocks, "
            f"{human_size(h.free_bytes)} free, largest {human_size(h.largest_free)}, fragmentation {h.fragmentation:.0%}"
        )
        if h.used_blocks is not None:  # TLSF: the tag walk and the segregated lists
            lists = sum(1 for n in h.lists.values() if n)
            text.append(f"\n  {h.used_blocks} blocks in use ({h.cached_blocks} in the size-class caches), "
                        f"{lists} non-empty lists, top block {human_size(h.free_size(h.top)) if h.top else 'none'}")
        if h.guest_findings:
            text.append(f"\n  the guest's heap refused {h.guest_findings} operation(s)", style="bold yellow")
        for f in h.findings:
            text.append(f"\n  {f}", style="bold red")
        return text


def heap_view(snap: Snapshot, physmem) -> HeapView | None:
    if snap.heap is not None:  # consistent with the snapshot's tables and block
        return snap.heap
    return walk_heap(physmem, snap.runs, snap.facts)


def inspect(snap: Snapshot, physmem, flt: RunFilter | None = None, previous: Snapshot | None = None) -> Inspection:
    t0 = time.perf_counter_ns()
    runs = filtered_runs(snap, flt)
    t1 = time.perf_counter_ns()
    found = audits(snap)
    t2 = time.perf_counter_ns()
    busy = snap.busy
    phys = physical_view(snap, physmem)
    if phys is not None and not busy:  # mid-update state would give false alarms
        found += phys.findings
    t3 = time.perf_counter_ns()
    heap = heap_view(snap, physmem)
    if heap is not None and not busy:
        found += heap.findings
    if busy:
        found.append(Finding("guest-busy", None, 0, "the guest stayed inside an allocator critical section; "
                             "heap and frame cross-checks skipped for this snapshot", Severity.INFO))
    t4 = time.perf_counter_ns()
    changes = diff_runs(previous.runs, snap.runs) if previous is not None else None
    t5 = time.perf_counter_ns()
    return Inspection(
        snap, runs, found, phys, heap, changes,
        {"label_filter": (t1 - t0) / 1e6, "audits": (t2 - t1) / 1e6, "physical": (t3 - t2) / 1e6,
         "heap": (t4 - t3) / 1e6, "diff": (t5 - t4) / 1e6},
    )
