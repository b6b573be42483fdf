"""Bringing a traced walk up to date by re-walking only below the tables that changed.

A walk is a pure function of CR3 and the table frames it decodes
(``WalkTrace``). Later, one gather re-reads all those frames: where none
changed, the walk still holds; where some did, the subtrees under the
topmost changed tables are walked again (from the place in the tree the
trace recorded for them), their old runs are cut out of the result and the
new ones spliced in. The outcome equals a fresh ``walk_arrays`` of the same
tables (``tests/mm/test_rewalk.py`` checks that on random trees and edits).

The inspector repairs the optimistic walk it made while the guest ran this
way inside its short pause, instead of throwing it away and trying again: a
guest that maps and unmaps all the time (``workload=mm``) changes a few leaf
tables between any read and any check, never the whole tree.

Only a walk without findings is refreshed (hostile trees take the full
walk): ``refresh`` returns None where it cannot promise the full walk's
answer (findings, the table cap, a frame now shared between two places).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .addr import PHYS_ADDR_BITS
from .entry import LEVELS, Level, leaf_addr_mask, reserved_mask
from .findings import WalkReport
from .flags import PteFlags
from .physmem import PhysicalMemory, read_tables
from .walker import DEFAULT_LEAF_FLAGS, DEFAULT_MAX_TABLES, RunArrays, WalkTrace, _coalesce, _space, _Walk

__all__ = ["Refreshed", "changed_tables", "refresh"]

_u64 = np.uint64
_PRESENT, _WU, _NX = int(PteFlags.PRESENT), int(PteFlags.WRITABLE | PteFlags.USER), int(PteFlags.NO_EXECUTE)
_PAT_HUGE = int(PteFlags.PAT_HUGE)


@dataclass(frozen=True)
class Refreshed:
    """A walk brought up to date: its runs, trace and report as of the re-read."""

    runs: RunArrays
    trace: WalkTrace
    report: WalkReport
    changed: int  # tables whose entries differed from the trace (0: nothing was re-walked)
    rewalked: int  # tables decoded again (the changed ones and everything below them)


def changed_tables(mem: PhysicalMemory, trace: WalkTrace) -> np.ndarray:
    """Which traced tables no longer hold the entries the walk read (one gather)."""
    if len(trace) == 0:
        return np.zeros(0, dtype=bool)
    return (read_tables(mem, trace.table) != trace.rows).any(axis=1)


def _below(trace: WalkTrace, chosen: np.ndarray) -> np.ndarray:
    """Tables with one of the ``chosen`` tables among their ancestors (at its own level)."""
    out = np.zeros(len(trace), dtype=bool)
    for li in np.unique(trace.level[chosen]).tolist():
        out |= np.isin(trace.anc[:, li], trace.table[chosen & (trace.level == li)])
    return out


def refresh(
    mem: PhysicalMemory,
    runs: RunArrays,
    trace: WalkTrace,
    report: WalkReport,
    *,
    max_tables: int = DEFAULT_MAX_TABLES,
    maxphyaddr: int = PHYS_ADDR_BITS,
    nxe: bool = True,
    gbpages: bool = True,
    leaf_flags: PteFlags | int = DEFAULT_LEAF_FLAGS,
    levels: Sequence[Level] = LEVELS,
    leaves_only: bool = False,
) -> Refreshed | None:
    """``runs``/``trace``/``report`` (from ``walk_traced`` with the same CPU
    parameters and the same CR3) as a walk of ``mem`` now would give them;
    None where only a full walk can say (see the module comment), or, with
    ``leaves_only``, where more than last-level entries changed (a caller
    with a tight time budget then retries later)."""
    if report.findings or report.suppressed or report.truncated:
        return None
    now = read_tables(mem, trace.table) if len(trace) else trace.rows
    changed = (now != trace.rows).any(axis=1)
    if not changed.any():
        return Refreshed(runs, trace, report, 0, 0)
    last = len(levels) - 1
    if (trace.level[changed] == last).all():
        # Only leaf entries moved (the common case: a page mapped or
        # unmapped): patch those pages into the runs, no walk at all.
        cpu = _LeafCpu(levels[last], maxphyaddr, nxe, gbpages, int(leaf_flags), mem)
        patched = _patch_leaves(runs, trace, now, changed, cpu, levels)
        if patched is not None:
            rows = trace.rows.copy()
            rows[changed] = now[changed]
            new_trace = WalkTrace(trace.level, trace.table, trace.base, trace.acc, trace.anc, rows)
            return Refreshed(patched, new_trace, report, int(changed.sum()), 0)
    if leaves_only:
        return None
    top = changed & ~_below(trace, changed)
    gone = top | _below(trace, top)
    kept = trace[~gone]

    space = _space(levels)
    fresh = WalkReport()
    w = _Walk(mem, fresh, levels, maxphyaddr, nxe, gbpages, max_tables - len(kept), int(leaf_flags), trace=True)
    frontier = {}
    for li in np.unique(trace.level[top]).tolist():
        sel = top & (trace.level == li)
        frontier[li] = (trace.table[sel], trace.base[sel], trace.acc[sel], trace.anc[sel, :li])
    w.descend(frontier, 0, space.top)
    new_runs = w.result(0, space.top)
    if fresh.findings or fresh.suppressed or fresh.truncated:
        return None
    new_trace = WalkTrace.concat(kept, WalkTrace.of(w.trace, len(levels)))
    # A full walk expands each frame once per level and reports the second
    # reference: if an edit made two places share a table, let it say so.
    key = new_trace.table | new_trace.level.astype(np.uint64)  # frames are 4 KiB aligned
    if np.unique(key).size != key.size:
        return None

    spans = [(int(b), int(b) + (512 << levels[li].shift))
             for li, b in zip(trace.level[top].tolist(), trace.base[top].tolist())]
    merged = _splice(runs, spans, new_runs, space, levels)
    tables = {levels[li].number: np.unique(new_trace.table[new_trace.level == li])
              for li in np.unique(new_trace.level).tolist()}
    out_report = WalkReport(tables=tables, tables_visited=len(new_trace), max_findings=report.max_findings)
    return Refreshed(merged, new_trace, out_report, int(changed.sum()), len(new_trace) - len(kept))


def _splice(old: RunArrays, spans: list[tuple[int, int]], new: RunArrays, space, levels: Sequence[Level]) -> RunArrays:
    """``old`` with everything inside ``spans`` (linear ranges) replaced by ``new``."""
    lin = _u64(space.top - 1)
    v = old.virt & lin
    ends = v + old.size
    spans = sorted(spans)
    hit: set[int] = set()
    for a, b in spans:
        i0 = int(np.searchsorted(ends, _u64(a), side="right"))  # first run ending after a
        i1 = int(np.searchsorted(v, _u64(b), side="left"))  # runs starting before b
        hit.update(range(i0, i1))
    keep = np.ones(v.size, dtype=bool)
    pieces: list[tuple[int, int, int, int, int]] = []  # (virt, phys, size, flags, level) outside every span
    for i in sorted(hit):
        keep[i] = False
        lo, hi, phys = int(v[i]), int(ends[i]), int(old.phys[i])
        cur = lo
        for a, b in spans:
            if b <= cur or a >= hi:
                continue
            if a > cur:
                pieces.append((cur, phys + cur - lo, a - cur, int(old.flags[i]), int(old.level[i])))
            cur = max(cur, b)
        if cur < hi:
            pieces.append((cur, phys + cur - lo, hi - cur, int(old.flags[i]), int(old.level[i])))
    cols = [
        [v[keep], new.virt & lin],
        [old.phys[keep], new.phys],
        [old.size[keep], new.size],
        [old.flags[keep], new.flags],
        [old.level[keep], new.level],
    ]
    if pieces:
        pv, pp, ps, pf, pl = zip(*pieces)
        for col, vals, dt in zip(cols, (pv, pp, ps, pf, pl), (np.uint64,) * 4 + (np.uint8,)):
            col.append(np.array(vals, dtype=dt))
    mv, mp, ms, mf, ml = (np.concatenate(c) for c in cols)
    order = np.argsort(mv, kind="stable")
    mv, mp, ms, mf, ml = mv[order], mp[order], ms[order], mf[order], ml[order]
    mv, mp, ms, mf, ml = _coalesce(mv, mp, ms, mf, space.half, level=ml)
    page = np.zeros(max(lv.number for lv in levels) + 1, dtype=np.uint64)
    for lv in levels:
        page[lv.number] = lv.span
    return RunArrays(space.canonical(mv), mp, ms, mf, page[ml], ml)


@dataclass(frozen=True)
class _LeafCpu:
    """How the walker turns a last-level entry into a leaf (``_Walk._emit_leaves``)."""

    level: Level
    maxphyaddr: int
    nxe: bool
    gbpages: bool
    leaf_flags: int
    mem: PhysicalMemory

    def leaf(self, entry: int, acc: int) -> tuple[int, int] | None:
        """(phys, flags) of a present entry, or None where the walk would
        have a finding (reserved bits, a frame outside RAM)."""
        if entry & reserved_mask(self.level.number, False, self.maxphyaddr, self.nxe, self.gbpages):
            return None
        phys = entry & leaf_addr_mask(self.level.number)
        base = int(getattr(self.mem, "base", 0))
        if phys < base or phys + self.level.span > base + int(self.mem.size):
            return None
        keep = self.leaf_flags & ~_PAT_HUGE
        flags = _PRESENT | (acc & entry & _WU) | ((acc | entry) & _NX) | (entry & keep)
        if self.leaf_flags & _PAT_HUGE:
            flags |= (entry & (1 << 7)) << 5  # a PTE's PAT bit (7) stands as PAT_HUGE (12)
        return phys, flags


def _patch_leaves(runs: RunArrays, trace: WalkTrace, now: np.ndarray, changed: np.ndarray, cpu: _LeafCpu,
                  levels: Sequence[Level]) -> RunArrays | None:
    """``runs`` with every changed last-level entry's page replaced (None: a finding)."""
    space = _space(levels)
    page = cpu.level.span
    tidx = np.flatnonzero(changed)
    r, c = np.nonzero(now[tidx] != trace.rows[tidx])
    edits: list[tuple[int, tuple[int, int] | None]] = []  # (linear page, (phys, flags) or unmapped)
    for ti, j in zip(tidx[r].tolist(), c.tolist()):
        entry = int(now[ti, j])
        va = int(trace.base[ti]) + j * page
        if entry & _PRESENT:
            leaf = cpu.leaf(entry, int(trace.acc[ti]))
            if leaf is None:
                return None
            edits.append((va, leaf))
        else:
            edits.append((va, None))
    spans = [(va, va + page) for va, _ in edits]
    pages = [(va, leaf[0], page, leaf[1]) for va, leaf in edits if leaf is not None]
    if pages:
        pv, pp, ps, pf = (np.array(x, dtype=np.uint64) for x in zip(*pages))
        number = np.full(pv.size, cpu.level.number, dtype=np.uint8)
        new = RunArrays(pv, pp, ps, pf, np.full(pv.size, page, dtype=np.uint64), number)
    else:
        e = np.zeros(0, dtype=np.uint64)
        new = RunArrays(e, e, e, e, e, np.zeros(0, dtype=np.uint8))
    return _splice(runs, spans, new, space, levels)
