"""What the host knows about a guest, typed from end to end.

Two sources, both written by the guest and therefore untrusted (every
address below is only ever a hint for bounded reads):

- the INSPECT report the guest sends at boot (text fields, see
  ``send_inspect`` in guest/src/main.rs), parsed once into ``InspectReport``;
- the inspect block the guest keeps current (``inspect_block.InspectBlock``),
  read with every snapshot and attached with ``GuestFacts.with_block``.

``GuestFacts`` answers the inspector's questions (where is the heap, the
frame bitmap, each stack, the scratch and demand regions, the framebuffer)
preferring the live block over the boot-time report, so callers never parse
strings or pick between the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from .inspect_block import InspectBlock, Stack

# INSPECT report keys whose names differ from the field they fill.
_REPORT_KEYS = {"stacks_start": "stacks"}


@dataclass(frozen=True)
class InspectReport:
    """The guest's INSPECT report, parsed once (None: absent or not a number)."""

    bitmap_phys: int | None = None
    bitmap_bits: int | None = None
    heap_start: int | None = None
    heap_end: int | None = None
    heap_free_head: int | None = None
    demand_start: int | None = None
    demand_size: int | None = None
    scratch_start: int | None = None
    scratch_size: int | None = None
    #: Mapped only while the kernel runs code at CPL3 (bench=cpl3, a fragmented heap's build).
    cpl3_ram_alias: int | None = None
    cpl3_stack_start: int | None = None
    cpl3_stack_size: int | None = None
    stacks_start: int | None = None
    stack_slot: int | None = None
    stack_slots: int | None = None
    stack_size: int | None = None
    cr3: int | None = None
    inspect_block_virt: int | None = None
    inspect_block_phys: int | None = None
    kernel_phys_start: int | None = None
    kernel_phys_end: int | None = None
    #: The kernel function called when its outermost critical section closes.
    quiet_hook: int | None = None
    #: The fields as the guest sent them (what travels over the control socket).
    fields: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> "InspectReport":
        values: dict = {}
        for f in dataclasses.fields(cls):
            if f.name == "fields":
                continue
            raw = fields.get(_REPORT_KEYS.get(f.name, f.name))
            try:
                values[f.name] = int(raw, 0) if raw is not None else None
            except (TypeError, ValueError):
                values[f.name] = None
        return cls(**values, fields=dict(fields))


def _span(start: int | None, end: int | None) -> tuple[int, int] | None:
    if start is None or end is None or end <= start:
        return None
    return start, end


def _sized(start: int | None, size: int | None) -> tuple[int, int] | None:
    """``[start, start + size)`` from a report's start/size pair (None if either is missing or the size is 0)."""
    return None if start is None or not size else (start, start + size)


@dataclass(frozen=True)
class GuestFacts:
    """What the host knows about the guest's layout (from the ELF, the reports
    and, once a snapshot read it, the live inspect block)."""

    ram_size: int
    kaslr_slide: int
    segments: list[tuple[int, int, str]] = field(default_factory=list)  # (virt start, end, perms)
    report: InspectReport = field(default_factory=InspectReport)
    memmap: list[dict] = field(default_factory=list)  # memory map as JSON dicts
    # The vCPU's paging facts (CPUID): a walk judges reserved bits and 1 GiB
    # leaves as this CPU does, not as the widest x86-64 would.
    maxphyaddr: int = 52
    gbpages: bool = True
    #: The live inspect block as a snapshot read it (None: not read, or none).
    block: InspectBlock | None = None

    def with_block(self, block: InspectBlock | None) -> "GuestFacts":
        return dataclasses.replace(self, block=block)

    # -- regions, live block first ------------------------------------------------
    @property
    def heap(self) -> tuple[int, int] | None:
        """The mapped heap ``[start, end)``."""
        b = self.block
        if b is not None and b.heap_start:
            return b.heap_start, max(b.heap_end, b.heap_start)
        r = self.report
        if r.heap_start is None or r.heap_end is None:
            return None
        return r.heap_start, max(r.heap_end, r.heap_start)

    @property
    def heap_free_head(self) -> int | None:
        if self.block is not None and self.block.heap_start:
            return self.block.heap_free_head
        return self.report.heap_free_head

    @property
    def bitmap(self) -> tuple[int, int] | None:
        """(physical address, frames covered) of the frame bitmaps."""
        b = self.block
        if b is not None and b.bitmap_bits:
            return b.bitmap_phys, b.bitmap_bits
        r = self.report
        if r.bitmap_phys is None or not r.bitmap_bits:
            return None
        return r.bitmap_phys, r.bitmap_bits

    @property
    def stacks(self) -> tuple[Stack, ...]:
        """Live stacks (records of the inspect block)."""
        return self.block.stacks if self.block is not None else ()

    @property
    def demand(self) -> tuple[int, int] | None:
        """The demand-paged region ``[start, end)``."""
        b = self.block
        if b is not None and b.demand_end > b.demand_start:
            return b.demand_start, b.demand_end
        return _sized(self.report.demand_start, self.report.demand_size)

    @property
    def scratch(self) -> tuple[int, int] | None:
        return _sized(self.report.scratch_start, self.report.scratch_size)

    @property
    def cpl3_ram_alias(self) -> tuple[int, int] | None:
        """``[start, end)`` of the user-accessible alias of all RAM a CPL3 run maps."""
        return _sized(self.report.cpl3_ram_alias, self.ram_size)

    @property
    def cpl3_stack(self) -> tuple[int, int] | None:
        return _sized(self.report.cpl3_stack_start, self.report.cpl3_stack_size)

    @property
    def kernel_phys(self) -> tuple[int, int] | None:
        return _span(self.report.kernel_phys_start, self.report.kernel_phys_end)

    @property
    def framebuffers(self) -> list[tuple[int, int]]:
        """Physical ``[start, end)`` of each framebuffer in the memory map."""
        return [(d["phys_start"], d["end"]) for d in self.memmap if d.get("type") == "FRAMEBUFFER"]

    # -- transport (control socket) ---------------------------------------------------
    def to_json(self) -> dict:
        return {
            "ram_size": self.ram_size,
            "kaslr_slide": self.kaslr_slide,
            "segments": [list(s) for s in self.segments],
            "inspect": dict(self.report.fields),
            "memmap": self.memmap,
            "maxphyaddr": self.maxphyaddr,
            "gbpages": self.gbpages,
        }

    @classmethod
    def from_json(cls, d: dict) -> "GuestFacts":
        return cls(
            ram_size=int(d["ram_size"]),
            kaslr_slide=int(d["kaslr_slide"]),
            segments=[tuple(s) for s in d.get("segments", [])],
            report=InspectReport.parse({str(k): str(v) for k, v in dict(d.get("inspect", {})).items()}),
            memmap=list(d.get("memmap", [])),
            maxphyaddr=int(d.get("maxphyaddr", 52)),
            gbpages=bool(d.get("gbpages", True)),
        )
