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

A snapshot does the re-read in two halves: ``copy_tables`` (``TableCopier``), in its
pause, only copies (the traced tables in one gather, and the tables newly
reached below changed entries); ``refresh`` then runs on that copy
(``mm.physmem.FrameCopy``) after the guest runs again.

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
from .flags import ADDR_MASK, PteFlags
from .physmem import FrameCopy, PhysicalMemory, read_tables
from .walker import DEFAULT_LEAF_FLAGS, DEFAULT_MAX_TABLES, RunArrays, WalkTrace, _coalesce, _space, _Walk

__all__ = ["Refreshed", "TableCopier", "changed_tables", "copy_tables", "refresh", "spans_touch"]

_u64 = np.uint64
_PRESENT, _WU, _NX = int(PteFlags.PRESENT), int(PteFlags.WRITABLE | PteFlags.USER), int(PteFlags.NO_EXECUTE)
_PAT_HUGE = int(PteFlags.PAT_HUGE)
_PS = int(PteFlags.HUGE)


@dataclass(frozen=True)
class Refreshed:
    """A walk brought up to date: its runs, trace and report as of the re-read."""

    runs: RunArrays
    trace: WalkTrace
    report: WalkReport
    changed: int  # tables whose entries differed from the trace (0: nothing was re-walked)
    rewalked: int  # tables decoded again (the changed ones and everything below them)
    #: Linear ranges whose runs were replaced (outside them ``runs`` is the old walk's).
    spans: tuple[tuple[int, int], ...] = ()

    def touches(self, start: int, end: int, levels: Sequence[Level] = LEVELS) -> bool:
        """Did the refresh replace runs anywhere in canonical ``[start, end)``?"""
        return spans_touch(self.spans, start, end, levels)


def spans_touch(spans, start: int, end: int, levels: Sequence[Level] = LEVELS) -> bool:
    """Does any linear span overlap canonical ``[start, end)``?"""
    space = _space(levels)
    lo, hi = space.lin_start(start), space.lin_end(end)
    return any(a < hi and lo < b for a, b in spans)


def changed_tables(mem: PhysicalMemory, trace: WalkTrace) -> np.ndarray:
    """Which traced tables no longer hold the entries the walk read (one gather)."""
    if len(trace) == 0:
        return np.zeros(0, dtype=bool)
    return (read_tables(mem, trace.table) != trace.rows).any(axis=1)


#: Tables ``copy_tables`` copies beyond the traced ones (a guest that built
#: more than this since the walk gets re-walked while it runs).
MAX_NEW_TABLES = 128


def copy_tables(mem: PhysicalMemory, trace: WalkTrace, *, levels: Sequence[Level] = LEVELS,
                max_new: int = MAX_NEW_TABLES) -> FrameCopy:
    """Everything ``refresh`` of ``trace`` reads, copied now (see ``TableCopier``)."""
    return TableCopier(mem, trace, levels=levels, max_new=max_new).copy()


