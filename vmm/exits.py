"""Decode ``kvm_run`` into typed exit values before anything handles them.

``decode`` (``decode_exit`` for a known reason) is the only code that reads
the exit union; ``VcpuFd.run`` returns its value for every exit. Handlers
(``vmm.exit_handling.handle_exit``) get plain dataclasses, so tests can feed
synthetic exits without a VM. An exit reason we do not know is a value
(``UnknownExit``), not a crash.

The layout is kvm_abi's: every format here comes from ``kvm_abi.unpacker``.
This decoder runs once per guest exit, so it is kept cheap: the reason and the
io member (the common exit) come out of one unpack, and the exit classes are
``slots`` dataclasses without ``frozen`` (a frozen ``__init__`` goes through
``object.__setattr__`` per field, about three times the cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import kvm_abi as K

# exit_reason and kvm_run.u.io in one read: the hot path (port I/O).
_HEAD, _HEAD_AT = K.unpacker((K.KVM_RUN_EXIT_REASON, K.u32), (K.KVM_RUN_EXIT_UNION, K.kvm_run_io))
_UNION = K.KVM_RUN_EXIT_UNION


def _member(ctype: type):
    """The Struct for one member of the exit union (read at ``_UNION``)."""
    return K.unpacker((_UNION, ctype))[0]


_IO = _member(K.kvm_run_io)
_MMIO = _member(K.kvm_run_mmio)
_FAIL_ENTRY = _member(K.kvm_run_fail_entry)
_INTERNAL = _member(K.kvm_run_internal)
_SYSTEM_EVENT = _member(K.kvm_run_system_event)
_DEBUG = _member(K.kvm_run_debug)
_IO_OUT = K.KVM_EXIT_IO_OUT
_ONE_BYTE = tuple(bytes([i]) for i in range(256))
_EXIT_IO = K.KVM_EXIT_IO


@dataclass(slots=True)
class IoOut:
    port: int
    size: int
    data: bytes  # size * count bytes


@dataclass(slots=True)
class IoIn:
    port: int
    size: int
    count: int
    data_offset: int  # where in kvm_run the answer goes


@dataclass(slots=True)
class Mmio:
    phys_addr: int
    length: int
    is_write: bool
    data: bytes


@dataclass(slots=True)
class Hlt:
    pass


@dataclass(slots=True)
class Shutdown:
    """Triple fault (or an explicit shutdown)."""


@dataclass(slots=True)
class FailEntry:
    hardware_entry_failure_reason: int


@dataclass(slots=True)
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


@dataclass(slots=True)
class SystemEvent:
    type: int


@dataclass(slots=True)
class Debug:
    exception: int
    pc: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: someone asked the vCPU to stop."""


@dataclass(slots=True)
class UnknownExit:
    reason: int


Exit = IoOut | IoIn | Mmio | Hlt | Shutdown | FailEntry | InternalError | SystemEvent | Debug | Interrupted | UnknownExit


INTERRUPTED = Interrupted()


def _nothing() -> None:
    pass


def decoder_for(run, enter: Callable[[], object] = _nothing) -> Callable[[], Exit]:
    """``decode`` bound to one vCPU's kvm_run mapping, for its run loop.

    ``enter`` is called first: the safe layer passes its KVM_RUN ioctl, so
    that running the vCPU and decoding its exit is one Python call per exit
    (``VcpuFd.run``); a signal that interrupted it is ``Interrupted``.
    The port write it returns is one preallocated ``IoOut``, refilled for
    every such exit (valid until the next call): a port write is most exits,
    and building a new object for each costs about as much as reading it.
    Other exits are new values, like ``decode``'s."""
    out = IoOut(0, 0, b"")
    unpack, at, size_of_run, one_byte = _HEAD.unpack_from, _HEAD_AT, len(run), _ONE_BYTE

    def decode_next() -> Exit:
        try:
            enter()
        except InterruptedError:
            return INTERRUPTED
        reason, direction, size, port, count, off = unpack(run, at)
        if reason == _EXIT_IO and direction == _IO_OUT:
            end = off + size * count
            if end > size_of_run:
                return UnknownExit(reason)
            # A one-byte write (serial, most port writes) needs no new bytes object.
            out.port, out.size, out.data = port, size, one_byte[run[off]] if end - off == 1 else run[off:end]
            return out
        return decode_exit(reason, run)

    return decode_next


def decode(run) -> Exit:
    """The exit a finished KVM_RUN left in ``run`` (the vCPU's kvm_run mapping,
    or any buffer laid out like it)."""
    reason, direction, size, port, count, off = _HEAD.unpack_from(run, _HEAD_AT)
    if reason == _EXIT_IO and direction == _IO_OUT:
        n = size * count
        if off + n > len(run):
            return UnknownExit(reason)
        return IoOut(port, size, run[off : off + n])
    return decode_exit(reason, run)


def decode_exit(reason: int, run) -> Exit:
    """Decode one exit of a known ``reason`` from the raw ``kvm_run`` bytes."""
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
        return Mmio(addr, length, bool(is_write), data[: min(length, 8)])
    if reason == K.KVM_EXIT_HLT:
        return Hlt()
    if reason == K.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == K.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(_FAIL_ENTRY.unpack_from(run, _UNION)[0])
    if reason == K.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata, *data = _INTERNAL.unpack_from(run, _UNION)
        return InternalError(suberror, tuple(data[: min(ndata, len(data))]))
    if reason == K.KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(_SYSTEM_EVENT.unpack_from(run, _UNION)[0])
    if reason == K.KVM_EXIT_DEBUG:
        exc, _pad, pc, _dr6, _dr7 = _DEBUG.unpack_from(run, _UNION)
        return Debug(exc, pc)
    if reason == K.KVM_EXIT_INTR:
        return INTERRUPTED
    return UnknownExit(reason)
