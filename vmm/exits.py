"""Decode ``kvm_run`` into typed exit values before anything handles them.

``decode_exit`` is the only code that reads the exit union. Handlers get
plain dataclasses, so tests can feed synthetic exits without a VM. An exit
reason we do not know is a value (``UnknownExit``), not a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import kvm_abi as K

_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_UNION = 32  # offset of the exit union in kvm_run


@dataclass(frozen=True)
class IoOut:
    port: int
    size: int
    data: bytes  # size * count bytes


@dataclass(frozen=True)
class IoIn:
    port: int
    size: int
    count: int
    data_offset: int  # where in kvm_run the answer goes


@dataclass(frozen=True)
class Mmio:
    phys_addr: int
    length: int
    is_write: bool
    data: bytes


@dataclass(frozen=True)
class Hlt:
    pass


@dataclass(frozen=True)
class Shutdown:
    """Triple fault (or an explicit shutdown)."""


@dataclass(frozen=True)
class FailEntry:
    hardware_entry_failure_reason: int


@dataclass(frozen=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    @property
    def description(self) -> str:
        return {
            K.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed (SSE, int3 or int n at CPL0 on PVM?)",
            K.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            K.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed (bad IDT, TSS or stack?)",
            K.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
        }.get(self.suberror, f"suberror {self.suberror}")


@dataclass(frozen=True)
class SystemEvent:
    type: int


@dataclass(frozen=True)
class Debug:
    exception: int
    pc: int


@dataclass(frozen=True)
class Interrupted:
    """KVM_RUN returned EINTR: someone asked the vCPU to stop."""


@dataclass(frozen=True)
class UnknownExit:
    reason: int


Exit = IoOut | IoIn | Mmio | Hlt | Shutdown | FailEntry | InternalError | SystemEvent | Debug | Interrupted | UnknownExit


def decode_exit(reason: int, run: bytes | memoryview) -> Exit:
    """Decode one exit from the raw ``kvm_run`` bytes."""
    if reason == K.KVM_EXIT_IO:
        direction, size, port, count, off = _IO.unpack_from(run, _UNION)
        if direction == K.KVM_EXIT_IO_OUT:
            n = size * count
            if off + n > len(run):
                return UnknownExit(reason)
            return IoOut(port, size, bytes(run[off : off + n]))
        return IoIn(port, size, count, off)
    if reason == K.KVM_EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(run, _UNION)
        return Mmio(addr, length, bool(is_write), bytes(data[: min(length, 8)]))
    if reason == K.KVM_EXIT_HLT:
        return Hlt()
    if reason == K.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == K.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(struct.unpack_from("<Q", run, _UNION)[0])
    if reason == K.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = struct.unpack_from("<II", run, _UNION)
        ndata = min(ndata, 16)
        return InternalError(suberror, struct.unpack_from(f"<{ndata}Q", run, _UNION + 8))
    if reason == K.KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(struct.unpack_from("<I", run, _UNION)[0])
    if reason == K.KVM_EXIT_DEBUG:
        exc, _pad, pc = struct.unpack_from("<IIQ", run, _UNION)
        return Debug(exc, pc)
    if reason == K.KVM_EXIT_INTR:
        return Interrupted()
    return UnknownExit(reason)