class TableCopier:
    """Copies what ``refresh`` of one trace reads, for a pause: prepared while
    the guest runs (where each traced table sits in ``mem``, which frames
    the trace holds), ``copy`` then only copies and compares: the traced
    tables in one gather and, below every entry that changed, the tables it
    reaches that the trace does not hold (one gather per level). Past
    ``max_new`` new tables, or at a child outside ``mem``, it stops
    following: ``refresh`` on the copy then raises ``NotCopied`` where it
    needs what is missing."""

    def __init__(self, mem: PhysicalMemory, trace: WalkTrace, *, levels: Sequence[Level] = LEVELS,
                 max_new: int = MAX_NEW_TABLES):
        self.mem, self.trace, self.max_new = mem, trace, max_new
        self.base, self.size = int(getattr(mem, "base", 0)), int(mem.size)
        indices = getattr(mem, "frame_indices", None)
        self._at = indices(trace.table) if indices is not None and len(trace) else None
        # Where the copy and the comparison go, allocated and touched now:
        # fresh memory would cost page faults inside the pause.
        self._now = np.zeros((len(trace), 512), dtype=np.uint64)
        self._diff = np.zeros((len(trace), 512), dtype=bool)
        self._known = set(trace.table.tolist())
        self._level = trace.level.tolist()
        self._last = len(levels) - 1
        self._huge = [lv.may_be_huge for lv in levels]

    def _child(self, entry: int, level: int) -> int | None:
        """The table a present entry of a ``level`` table points at (None: a leaf, or outside mem)."""
        if not entry & _PRESENT or level >= self._last or (self._huge[level] and entry & _PS):
            return None
        child = entry & ADDR_MASK
        return child if self.base <= child <= self.base + self.size - 4096 else None

    def copy(self) -> FrameCopy:
        trace, mem = self.trace, self.mem
        now = mem.gather_frames(self._at, self._now) if self._at is not None else read_tables(mem, trace.table)
        if not len(trace):
            return FrameCopy(self.base, self.size, trace.table, now)
        diff = np.not_equal(now, trace.rows, out=self._diff)
        changed = np.flatnonzero(diff.any(axis=1)).tolist()
        # Tables reached anew below changed entries (leaf tables have no children).
        todo: list[tuple[int, int]] = []  # (frame, its level)
        seen: set[int] = set()
        for r in changed:
            level = self._level[r]
            if level >= self._last:
                continue
            for entry in now[r, np.flatnonzero(diff[r])].tolist():
                child = self._child(entry, level)
                if child is not None and child not in self._known and child not in seen:
                    seen.add(child)
                    todo.append((child, level + 1))
        if not todo:
            return FrameCopy(self.base, self.size, trace.table, now)
        frames, rows, budget = [trace.table], [now], self.max_new
        while todo and budget > 0:
            todo = todo[:budget]
            got = read_tables(mem, np.array([f for f, _ in todo], dtype=np.uint64))
            frames.append(np.array([f for f, _ in todo], dtype=np.uint64))
            rows.append(got)
            budget -= len(todo)
            below: list[tuple[int, int]] = []
            for (_, level), table in zip(todo, got):
                if level >= self._last:
                    continue
                for entry in table[table & _u64(_PRESENT) != 0].tolist():  # every entry is new to the walk
                    child = self._child(entry, level)
                    if child is not None and child not in self._known and child not in seen:
                        seen.add(child)
                        below.append((child, level + 1))
            todo = below
        return FrameCopy(self.base, self.size, np.concatenate(frames), np.concatenate(rows))


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
    patch_only: bool = False,
) -> Refreshed | None:
    """``runs``/``trace``/``report`` (from ``walk_traced`` with the same CPU
    parameters and the same CR3) as a walk of ``mem`` now would give them;
    None where only a full walk can say (see the module comment), or, with
    ``patch_only``, where entries above the two lowest levels changed (a
    caller with a tight time budget then retries later)."""
    if report.findings or report.suppressed or report.truncated:
        return None
    now = read_tables(mem, trace.table) if len(trace) else trace.rows
    changed = (now != trace.rows).any(axis=1)
    if not changed.any():
        return Refreshed(runs, trace, report, 0, 0)
    last = len(levels) - 1
    # Tables whose entries changed only in bits the walk ignores (a kernel's
    # own counts in AVL bits, A) need their rows updated, nothing re-walked.
    read_bits = _read_bits(int(leaf_flags))
    moved = changed.copy()
    moved[changed] = _entries_moved(now[changed], trace.rows[changed], trace.level[changed], levels, read_bits).any(axis=1)
    current = WalkTrace(trace.level, trace.table, trace.base, trace.acc, trace.anc, now)
    if not moved.any():
        return Refreshed(runs, current, report, int(changed.sum()), 0)
    if len(levels) >= 2 and (trace.level[moved] >= last - 1).all():
        # Only entries of the two lowest levels moved (the common case: pages
        # mapped or unmapped, a leaf table added or freed): patch those
        # pages into the runs, decoding at most the new leaf tables.
        patched = _Patcher(mem, trace, now, changed, levels, maxphyaddr, nxe, gbpages, int(leaf_flags),
                           max_tables).patch(runs)
        if patched is not None:
            new_runs, new_trace, added, spans = patched
            out_report = report if added == 0 and len(new_trace) == len(trace) else _report_of(new_trace, levels,
                                                                                                report.max_findings)
            return Refreshed(new_runs, new_trace, out_report, int(changed.sum()), added, tuple(spans))
    if patch_only:
        return None
    top = moved & ~_below(trace, moved)
    gone = top | _below(trace, top)
    kept = current[~gone]

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

    spans = [(int(b), int(b) + levels[li].table_span)
             for li, b in zip(trace.level[top].tolist(), trace.base[top].tolist())]
    merged = _splice(runs, spans, new_runs, space, levels)
    out_report = _report_of(new_trace, levels, report.max_findings)
    return Refreshed(merged, new_trace, out_report, int(changed.sum()), len(new_trace) - len(kept), tuple(spans))


