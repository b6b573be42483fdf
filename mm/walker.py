"""Reading live (possibly hostile) page tables: one walker loop, levels as data.

The primitive is :func:`walk_arrays`: a breadth-first walk that reads every
table of a level as one ``(k, 512)`` uint64 array and decides presence,
leaves, reserved bits and permissions for all entries at once. It yields
*coalesced runs* of virtual memory; :func:`walk`, :func:`translate`,
:func:`read_virt`, :func:`write_virt` and :func:`reverse` derive from it
(Volatility's ``mapping()`` idea).

Hostile input never makes it read outside ``mem``, raise, or run unbounded:
each table frame is expanded at most once per level, at most ``max_tables``
tables are read, and every anomaly becomes a :class:`~mm.findings.Finding`.
Where the hardware would still translate (a leaf outside RAM, a recursive
slot) the walk reports the mapping *and* a finding; where it would fault
(reserved bits set) the subtree is dropped, as the hardware drops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .addr import PAGE_4K, PHYS_ADDR_BITS, PageSize, is_canonical
from .entry import LEVELS, Level, leaf_addr_mask, reserved_mask
from .levels import ENTRIES_PER_TABLE, linear_bits
from .errors import AddressError, NotMapped
from .findings import Finding, Severity, WalkReport
from .flags import ADDR_MASK, PteFlags
from .physmem import PhysicalMemory, read_tables

__all__ = [
    "Run",
    "RunArrays",
    "Translation",
    "DEFAULT_LEAF_FLAGS",
    "DEFAULT_MAX_TABLES",
    "walk",
    "walk_arrays",
    "walk_traced",
    "WalkTrace",
    "translate",
    "read_virt",
    "write_virt",
    "reverse",
    "coalesce",
]

#: Leaf bits copied into ``Run.flags`` besides the combined P/W/U/NX.
#: ACCESSED and DIRTY are left out by default so that the CPU setting them
#: does not split runs; pass ``leaf_flags=DEFAULT_LEAF_FLAGS | ACCESSED | DIRTY``
#: to see them.
DEFAULT_LEAF_FLAGS = PteFlags.GLOBAL | PteFlags.WRITE_THROUGH | PteFlags.CACHE_DISABLE | PteFlags.PAT_HUGE
#: Cap on the tables one walk reads (64 GiB mapped with 4 KiB pages needs ~33k).
DEFAULT_MAX_TABLES = 1 << 16
#: Tables decoded per numpy batch (bounds the walk's working memory to a few MiB).
CHUNK_TABLES = 512

_u64 = np.uint64
_P = _u64(PteFlags.PRESENT)
_WU = _u64(PteFlags.WRITABLE | PteFlags.USER)
_NOT_WU = ~_WU
_NX = _u64(PteFlags.NO_EXECUTE)
_PS = _u64(PteFlags.HUGE)
_PAT4K = _u64(1 << 7)  # bit 7 of a 4 KiB PTE is its PAT bit (SDM table 4-20)
_PAT_BIG = _u64(PteFlags.PAT_HUGE)  # bit 12 of a large leaf is its PAT bit
_ADDR = _u64(ADDR_MASK)
_COLS = np.arange(ENTRIES_PER_TABLE, dtype=np.uint64)
_PAGE_SIZES = {int(ps): ps for ps in PageSize}


@dataclass(frozen=True, slots=True)
class Run:
    """``size`` bytes at canonical ``virt`` mapped to ``phys`` with pages of ``page_size``.

    ``flags`` are the *effective* flags: WRITABLE/USER only if set at every
    level, NO_EXECUTE if set at any level, plus the leaf's ``leaf_flags`` bits
    (PAT_HUGE standing for the leaf's PAT bit whatever its level).
    """

    virt: int
    phys: int
    size: int
    flags: PteFlags
    page_size: PageSize
    level: int

    @property
    def end(self) -> int:
        return self.virt + self.size

    def __contains__(self, virt: int) -> bool:
        return self.virt <= virt < self.virt + self.size


@dataclass(frozen=True, slots=True)
class Translation:
    """Where one virtual address goes: physical address, effective flags, page."""

    virt: int
    phys: int
    flags: PteFlags
    page_size: PageSize
    level: int


@dataclass(frozen=True)
class RunArrays:
    """Coalesced runs as parallel numpy arrays (sorted by ``virt``)."""

    virt: np.ndarray
    phys: np.ndarray
    size: np.ndarray
    flags: np.ndarray
    page_size: np.ndarray
    level: np.ndarray

    def __len__(self) -> int:
        return int(self.virt.size)

    def __getitem__(self, index: np.ndarray | slice) -> "RunArrays":
        """The runs selected by a boolean mask, index array or slice."""
        return RunArrays(*(a[index] for a in (self.virt, self.phys, self.size, self.flags, self.page_size, self.level)))

    def runs(self) -> Iterator[Run]:
        cols = (a.tolist() for a in (self.virt, self.phys, self.size, self.flags, self.page_size, self.level))
        flags: dict[int, PteFlags] = {}  # few distinct values; enum construction is slow
        for v, p, s, f, ps, lv in zip(*cols):
            fl = flags.get(f)
            if fl is None:
                fl = flags[f] = PteFlags(f)
            yield Run(v, p, s, fl, _PAGE_SIZES[ps], lv)


# -- address space geometry ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Space:
    """Linear-address geometry implied by the levels (48 bits for 4-level, 57 for 5-level)."""

    bits: int

    @property
    def half(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def top(self) -> int:
        return 1 << self.bits

    @property
    def upper(self) -> int:
        """The first canonical address of the upper half (the end of the hole)."""
        return (1 << 64) - self.half

    @property
    def high(self) -> int:
        return (1 << 64) - self.top  # sign-extension bits of an upper-half address

    def lin_start(self, v: int) -> int:
        if v <= 0:
            return 0
        if v < self.half:
            return v
        if v < (1 << 64) - self.half:
            return self.half  # in the hole: the next canonical address is the upper half
        return min(v - self.high, self.top)

    def lin_end(self, v: int | None) -> int:
        if v is None or v >= 1 << 64:
            return self.top
        if v <= self.half:
            return max(v, 0)
        if v < (1 << 64) - self.half:
            return self.half
        return v - self.high

    def canonical_int(self, lin: int) -> int:
        return lin | self.high if lin >= self.half else lin

    def canonical(self, lin: np.ndarray) -> np.ndarray:
        return np.where(lin >= _u64(self.half), lin | _u64(self.high), lin)


def _space(levels: Sequence[Level]) -> _Space:
    return _Space(linear_bits(levels))


# -- coalescing ------------------------------------------------------------------


def _coalesce(virt: np.ndarray, phys: np.ndarray, size: np.ndarray, flags: np.ndarray, half: int,
              level: np.ndarray | None = None):
    """Merge neighbours that are virtually and physically contiguous with equal
    flags (and equal ``level``, if given: leaves of different sizes never merge)."""
    n = virt.size
    if n <= 1:
        return (virt, phys, size, flags) if level is None else (virt, phys, size, flags, level)
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(virt[1:], virt[:-1] + size[:-1], out=brk[1:])
    brk[1:] |= phys[1:] != phys[:-1] + size[:-1]
    brk[1:] |= flags[1:] != flags[:-1]
    brk[1:] |= virt[1:] == _u64(half)  # never merge across the canonical hole
    if level is not None:
        brk[1:] |= level[1:] != level[:-1]
    starts = np.flatnonzero(brk)
    if starts.size == n:
        return (virt, phys, size, flags) if level is None else (virt, phys, size, flags, level)
    csum = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(size, out=csum[1:])
    ends = np.append(starts[1:], n)
    out = virt[starts], phys[starts], csum[ends] - csum[starts], flags[starts]
    return out if level is None else (*out, level[starts])


def coalesce(runs: Iterable[Run], levels: Sequence[Level] = LEVELS) -> list[Run]:
    """Scalar coalescing of runs sorted by ``virt`` (the reference for tests)."""
    upper = _space(levels).upper  # never merge across the canonical hole
    out: list[Run] = []
    for r in runs:
        if out:
            last = out[-1]
            if (
                last.end == r.virt
                and last.phys + last.size == r.phys
                and last.flags == r.flags
                and last.page_size == r.page_size
                and r.virt != upper
            ):
                out[-1] = Run(last.virt, last.phys, last.size + r.size, last.flags, last.page_size, last.level)
                continue
        out.append(r)
    return out


# -- the walk ----------------------------------------------------------------------


class _Walk:
    """State of one breadth-first walk (one instance per call)."""

    def __init__(
        self,
        mem: PhysicalMemory,
        report: WalkReport,
        levels: Sequence[Level],
        maxphyaddr: int,
        nxe: bool,
        gbpages: bool,
        max_tables: int,
        leaf_flags: int,
        trace: bool = False,
    ) -> None:
        self.mem, self.report, self.levels = mem, report, levels
        #: Per decoded batch: (level index, tables, bases, acc, ancestors, rows) (see WalkTrace).
        self.trace: list[tuple[int, np.ndarray, ...]] | None = [] if trace else None
        self.maxphyaddr, self.nxe, self.gbpages = maxphyaddr, nxe, gbpages
        self.max_tables = max_tables
        self.keep = _u64(int(leaf_flags) & ~int(PteFlags.PAT_HUGE))
        self.keep_pat = bool(int(leaf_flags) & PteFlags.PAT_HUGE)
        self.space = _space(levels)
        base = int(getattr(mem, "base", 0))
        self.ram = (base, base + int(mem.size))
        self.runs: list[tuple[np.ndarray, ...]] = []

    # findings -----------------------------------------------------------

    def _find(self, kind: str, lin: int | None, size: int, detail: str, sev: Severity, **kw: int | None) -> None:
        virt = None if lin is None else self.space.canonical_int(int(lin))
        self.report.add(Finding(kind, virt, size, detail, sev, **kw))

    def _find_per_table(
        self, kind: str, mask: np.ndarray, rows: np.ndarray, tbl: np.ndarray, base: np.ndarray, lv: Level, what: str, sev: Severity
    ) -> None:
        """One finding per table that has entries flagged in ``mask``."""
        hit_rows = np.flatnonzero(mask.any(axis=1))
        room = self.report.room
        for r in hit_rows[:room].tolist():
            cols = np.flatnonzero(mask[r])
            c = int(cols[0])
            e = int(rows[r, c])
            self._find(
                kind,
                int(base[r]) + (c << lv.shift),
                lv.span,
                f"{cols.size} {lv.name} entr{'y' if cols.size == 1 else 'ies'} of table {int(tbl[r]):#_x} {what}"
                f" (first: index {c}, entry {e:#018x})",
                sev,
                level=lv.number,
                table=int(tbl[r]),
                entry=e,
            )
        self.report.suppressed += max(0, hit_rows.size - room)

    # levels --------------------------------------------------------------

    def run(self, cr3: int, lo: int, hi: int) -> None:
        phys_bits = (1 << PHYS_ADDR_BITS) - 1
        if cr3 & phys_bits & ~((1 << self.maxphyaddr) - 1):
            # MOV to CR3 with bits above MAXPHYADDR raises #GP: nothing is mapped.
            self._find("reserved_bits", None, 0, f"CR3 {cr3:#_x} has bits above MAXPHYADDR={self.maxphyaddr}",
                       Severity.ERROR, entry=cr3)
            return
        root = cr3 & ADDR_MASK  # bits 11:0 are PWT/PCD or the PCID, bit 63 is not stored
        if not self._table_in_ram(root):
            self._find("cr3_outside_ram", None, 0, f"CR3 {cr3:#_x} points outside RAM "
                       f"[{self.ram[0]:#_x}, {self.ram[1]:#_x})", Severity.ERROR, entry=cr3)
            return
        tbl = np.array([root], dtype=np.uint64)
        base = np.zeros(1, dtype=np.uint64)
        acc = np.array([_WU], dtype=np.uint64)  # W and U start allowed, NX clear
        anc = np.zeros((1, 0), dtype=np.uint64)
        self.descend({0: (tbl, base, acc, anc)}, lo, hi)

    def descend(self, frontier: dict[int, tuple[np.ndarray, ...]], lo: int, hi: int) -> None:
        """Walk down from ``frontier``: level index -> (tables, linear bases,
        accumulated W/U/NX, ancestors (k, level index)) to decode at that level,
        together with the children found above them (``run`` starts at the
        root; ``mm.rewalk`` restarts at tables that changed)."""
        rep = self.report
        cur: tuple[np.ndarray, ...] | None = None  # (tables, bases, acc, ancestors) at this level
        for li, lv in enumerate(self.levels):
            more = frontier.get(li)
            if more is not None:
                rep.tables_visited += more[0].size
                cur = more if cur is None else tuple(np.concatenate(pair) for pair in zip(cur, more))
            if cur is None or cur[0].size == 0 or lo >= hi:
                cur = None
                continue
            tbl, base, acc, anc = cur
            rep.tables[lv.number] = np.unique(tbl)
            last = li == len(self.levels) - 1
            children = []
            for c0 in range(0, tbl.size, CHUNK_TABLES):
                s = slice(c0, c0 + CHUNK_TABLES)
                out = self._level_chunk(li, last, tbl[s], base[s], acc[s], anc[s], lo, hi)
                if out is not None:
                    children.append(out)
            cur = None
            if not last and children:
                cur = self._next_frontier(lv, self.levels[li + 1], *map(np.concatenate, zip(*children)))

    def _table_in_ram(self, paddr: int) -> bool:
        return self.ram[0] <= paddr and paddr + PAGE_4K <= self.ram[1]

    def _level_chunk(self, li, last, tbl, base, acc, anc, lo, hi):
        """Decode one batch of tables of level ``levels[li]``; returns the child tables found."""
        lv = self.levels[li]
        rows = read_tables(self.mem, tbl)
        if self.trace is not None:
            self.trace.append((li, tbl, base, acc, anc, rows))
        shift = _u64(lv.shift)
        present = (rows & _P).astype(bool)

        # Restrict to [lo, hi): only tables straddling a bound need the per-entry test.
        tspan = lv.table_span
        partial = (base < _u64(lo)) | (base + _u64(tspan) > _u64(hi))
        if partial.any():
            pr = np.flatnonzero(partial)
            vb = base[pr, None] + (_COLS << shift)[None, :]
            present[pr] &= (vb < _u64(hi)) & (vb + _u64(lv.span) > _u64(lo))

        if last:
            leaf = present
        elif lv.may_be_huge:
            leaf = present & (rows & _PS).astype(bool)
        else:
            leaf = np.zeros_like(present)

        # Reserved bits set in a present entry: the hardware faults (RSVD), the subtree is dead.
        rsv_table = _u64(reserved_mask(lv.number, False, self.maxphyaddr, self.nxe, self.gbpages))
        rsv_leaf = _u64(reserved_mask(lv.number, lv.may_be_huge, self.maxphyaddr, self.nxe, self.gbpages))
        bad = present & ((rows & np.where(leaf, rsv_leaf, rsv_table)) != 0)
        if bad.any():
            self._find_per_table("reserved_bits", bad, rows, tbl, base, lv, "have reserved bits set (walk faults)",
                                 Severity.ERROR)
            present &= ~bad
            leaf &= ~bad

        r, c = np.nonzero(leaf)
        if r.size:
            self._emit_leaves(lv, rows[r, c], base[r] + (c.astype(np.uint64) << shift), acc[r])

        if last:
            return None
        r, c = np.nonzero(present & ~leaf)
        if r.size == 0:
            return None
        e = rows[r, c]
        cacc = (acc[r] & (e | _NOT_WU)) | ((acc[r] | e) & _NX)
        canc = np.concatenate([anc[r], tbl[r, None]], axis=1)
        return e & _ADDR, base[r] + (c.astype(np.uint64) << shift), cacc, canc, tbl[r], e

    def _emit_leaves(self, lv: Level, e: np.ndarray, virt: np.ndarray, acc: np.ndarray) -> None:
        phys = e & _u64(leaf_addr_mask(lv.number))
        flags = _P | (acc & e & _WU) | ((acc | e) & _NX) | (e & self.keep)
        if self.keep_pat:
            pat = (e & _PAT4K) << _u64(5) if lv.is_last else e & _PAT_BIG
            flags |= pat
        size = np.full(virt.size, lv.span, dtype=np.uint64)
        v, p, s, f = _coalesce(virt, phys, size, flags, self.space.half)
        self.runs.append((v, p, s, f, lv))

    def _next_frontier(self, lv: Level, child_lv: Level, child, cbase, cacc, canc, parent, entry):
        """Filter child tables: outside RAM, cycles, shared frames, the table cap."""
        rep = self.report
        keep = np.ones(child.size, dtype=bool)

        out = (child < _u64(self.ram[0])) | (child + _u64(PAGE_4K) > _u64(self.ram[1]))
        if out.any():
            self._find_entries("table_outside_ram", out, cbase, parent, entry, lv,
                               lambda i: f"{lv.name} entry points at {int(child[i]):#_x}, outside RAM; subtree skipped",
                               Severity.ERROR)
            keep &= ~out

        cyc = keep & (canc == child[:, None]).any(axis=1)
        if cyc.any():
            self._find_entries("cycle", cyc, cbase, parent, entry, lv,
                               lambda i: f"{lv.name} entry points back at ancestor table {int(child[i]):#_x}"
                               f" (read again as a {child_lv.name})", Severity.WARNING)

        # Each frame is expanded once per level: later references are reported, not re-walked.
        idx = np.flatnonzero(keep)
        _, first = np.unique(child[idx], return_index=True)
        dup = keep.copy()
        dup[idx[first]] = False
        if dup.any():
            keep &= ~dup
            self._find_entries("shared_table", dup, cbase, parent, entry, lv,
                               lambda i: f"{child_lv.name} {int(child[i]):#_x} is referenced again; "
                               "this alias is not expanded", Severity.WARNING)

        idx = np.flatnonzero(keep)
        room = self.max_tables - rep.tables_visited
        if idx.size > room:
            rep.truncated = True
            cut = idx[max(room, 0)]
            self._find("table_limit", int(cbase[cut]), 0,
                       f"stopped after max_tables={self.max_tables} tables; {idx.size - max(room, 0)} "
                       f"{child_lv.name} tables not read", Severity.ERROR)
            idx = idx[: max(room, 0)]
        rep.tables_visited += idx.size
        return child[idx], cbase[idx], cacc[idx], canc[idx]

    def _find_entries(self, kind, mask, cbase, parent, entry, lv, detail: Callable[[int], str], sev) -> None:
        idx = np.flatnonzero(mask)
        room = self.report.room
        for i in idx[:room].tolist():
            self._find(kind, int(cbase[i]), lv.span, detail(i), sev, level=lv.number,
                       table=int(parent[i]), entry=int(entry[i]))
        self.report.suppressed += max(0, idx.size - room)

    def result(self, lo: int, hi: int) -> RunArrays:
        """Merge the per-level runs, clip them to ``[lo, hi)`` and check them against RAM."""
        per_level: list[tuple[np.ndarray, ...]] = []
        by_level: dict[Level, list[tuple[np.ndarray, ...]]] = {}
        for v, p, s, f, lv in self.runs:
            by_level.setdefault(lv, []).append((v, p, s, f))
        for lv, parts in by_level.items():
            v, p, s, f = (np.concatenate(x) for x in zip(*parts))
            v, p, s, f = _coalesce(v, p, s, f, self.space.half)
            per_level.append((v, p, s, f, np.full(v.size, lv.span, np.uint64), np.full(v.size, lv.number, np.uint8)))
        if not per_level:
            e = np.zeros(0, dtype=np.uint64)
            return RunArrays(e, e, e, e, e, np.zeros(0, dtype=np.uint8))
        v, p, s, f, ps, lvl = (np.concatenate(x) for x in zip(*per_level))
        if len(per_level) > 1:
            order = np.argsort(v, kind="stable")
            v, p, s, f, ps, lvl = v[order], p[order], s[order], f[order], ps[order], lvl[order]
        # Clip the first and last run to the requested range (whole leaves were decoded).
        if v.size:
            if int(v[0]) < lo:
                d = _u64(lo - int(v[0]))
                v[0] += d
                p[0] += d
                s[0] -= d
            if int(v[-1] + s[-1]) > hi:
                s[-1] = _u64(hi - int(v[-1]))
        self._check_ram(v, p, s)
        return RunArrays(self.space.canonical(v), p, s, f, ps, lvl)

    def _check_ram(self, v: np.ndarray, p: np.ndarray, s: np.ndarray) -> None:
        lo, hi = self.ram
        out = (p < _u64(lo)) | (p + s > _u64(hi))
        idx = np.flatnonzero(out)
        room = self.report.room
        for i in idx[:room].tolist():
            pi, si = int(p[i]), int(s[i])
            whole = pi >= hi or pi + si <= lo
            self._find("leaf_outside_ram", int(v[i]), si,
                       f"maps phys [{pi:#_x}, {pi + si:#_x}), {'entirely' if whole else 'partly'} outside RAM "
                       f"[{lo:#_x}, {hi:#_x})", Severity.WARNING if whole else Severity.INFO)
        self.report.suppressed += max(0, idx.size - room)


def walk_arrays(
    mem: PhysicalMemory,
    cr3: int,
    start: int = 0,
    end: int | None = None,
    *,
    report: WalkReport | None = None,
    on_finding: Callable[[Finding], None] | None = None,
    max_tables: int = DEFAULT_MAX_TABLES,
    maxphyaddr: int = PHYS_ADDR_BITS,
    nxe: bool = True,
    gbpages: bool = True,
    leaf_flags: PteFlags | int = DEFAULT_LEAF_FLAGS,
    levels: Sequence[Level] = LEVELS,
) -> RunArrays:
    """Walk the tree at ``cr3`` over canonical ``[start, end)``; coalesced runs as arrays.

    ``end=None`` means the top of the address space. Runs are clipped to the
    range. Findings go to ``report`` (and ``on_finding``); ``nxe``/``gbpages``/
    ``maxphyaddr`` describe the CPU (EFER.NXE, 1 GiB page support, CPUID).
    """
    if report is None:
        report = WalkReport(on_finding=on_finding)
    elif on_finding is not None:
        report.on_finding = on_finding
    w = _Walk(mem, report, levels, maxphyaddr, nxe, gbpages, max_tables, int(leaf_flags))
    lo, hi = w.space.lin_start(start), w.space.lin_end(end)
    w.run(int(cr3), lo, hi)
    return w.result(lo, hi)


#: Ancestor slot of a table nearer the root than the slot's level (WalkTrace.anc padding).
NO_TABLE = (1 << 64) - 1


@dataclass(frozen=True)
class WalkTrace:
    """Every table one walk decoded, where it sits in the tree, and the entries
    it read there: enough to bring the walk up to date later by re-reading the
    tables and re-walking only below those that changed (``mm.rewalk``).

    Row ``i`` is the table at frame ``table[i]``, decoded at level index
    ``level[i]`` (into ``levels``), whose entry 0 maps linear address
    ``base[i]``, reached with ``acc[i]`` (W/U allowed by every ancestor, NX set
    by any), below the ancestors ``anc[i, :level[i]]`` (root first; the rest
    of the row is ``NO_TABLE``); ``rows[i]`` are its 512 entries as read.
    """

    level: np.ndarray
    table: np.ndarray
    base: np.ndarray
    acc: np.ndarray
    anc: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.table.size)

    def __getitem__(self, index) -> "WalkTrace":
        return WalkTrace(*(a[index] for a in (self.level, self.table, self.base, self.acc, self.anc, self.rows)))

    @classmethod
    def of(cls, parts: list[tuple], depth: int) -> "WalkTrace":
        """From ``_Walk.trace`` batches (``depth``: the number of levels)."""
        if not parts:
            z = np.zeros(0, dtype=np.uint64)
            return cls(np.zeros(0, dtype=np.uint8), z, z, z, np.zeros((0, depth), np.uint64),
                       np.zeros((0, ENTRIES_PER_TABLE), np.uint64))
        cols: list[list[np.ndarray]] = [[], [], [], [], [], []]
        for li, tbl, base, acc, anc, rows in parts:
            padded = np.full((tbl.size, depth), _u64(NO_TABLE), dtype=np.uint64)
            padded[:, :li] = anc
            for col, a in zip(cols, (np.full(tbl.size, li, np.uint8), tbl, base, acc, padded, rows)):
                col.append(a)
        return cls(*(np.concatenate(c) for c in cols))

    @classmethod
    def concat(cls, a: "WalkTrace", b: "WalkTrace") -> "WalkTrace":
        return cls(*(np.concatenate(x) for x in zip(
            (a.level, a.table, a.base, a.acc, a.anc, a.rows), (b.level, b.table, b.base, b.acc, b.anc, b.rows))))


def walk_traced(
    mem: PhysicalMemory,
    cr3: int,
    *,
    report: WalkReport | None = None,
    max_tables: int = DEFAULT_MAX_TABLES,
    maxphyaddr: int = PHYS_ADDR_BITS,
    nxe: bool = True,
    gbpages: bool = True,
    leaf_flags: PteFlags | int = DEFAULT_LEAF_FLAGS,
    levels: Sequence[Level] = LEVELS,
) -> tuple[RunArrays, WalkTrace]:
    """``walk_arrays`` over the whole address space, plus the trace of every
    table it decoded (for ``mm.rewalk.refresh``)."""
    report = report if report is not None else WalkReport()
    w = _Walk(mem, report, levels, maxphyaddr, nxe, gbpages, max_tables, int(leaf_flags), trace=True)
    w.run(int(cr3), 0, w.space.top)
    return w.result(0, w.space.top), WalkTrace.of(w.trace, len(levels))


def walk(mem: PhysicalMemory, cr3: int, start: int = 0, end: int | None = None, **kw) -> Iterator[Run]:
    """Coalesced :class:`Run` s of ``[start, end)``, in address order (see :func:`walk_arrays`)."""
    return walk_arrays(mem, cr3, start, end, **kw).runs()


# -- derived queries -----------------------------------------------------------------


def translate(mem: PhysicalMemory, cr3: int, virt: int, **kw) -> Translation | None:
    """The hardware's translation of ``virt``, or None if it would fault (P=0/RSVD)."""
    if not is_canonical(virt, linear_bits(kw.get("levels", LEVELS))):
        return None
    ra = walk_arrays(mem, cr3, virt, virt + 1, **kw)
    if len(ra) == 0:
        return None
    r = next(ra.runs())
    return Translation(virt, r.phys, r.flags, r.page_size, r.level)


def _pieces(mem: PhysicalMemory, cr3: int, virt: int, n: int, **kw) -> list[tuple[int, int]]:
    """``(phys, length)`` pieces backing ``[virt, virt+n)``; NotMapped at the first hole."""
    if not is_canonical(virt, linear_bits(kw.get("levels", LEVELS))) or n < 0 or virt + n > 1 << 64:
        raise AddressError(virt, f"range of {n:#_x} bytes is not canonical")
    out: list[tuple[int, int]] = []
    cur = virt
    for r in walk(mem, cr3, virt, virt + n, **kw):
        if r.virt != cur:
            break
        out.append((r.phys, r.size))
        cur = r.end
    if cur < virt + n:
        raise NotMapped(cur)
    return out


def read_virt(mem: PhysicalMemory, cr3: int, virt: int, n: int, **kw) -> bytes:
    """Read ``n`` bytes at ``virt`` through the tables (permissions are not checked)."""
    return b"".join(mem.read(p, size) for p, size in _pieces(mem, cr3, virt, n, **kw))


def write_virt(mem: PhysicalMemory, cr3: int, virt: int, data: bytes, **kw) -> None:
    """Write ``data`` at ``virt`` (a debugger write: W is not checked; nothing is
    written unless the whole range is mapped)."""
    pieces = _pieces(mem, cr3, virt, len(data), **kw)
    mv = memoryview(data)
    for p, size in pieces:
        mem.write(p, mv[:size])
        mv = mv[size:]


def reverse(mem: PhysicalMemory, cr3: int, phys: int, runs: RunArrays | None = None, **kw) -> list[int]:
    """Every virtual address that maps the physical address ``phys``."""
    ra = runs if runs is not None else walk_arrays(mem, cr3, **kw)
    ph = _u64(phys)
    hit = (ra.phys <= ph) & (ph < ra.phys + ra.size)
    return sorted((ra.virt[hit] + (ph - ra.phys[hit])).tolist())
