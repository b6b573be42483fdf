"""What the inspector looks at: a guest, local or attached over a socket.

A ``Target`` gives the inspector guest RAM (an ``mm`` physical-memory
interface), the vCPU's control registers, a way to pause the vCPU briefly,
and what the guest told the host about itself (the INSPECT/INFO reports).
``LocalTarget`` wraps a ``Vm`` in this process; ``vmm.inspector.control``
provides a remote one over a UNIX socket with RAM shared through a memfd.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

from mm.flags import ADDR_MASK

from ..abi import ReportKind
from ..cpu import decode_bits
from ..reports import Report
from .dirty import dirty_pages
from .facts import GuestFacts, InspectReport

#: How long a guest held inside a critical section may run to the section's end.
QUIET_TIMEOUT_S = 0.05

__all__ = [
    "ControlRegisters", "GuestFacts", "InspectReport", "LocalTarget", "Pause", "Target", "facts_from_vm", "latest",
]


@dataclass
class ControlRegisters:
    cr0: int
    cr3: int
    cr4: int
    efer: int
    rip: int = 0

    @property
    def root(self) -> int:
        """The PML4's physical address (CR3 bits 51:12; the low bits are PCID/flags)."""
        return self.cr3 & ADDR_MASK

    def to_json(self) -> dict:
        return {
            "cr0": self.cr0, "cr3": self.cr3, "cr4": self.cr4, "efer": self.efer, "rip": self.rip,
            "cr0_bits": decode_bits("cr0", self.cr0),
            "cr4_bits": decode_bits("cr4", self.cr4),
            "efer_bits": decode_bits("efer", self.efer),
        }


@dataclass
class Pause:
    """What ``Target.paused()`` yields: whether the vCPU is parked, and, once
    the block has ended, whether the pause ran out before it did (a remote
    target's server lets the guest go after a bound; reads made after that
    moment may be torn)."""

    parked: bool
    expired: bool = False
    paused_ms: float = 0.0
    #: A "quiet" pause: how long the guest ran to the end of a critical section first (not held).
    ran_ms: float = 0.0

    def __bool__(self) -> bool:
        return self.parked


class Target(Protocol):
    physmem: object

    def control_registers(self) -> ControlRegisters: ...

    def paused(self) -> contextlib.AbstractContextManager[Pause | bool]: ...

    def facts(self) -> GuestFacts: ...


def facts_from_vm(vm) -> GuestFacts:
    # A guest resumed from a snapshot sent its INSPECT report before the save:
    # the VM carries those fields over (vmm.snapshot), newer reports win.
    inspect: dict[str, str] = dict(getattr(vm, "inherited_inspect", None) or {})
    for r in vm.reports.reports:
        if r.kind == ReportKind.INSPECT:
            inspect = dict(r.fields)
    segs = [
        (s.vaddr + vm.slide, s.vaddr + vm.slide + s.memsz, s.perms)
        for s in vm.image.segments
    ]
    return GuestFacts(
        ram_size=vm.memory.size,
        kaslr_slide=vm.slide,
        segments=segs,
        report=InspectReport.parse(inspect),
        memmap=vm.memmap.to_json(),
        maxphyaddr=vm.cpu_features.maxphyaddr,
        gbpages=vm.cpu_features.gbpages,
    )


class LocalTarget:
    """A ``Vm`` in this process (running in another thread, or stopped)."""

    def __init__(self, vm):
        self.vm = vm
        self.physmem = vm.memory

    def control_registers(self) -> ControlRegisters:
        r, s = self.vm.registers()
        return ControlRegisters(s.cr0, s.cr3, s.cr4, s.efer, r.rip)

    def paused(self):
        return self.vm.paused()

    def facts(self) -> GuestFacts:
        return facts_from_vm(self.vm)

    def cr3_hint(self) -> int | None:
        """Where the guest's tables most likely are before it has said so in
        its INSPECT report: the CR3 this VMM booted it with (our kernel keeps
        it; a guest that switched is found out by the first hold, which
        costs what having no hint costs). None: not booted here."""
        layout = getattr(self.vm, "layout", None)
        return layout.cr3 if layout is not None else None

    @property
    def running(self) -> bool:
        """Is the guest running (its vCPU thread in the run loop)?"""
        return self.vm.running

    def visit(self, fn, run_on=None, *, short: bool = False):
        """Call ``fn`` on the vCPU thread with the guest held at its next exit
        (``Vm.visit``; ``run_on`` may let it run to an address first, for at
        most ``QUIET_TIMEOUT_S``; ``short``: a copy of a few hundred us, run
        at real-time priority where allowed); None if it is not running."""
        return self.vm.visit(fn, run_on=run_on, run_on_timeout=QUIET_TIMEOUT_S, realtime=short)

    def run_to(self, addr: int, timeout: float, meanwhile=None) -> int | None:
        """While paused: run the guest to ``addr`` and hold it there (``Vm.run_to``);
        the perf_counter_ns() at which it parked there, None if it did not get there."""
        return self.vm.parked_ns if self.vm.run_to(addr, timeout, meanwhile) else None

    def dirty_pages(self):
        """Pages written since the last call (needs VmConfig.dirty_log), or None."""
        if not self.vm.config.dirty_log:
            return None
        return dirty_pages(self.vm)


def latest(reports: list[Report], kind: ReportKind) -> Report | None:
    for r in reversed(reports):
        if r.kind == kind:
            return r
    return None