def _read_bits(leaf_flags: int) -> tuple[int, int]:
    """Entry bits a walk reads: (in an entry pointing at a table, in a leaf).

    A table pointer counts by presence, rights, PS and address (A, AVL,
    PWT/PCD are ignored: a kernel may keep its own counts there); a leaf by
    those, the kept flags and, if kept, its PAT bit."""
    table = _PRESENT | _WU | _NX | _PS | ADDR_MASK
    leaf = table | (leaf_flags & ~_PAT_HUGE) | ((1 << 7) if leaf_flags & _PAT_HUGE else 0)
    return table, leaf


def _entries_moved(now: np.ndarray, before: np.ndarray, level: np.ndarray, levels: Sequence[Level],
                   read_bits: tuple[int, int]) -> np.ndarray:
    """Per entry of the given tables: did a bit the walk reads change?"""
    table_bits, leaf_bits = (_u64(b) for b in read_bits)
    last = len(levels) - 1
    huge_ok = np.array([lv.may_be_huge for lv in levels])[level][:, None]
    leafy = (level == last)[:, None] | (huge_ok & (((now | before) & _u64(_PS)) != 0))
    return ((now ^ before) & np.where(leafy, leaf_bits, table_bits)) != 0


def _report_of(trace: WalkTrace, levels: Sequence[Level], max_findings: int) -> WalkReport:
    """The report of a walk without findings that decoded ``trace``'s tables."""
    tables = {levels[li].number: np.unique(trace.table[trace.level == li]) for li in np.unique(trace.level).tolist()}
    return WalkReport(tables=tables, tables_visited=len(trace), max_findings=max_findings)


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


