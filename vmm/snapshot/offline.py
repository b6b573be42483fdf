"""A saved guest as an inspector ``Target``: every view works on a file.

The file's RAM is loaded into a sparse memfd mapping (untouched pages cost
nothing, so a 64 GiB snapshot of a small guest loads in milliseconds) and
served through the same ``mm`` physical-memory interface a live guest uses.
The vCPU is not there: ``paused()`` is trivially true, the control
registers are the saved ones, and the facts (layout, INSPECT fields, memory
map, CPU paging features) come from the snapshot's metadata.
"""

from __future__ import annotations

import contextlib

from mm.errors import MMError
from mm.memmap import MemoryMap

from ..abi import BOOT_INFO_MAGIC
from ..inspector.target import ControlRegisters, GuestFacts, InspectReport
from ..memory import GuestMemory
from .format import SnapshotError
from .machine import LoadedSnapshot, open_snapshot


class SnapshotTarget:
    def __init__(self, snap: LoadedSnapshot):
        self.snap = snap
        self.path = snap.path
        self.memory = GuestMemory(snap.memory_size)
        try:
            snap.fill(self.memory)
        except BaseException:
            self.memory.close()
            raise
        self.physmem = self.memory
        self._facts = facts_from_meta(snap.meta)

    @classmethod
    def open(cls, path: str) -> "SnapshotTarget":
        snap = open_snapshot(path)
        try:
            return cls(snap)
        finally:
            snap.close()  # everything is in memory now

    def close(self) -> None:
        if self.memory is not None:
            self.physmem = None
            self.memory.close()
            self.memory = None

    def __enter__(self) -> "SnapshotTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def control_registers(self) -> ControlRegisters:
        s = self.snap.state.vcpu.sregs
        return ControlRegisters(s.cr0, s.cr3, s.cr4, s.efer, self.snap.state.vcpu.regs.rip)

    def paused(self):
        return contextlib.nullcontext(True)  # nothing runs: always consistent

    def facts(self) -> GuestFacts:
        return self._facts

    def dirty_pages(self):
        return None


def facts_from_meta(meta: dict) -> GuestFacts:
    def ints(seq):
        return [(int(a), int(b), str(p)) for a, b, p in seq]

    try:
        return GuestFacts(
            ram_size=int(meta["memory_size"]),
            kaslr_slide=int(meta["kaslr_slide"]),
            segments=ints(meta.get("segments", [])),
            report=InspectReport.parse({str(k): str(v) for k, v in dict(meta.get("inspect", {})).items()}),
            memmap=[d for d in meta.get("memmap", []) if isinstance(d, dict)],
            maxphyaddr=int(meta.get("maxphyaddr", 52)),
            gbpages=bool(meta.get("gbpages", True)),
        )
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot metadata is inconsistent ({exc})") from None


def memmap_of_snapshot(path: str):
    """(RAM size, the memory map the guest was given), read from the saved RAM
    where BootInfo says it is, like the guest itself read it."""
    with SnapshotTarget.open(path) as target:
        info = target.snap.state.boot_info
        size = target.snap.memory_size
        if info is None or info.magic != BOOT_INFO_MAGIC:
            raise SnapshotError(f"snapshot {path}: no valid BootInfo note")
        n = info.memmap_count * info.memmap_desc_size
        if not info.memmap_desc_size or not target.memory.contains(info.memmap_phys, n):
            raise SnapshotError(f"snapshot {path}: the BootInfo's memory map lies outside RAM")
        try:
            return size, MemoryMap.parse(target.memory.read(info.memmap_phys, n), info.memmap_desc_size, ram_size=size)
        except MMError as exc:
            raise SnapshotError(f"snapshot {path}: saved memory map: {exc}") from None
