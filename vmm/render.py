"""Presentation of ``mm``'s results: rich tables and JSON-ready dicts for maps, runs and findings.

``mm`` stays a library with no terminal rendering; this is the VMM's view of it.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Sequence

from rich.console import Console
from rich.table import Table

from mm.findings import Finding, Severity
from mm.flags import PteFlags
from mm.memmap import MemoryMap, MemoryType
from mm.walker import Run, RunArrays

from .units import hex_addr, human_size

__all__ = [
    "flags_str",
    "memmap_table",
    "runs_table",
    "findings_table",
    "runs_to_json",
    "findings_to_json",
    "console",
]

_SEVERITY_STYLE = {Severity.INFO: "dim", Severity.WARNING: "yellow", Severity.ERROR: "bold red"}
_TYPE_STYLE = {MemoryType.CONVENTIONAL: "green", MemoryType.RESERVED: "red", MemoryType.FRAMEBUFFER: "magenta"}

Labels = Callable[[Run], str] | Sequence[tuple[int, int, str]]


def flags_str(flags: int) -> str:
    """Compact ``rwxug`` style string of effective flags (``-`` for clear)."""
    f = PteFlags(flags)
    return "".join(
        (
            "r" if f & PteFlags.PRESENT else "-",
            "w" if f & PteFlags.WRITABLE else "-",
            "-" if f & PteFlags.NO_EXECUTE else "x",
            "u" if f & PteFlags.USER else "k",
            "g" if f & PteFlags.GLOBAL else "-",
        )
    )


def memmap_table(memmap: MemoryMap, title: str | None = None) -> Table:
    """The memory map, one row per descriptor."""
    t = Table(title=title or f"memory map ({human_size(memmap.ram_size)} RAM, {len(memmap)} descriptors)")
    for col in ("start", "end", "size", "pages"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("type", no_wrap=True)
    t.add_column("attribute", justify="right", no_wrap=True)
    for d in memmap:
        style = _TYPE_STYLE.get(d.type)
        name = f"[{style}]{d.type.name}[/]" if style else d.type.name
        t.add_row(hex_addr(d.phys_start, 12), hex_addr(d.end, 12), human_size(d.size), str(d.num_pages), name,
                  hex_addr(d.attribute))
    return t


def _labeler(labels: Labels | None) -> Callable[[Run], str]:
    if labels is None:
        return lambda r: ""
    if callable(labels):
        return labels
    ranges = list(labels)
    return lambda r: next((name for a, b, name in ranges if a <= r.virt < b), "")


def runs_table(runs: Iterable[Run] | RunArrays, labels: Labels | None = None, title: str = "mappings") -> Table:
    """Coalesced runs; ``labels`` names them (callable, or ``(start, end, name)`` ranges)."""
    label = _labeler(labels)
    rs = list(runs.runs() if isinstance(runs, RunArrays) else runs)
    t = Table(title=title)
    for col in ("virtual", "physical", "size"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("page", justify="right")
    t.add_column("flags", no_wrap=True)
    if labels is not None:
        t.add_column("what")
    for r in rs:
        row = [hex_addr(r.virt), hex_addr(r.phys, 12), human_size(r.size), human_size(r.page_size), flags_str(r.flags)]
        if labels is not None:
            row.append(label(r))
        t.add_row(*row)
    return t


def findings_table(findings: Iterable[Finding], title: str = "findings") -> Table:
    """Findings, one row each, coloured by severity."""
    t = Table(title=title)
    t.add_column("severity", no_wrap=True)
    t.add_column("kind", no_wrap=True)
    t.add_column("virtual", justify="right", no_wrap=True)
    t.add_column("size", justify="right")
    t.add_column("detail")
    for f in findings:
        style = _SEVERITY_STYLE[Severity(f.severity)]
        t.add_row(f"[{style}]{Severity(f.severity).name.lower()}[/]", f.kind,
                  "" if f.virt is None else hex_addr(f.virt), human_size(f.size) if f.size else "", f.detail)
    return t


def runs_to_json(runs: Iterable[Run] | RunArrays) -> list[dict]:
    """Runs as dicts of plain ints plus flag names."""
    return [
        {
            "virt": r.virt,
            "phys": r.phys,
            "size": r.size,
            "page_size": int(r.page_size),
            "level": r.level,
            "flags": int(r.flags),
            "flag_names": [m.name for m in PteFlags if m & r.flags],
        }
        for r in (runs.runs() if isinstance(runs, RunArrays) else runs)
    ]


def findings_to_json(findings: Iterable[Finding]) -> list[dict]:
    """Findings as dicts (severity as its lowercase name)."""
    return [
        {
            "kind": f.kind,
            "severity": Severity(f.severity).name.lower(),
            "virt": f.virt,
            "size": f.size,
            "detail": f.detail,
            "level": f.level,
            "table": f.table,
            "entry": f.entry,
        }
        for f in findings
    ]


def console(width: int = 160) -> Console:
    """A rich console; ``width`` columns (full addresses) when output is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=width)