class _Patcher:
    """Patches a walk where only entries of the two lowest levels changed,
    deciding every entry the way ``_Walk`` does (or giving up with None
    wherever the walk would have a finding)."""

    def __init__(self, mem, trace: WalkTrace, now: np.ndarray, changed: np.ndarray, levels: Sequence[Level],
                 maxphyaddr: int, nxe: bool, gbpages: bool, leaf_flags: int, max_tables: int):
        self.mem, self.trace, self.now, self.changed, self.levels = mem, trace, now, changed, levels
        self.maxphyaddr, self.nxe, self.gbpages, self.max_tables = maxphyaddr, nxe, gbpages, max_tables
        self.keep = leaf_flags & ~_PAT_HUGE
        self.keep_pat = bool(leaf_flags & _PAT_HUGE)
        self.dir_bits, self.leaf_bits = _read_bits(leaf_flags)
        base = int(getattr(mem, "base", 0))
        self.ram = (base, base + int(mem.size))
        self.last = len(levels) - 1

    def leaf(self, entry: int, acc: int, lv: Level) -> tuple[int, int] | None:
        """(phys, effective flags) of a present leaf (``_Walk._emit_leaves``),
        None where the walk has a finding (reserved bits, outside RAM)."""
        if entry & reserved_mask(lv.number, lv.may_be_huge, self.maxphyaddr, self.nxe, self.gbpages):
            return None
        phys = entry & leaf_addr_mask(lv.number)
        if phys < self.ram[0] or phys + lv.span > self.ram[1]:
            return None
        flags = _PRESENT | (acc & entry & _WU) | ((acc | entry) & _NX) | (entry & self.keep)
        if self.keep_pat:
            # A PTE's PAT bit (7) stands as PAT_HUGE (12), a large leaf's is bit 12 already.
            flags |= (entry & (1 << 7)) << 5 if lv.is_last else entry & _PAT_HUGE
        return phys, flags

    def patch(self, runs: RunArrays) -> tuple[RunArrays, WalkTrace, int, list[tuple[int, int]]] | None:
        """(runs, trace, tables decoded anew, linear spans replaced) or None."""
        tr, now, last, levels = self.trace, self.now, self.last, self.levels
        leaf_lv, dir_lv = levels[last], levels[last - 1]
        tidx = np.flatnonzero(self.changed)
        r, c = np.nonzero(now[tidx] != tr.rows[tidx])
        edits = list(zip(tidx[r].tolist(), c.tolist()))
        spans: list[tuple[int, int]] = []
        pages: list[tuple[int, int, int, int, int]] = []  # (linear virt, phys, size, flags, level number)
        drop: set[int] = set()  # trace rows of leaf tables no longer reached as they were
        added: list[tuple[int, int, int, list[int], np.ndarray]] = []  # (table, base, acc, anc, rows)
        where = {(li, b): i for i, (li, b) in enumerate(zip(tr.level.tolist(), tr.base.tolist()))}
        levels_of = tr.level.tolist()
        # Directory entries first: they decide which leaf tables still count.
        for ti, j in edits:
            if levels_of[ti] != last - 1:
                continue
            before, entry = int(tr.rows[ti, j]), int(now[ti, j])
            if not (before ^ entry) & (self.leaf_bits if (before | entry) & _PS else self.dir_bits):
                continue
            va = int(tr.base[ti]) + j * dir_lv.span
            spans.append((va, va + dir_lv.span))
            below = where.get((last, va))
            if below is not None:
                drop.add(below)
            if not entry & _PRESENT:
                continue
            acc = int(tr.acc[ti])
            if dir_lv.may_be_huge and entry & _PS:
                leaf = self.leaf(entry, acc, dir_lv)
                if leaf is None:
                    return None
                pages.append((va, leaf[0], dir_lv.span, leaf[1], dir_lv.number))
                continue
            if entry & reserved_mask(dir_lv.number, False, self.maxphyaddr, self.nxe, self.gbpages):
                return None
            child = entry & ADDR_MASK
            anc = tr.anc[ti].tolist()
            anc[last - 1] = int(tr.table[ti])
            if not (self.ram[0] <= child and child + 4096 <= self.ram[1]) or child in anc[:last]:
                return None  # outside RAM or a cycle: findings
            cacc = (acc & (entry | ~_WU)) | ((acc | entry) & _NX)
            rows = np.asarray(self.mem.read_table(child), dtype=np.uint64)
            added.append((child, va, cacc, anc, rows))
            for k in np.flatnonzero(rows & _u64(_PRESENT)).tolist():
                leaf = self.leaf(int(rows[k]), cacc, leaf_lv)
                if leaf is None:
                    return None
                pages.append((va + k * leaf_lv.span, leaf[0], leaf_lv.span, leaf[1], leaf_lv.number))
        # Then leaf entries of leaf tables still reached the same way.
        for ti, j in edits:
            if levels_of[ti] != last or ti in drop or not (int(now[ti, j]) ^ int(tr.rows[ti, j])) & self.leaf_bits:
                continue
            va = int(tr.base[ti]) + j * leaf_lv.span
            spans.append((va, va + leaf_lv.span))
            entry = int(now[ti, j])
            if entry & _PRESENT:
                leaf = self.leaf(entry, int(tr.acc[ti]), leaf_lv)
                if leaf is None:
                    return None
                pages.append((va, leaf[0], leaf_lv.span, leaf[1], leaf_lv.number))

        rows = tr.rows.copy()
        rows[self.changed] = now[self.changed]
        new_trace = WalkTrace(tr.level, tr.table, tr.base, tr.acc, tr.anc, rows)
        if drop:
            keep = np.ones(len(tr), dtype=bool)
            keep[list(drop)] = False
            new_trace = new_trace[keep]
        if added:
            t, b, a, anc, rw = zip(*added)
            extra = WalkTrace(np.full(len(t), last, np.uint8), np.array(t, np.uint64), np.array(b, np.uint64),
                              np.array(a, np.uint64), np.array(anc, np.uint64), np.stack(rw))
            new_trace = WalkTrace.concat(new_trace, extra)
            if len(new_trace) > self.max_tables:
                return None
            # A full walk expands a frame once per level and reports the second reference.
            key = new_trace.table | new_trace.level.astype(np.uint64)
            if np.unique(key).size != key.size:
                return None
        if pages:
            pv, pp, ps, pf, pl = zip(*pages)
            new = RunArrays(np.array(pv, np.uint64), np.array(pp, np.uint64), np.array(ps, np.uint64),
                            np.array(pf, np.uint64), np.array(ps, np.uint64), np.array(pl, np.uint8))
        else:
            e = np.zeros(0, dtype=np.uint64)
            new = RunArrays(e, e, e, e, e, np.zeros(0, dtype=np.uint8))
        return _splice(runs, spans, new, _space(levels), levels), new_trace, len(added), spans
