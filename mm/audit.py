"""Security checks over a page-table tree, each returning ``list[Finding]``.

The run-based checks take runs from :func:`~mm.walker.walk` (effective
flags), so they judge what the hardware would allow, not what one entry says.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from .addr import PAGE_4K, VIRT_ADDR_BITS, canonicalize
from .findings import Finding, Severity, WalkReport
from .flags import PteFlags
from .physmem import PhysicalMemory
from .walker import Run, RunArrays, translate, walk_arrays

__all__ = [
    "audit_wx",
    "audit_user_in_kernel_half",
    "audit_guard_pages",
    "audit_pt_aliases",
    "pt_alias_findings",
    "audit_reserved_bits",
    "audit_outside_ram",
    "audit_all",
    "KERNEL_HALF",
]

#: First canonical address of the upper (kernel) half.
#: First address of the upper (kernel) half: the sign-extended top bit of the levels' width.
KERNEL_HALF = canonicalize(1 << (VIRT_ADDR_BITS - 1))
_WALK_KINDS_RESERVED = ("reserved_bits",)
_WALK_KINDS_RAM = ("cr3_outside_ram", "table_outside_ram", "leaf_outside_ram")


def _runs(runs: Iterable[Run] | RunArrays, mask: Callable[[RunArrays], np.ndarray]) -> Iterable[Run]:
    """The runs to examine: for RunArrays only those selected by the vectorised ``mask``."""
    return runs[mask(runs)].runs() if isinstance(runs, RunArrays) else runs


def _wx_mask(ra: RunArrays) -> np.ndarray:
    return ((ra.flags & np.uint64(PteFlags.WRITABLE)) != 0) & ((ra.flags & np.uint64(PteFlags.NO_EXECUTE)) == 0)


def _user_kernel_mask(ra: RunArrays) -> np.ndarray:
    return (ra.virt >= np.uint64(KERNEL_HALF)) & ((ra.flags & np.uint64(PteFlags.USER)) != 0)


def audit_wx(runs: Iterable[Run] | RunArrays) -> list[Finding]:
    """Runs that are both writable and executable (effective W=1, NX=0)."""
    out = []
    for r in _runs(runs, _wx_mask):
        if r.flags & PteFlags.WRITABLE and not r.flags & PteFlags.NO_EXECUTE:
            who = "user" if r.flags & PteFlags.USER else "supervisor"
            out.append(Finding("wx", r.virt, r.size, f"{who} mapping is writable and executable", Severity.ERROR,
                               level=r.level))
    return out


def audit_user_in_kernel_half(runs: Iterable[Run] | RunArrays) -> list[Finding]:
    """User-accessible runs in the upper (kernel) half of the address space."""
    return [
        Finding("user_in_kernel_half", r.virt, r.size, "user-accessible mapping in the kernel half",
                Severity.ERROR, level=r.level)
        for r in _runs(runs, _user_kernel_mask)
        if r.virt >= KERNEL_HALF and r.flags & PteFlags.USER
    ]


def audit_guard_pages(mem: PhysicalMemory, cr3: int, ranges: Iterable[tuple[int, int]], **kw) -> list[Finding]:
    """Each ``(start, end)`` (e.g. a stack) needs an unmapped 4 KiB page just below and just above."""
    out = []
    for start, end in ranges:
        for where, page in (("below", start - PAGE_4K), ("above", end)):
            t = translate(mem, cr3, page, **kw)
            if t is not None:
                out.append(Finding("guard_page_missing", page, PAGE_4K,
                                   f"guard page {where} [{start:#_x}, {end:#_x}) is mapped to {t.phys:#_x}",
                                   Severity.ERROR, level=t.level))
    return out


def pt_alias_findings(runs: RunArrays, report: WalkReport, exclude: Sequence[tuple[int, int]] = ()) -> list[Finding]:
    """Writable runs covering page-table frames, from a walk already done
    (``report.tables``), outside the ``exclude`` virtual ranges."""
    frames = np.unique(np.concatenate([np.zeros(0, np.uint64), *report.tables.values()]))
    if frames.size == 0:
        return []
    writable = (runs.flags & np.uint64(PteFlags.WRITABLE)) != 0
    lo = np.searchsorted(frames, runs.phys)
    hi = np.searchsorted(frames, runs.phys + runs.size)
    out = []
    for i in np.flatnonzero(writable & (hi > lo)).tolist():
        n, first = int(hi[i] - lo[i]), int(frames[lo[i]])
        v = int(runs.virt[i]) + (first - int(runs.phys[i]))
        out.append(Finding("pt_alias_writable", int(runs.virt[i]), int(runs.size[i]),
                           f"writable mapping covers {n} page-table frame{'s' if n > 1 else ''} "
                           f"(first: {first:#_x} at {v:#_x})", Severity.WARNING, level=int(runs.level[i])))
    return [f for f in out if not any(a <= f.virt < b for a, b in exclude)]


def audit_pt_aliases(mem: PhysicalMemory, cr3: int, exclude: Sequence[tuple[int, int]] = (), **kw) -> list[Finding]:
    """Writable mappings of frames that hold the page tables themselves.

    ``exclude`` lists virtual ranges to accept (e.g. the direct map, which
    by design covers every frame of RAM).
    """
    report = WalkReport()
    runs = walk_arrays(mem, cr3, report=report, **kw)
    return pt_alias_findings(runs, report, exclude)


def audit_reserved_bits(mem: PhysicalMemory, cr3: int, **kw) -> list[Finding]:
    """Present entries with reserved bits set (the hardware faults on them)."""
    report = WalkReport()
    walk_arrays(mem, cr3, report=report, **kw)
    return report.of_kind(*_WALK_KINDS_RESERVED)


def audit_outside_ram(mem: PhysicalMemory, cr3: int, **kw) -> list[Finding]:
    """CR3, table pointers and leaves that point outside RAM."""
    report = WalkReport()
    walk_arrays(mem, cr3, report=report, **kw)
    return report.of_kind(*_WALK_KINDS_RAM)


def audit_all(
    mem: PhysicalMemory,
    cr3: int,
    guard_ranges: Iterable[tuple[int, int]] = (),
    pt_alias_exclude: Sequence[tuple[int, int]] = (),
    **kw,
) -> list[Finding]:
    """Every check above from one walk, plus the walk's own findings, worst first."""
    report = WalkReport()
    runs = walk_arrays(mem, cr3, report=report, **kw)
    found = list(report.findings)
    found += audit_wx(runs)
    found += audit_user_in_kernel_half(runs)
    found += audit_guard_pages(mem, cr3, guard_ranges, **kw)
    found += pt_alias_findings(runs, report, pt_alias_exclude)
    return sorted(found, key=lambda f: (-f.severity, f.virt if f.virt is not None else -1))
