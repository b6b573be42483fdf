"""Who owns each mapped page: labels from the guest's own records, runs split
at every label edge.

The walker coalesces mappings by address, physical contiguity and flags, so a
run can span several owners (the direct map holds the framebuffer; a heap
run can border a stack only by coincidence, but a 2 MiB direct-map page can
hold both framebuffer and ordinary RAM). ``Labeler`` flattens the guest's
regions (most specific first) into disjoint segments and cuts every run
where the segment changes, so each piece carries exactly one owner.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator

from mm.walker import Run

from ..layout import PHYS_OFFSET
from .facts import GuestFacts

SEGMENT_NAMES = {"R-X": "kernel .text", "R--": "kernel .rodata", "RW-": "kernel .data/.bss"}
FRAMEBUFFER = "framebuffer (direct map)"
DIRECT_MAP = "direct map"
HEAP = "heap"
SCRATCH = "scratch (tests, workload)"
DEMAND = "demand-paged region"
CPL3_RAM_ALIAS = "RAM alias (CPL3 runs)"
CPL3_STACK = "user stack (CPL3 runs)"


def stack_label(task_id: int) -> str:
    return f"stack (task {task_id})"


def label_ranges(facts: GuestFacts) -> list[tuple[int, int, str]]:
    """(start, end, name) for every region the host can name, most specific first."""
    out: list[tuple[int, int, str]] = []
    for start, end, perms in facts.segments:
        out.append((start & ~0xFFF, (end + 0xFFF) & ~0xFFF, SEGMENT_NAMES.get(perms, f"kernel {perms}")))
    if facts.heap is not None:
        out.append((*facts.heap, HEAP))
    for s in facts.stacks:
        out.append((s.base, s.top, stack_label(s.task_id)))
    if facts.scratch is not None:
        out.append((*facts.scratch, SCRATCH))
    if facts.demand is not None:
        out.append((*facts.demand, DEMAND))
    if facts.cpl3_stack is not None:
        out.append((*facts.cpl3_stack, CPL3_STACK))
    if facts.cpl3_ram_alias is not None:
        out.append((*facts.cpl3_ram_alias, CPL3_RAM_ALIAS))
    for lo, hi in facts.framebuffers:
        out.append((PHYS_OFFSET + lo, PHYS_OFFSET + hi, FRAMEBUFFER))
    out.append((PHYS_OFFSET, PHYS_OFFSET + facts.ram_size, DIRECT_MAP))
    return [(a, b, n) for a, b, n in out if a < b]


class Labeler:
    """Disjoint labelled segments from prioritized (possibly overlapping) ranges."""

    def __init__(self, ranges: Iterable[tuple[int, int, str]]):
        ranges = list(ranges)
        edges = sorted({e for a, b, _ in ranges for e in (a, b)})
        starts, ends, names = [], [], []
        for lo, hi in zip(edges, edges[1:]):
            name = next((n for a, b, n in ranges if a <= lo and hi <= b), "")
            if not name:
                continue
            if names and ends[-1] == lo and names[-1] == name:
                ends[-1] = hi
            else:
                starts.append(lo)
                ends.append(hi)
                names.append(name)
        self.starts, self.ends, self.names = starts, ends, names

    @classmethod
    def for_facts(cls, facts: GuestFacts) -> "Labeler":
        return cls(label_ranges(facts))

    def label_of(self, virt: int) -> str:
        i = bisect.bisect_right(self.starts, virt) - 1
        return self.names[i] if i >= 0 and virt < self.ends[i] else ""

    def split(self, run: Run) -> Iterator[tuple[Run, str]]:
        """``run`` cut at every label edge inside it, each piece with its label
        (unlabelled stretches get "")."""
        v, end = run.virt, run.virt + run.size
        i = bisect.bisect_right(self.starts, v) - 1
        if i < 0 or v >= self.ends[i]:
            i += 1  # v is in a gap: the next segment may start inside the run
        while v < end:
            if i < len(self.starts) and self.starts[i] <= v:
                cut, name = min(end, self.ends[i]), self.names[i]
                i += 1
            else:
                cut = min(end, self.starts[i]) if i < len(self.starts) else end
                name = ""
            yield (run if cut - v == run.size else _piece(run, v, cut)), name
            v = cut

    def label_runs(self, runs: Iterable[Run]) -> list[tuple[Run, str]]:
        return [piece for run in runs for piece in self.split(run)]


def _piece(run: Run, start: int, end: int) -> Run:
    return Run(start, run.phys + (start - run.virt), end - start, run.flags, run.page_size, run.level)
