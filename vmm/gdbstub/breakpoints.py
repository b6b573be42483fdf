"""Breakpoints as data: which go in debug registers, which are int3, which are
caught by single-stepping, and the KVM_SET_GUEST_DEBUG words they make.

On KVM-PVM an ``int3`` at CPL0 is an emulation failure (HOST.md), so
``Z0``/``Z1`` use the four debug registers (DR0..DR3 with DR7's L0..L3:
an instruction breakpoint is RW=00, LEN=00, so only the enable bit is
set). Past four, the vCPU single-steps and the debugger compares RIP with the
remaining addresses. On VMX/SVM, ``Z0`` plants a real ``int3`` (0xCC) and
KVM reports it with KVM_GUESTDBG_USE_SW_BP; ``Z1`` still uses DR0..DR3.
Except under QEMU's TCG (the SVM test backend, vmm/svm): its SVM emulation
treats INT3 as a software interrupt and checks only the INTn intercept, never
the #BP exception intercept KVM sets, so the guest's own IDT would get the
#BP; there, too, breakpoints use the debug registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..abi import Backend


def int3_is_intercepted(backend) -> bool:
    """Does KVM see the guest's int3 at CPL0 (KVM_GUESTDBG_USE_SW_BP works)?"""
    return backend.backend in (Backend.VMX, Backend.SVM) and not getattr(backend, "emulated", False)

from .. import kvm_abi as K

# KVM_GUESTDBG_* (<linux/kvm.h>; the x86 ones live in asm/kvm.h).
GUESTDBG_ENABLE = K.KVM_GUESTDBG_ENABLE
GUESTDBG_SINGLESTEP = K.KVM_GUESTDBG_SINGLESTEP
GUESTDBG_USE_SW_BP = 0x00010000
GUESTDBG_USE_HW_BP = 0x00020000

HW_SLOTS = 4
INT3 = 0xCC
#: DR6 bits 0..3 (B0..B3): which debug register matched.
DR6_HIT_MASK = 0xF


def dr7_for(slots: int) -> int:
    """DR7 enabling instruction breakpoints in the first ``slots`` registers:
    L<i> is bit 2i; RW<i>/LEN<i> (bits 16+4i..19+4i) stay 00 = execute, 1 byte."""
    value = 0
    for i in range(slots):
        value |= 1 << (2 * i)
    return value


@dataclass
class BreakpointTable:
    """Every breakpoint gdb asked for, by kind of mechanism."""

    software_int3: bool = False  # plant int3 for Z0 (VMX/SVM) instead of using DR0..DR3
    hardware: list[int] = field(default_factory=list)  # in DR0..DR3, in order
    stepped: set[int] = field(default_factory=set)  # past four: caught by single-stepping
    int3: dict[int, bytes] = field(default_factory=dict)  # address -> original byte

    def __contains__(self, addr: int) -> bool:
        return addr in self.hardware or addr in self.stepped or addr in self.int3

    @property
    def overflow(self) -> bool:
        return bool(self.stepped)

    def insert(self, kind: int, addr: int) -> str:
        """Record a Z0/Z1; returns the mechanism ("hw", "step" or "int3").
        Inserting an address twice is idempotent (gdb may re-insert)."""
        if kind == 0 and self.software_int3:
            return "int3"  # the caller writes the 0xCC and calls planted()
        if addr in self.hardware:
            return "hw"
        if addr in self.stepped:
            return "step"
        if len(self.hardware) < HW_SLOTS:
            self.hardware.append(addr)
            return "hw"
        self.stepped.add(addr)
        return "step"

    def planted(self, addr: int, original: bytes) -> None:
        self.int3.setdefault(addr, original)

    def remove(self, kind: int, addr: int) -> bytes | None:
        """Forget a breakpoint; for an int3 returns the byte to put back."""
        if kind == 0 and self.software_int3:
            return self.int3.pop(addr, None)
        if addr in self.hardware:
            self.hardware.remove(addr)
            # a stepped breakpoint moves into the freed register
            if self.stepped:
                self.hardware.append(self.stepped.pop())
        else:
            self.stepped.discard(addr)
        return None

    def clear(self) -> dict[int, bytes]:
        """Forget everything (detach); returns the int3 bytes to restore."""
        restore = dict(self.int3)
        self.hardware.clear()
        self.stepped.clear()
        self.int3.clear()
        return restore

    def guest_debug(self, step: bool) -> tuple[int, list[int]]:
        """(control, debugreg[8]) for KVM_SET_GUEST_DEBUG. Control 0 switches
        guest debugging off entirely (the guest runs at full speed)."""
        regs = [0] * 8
        control = 0
        if self.hardware:
            control |= GUESTDBG_ENABLE | GUESTDBG_USE_HW_BP
            for i, addr in enumerate(self.hardware):
                regs[i] = addr
            regs[7] = dr7_for(len(self.hardware))
        if self.int3:
            control |= GUESTDBG_ENABLE | GUESTDBG_USE_SW_BP
        if step or self.stepped:
            control |= GUESTDBG_ENABLE | GUESTDBG_SINGLESTEP
        return control, regs
