"""Port-I/O devices on a bus of non-overlapping ranges.

A device answers ``io_out(offset, data)`` and ``io_in(offset, size)``. An
``io_out`` may return a ``Stop`` to end the run (the exit device does).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .abi import REPORT_HEADER_SIZE, WORK_END_PORT, WORK_PORT, ExitCode
from .memory import GuestMemory
from .reports import Report, ReportError, decode_payload, parse_header


@dataclass(frozen=True)
class Stop:
    """A device asks the run loop to stop with this exit code and reason."""

    exit_code: int
    reason: str
    message: str = ""


class Device:
    name = "device"

    def io_out(self, offset: int, data: bytes) -> Stop | None:
        return None

    def io_in(self, offset: int, size: int) -> bytes:
        return bytes(size)


class BusError(ValueError):
    pass


class PortBus:
    """Maps port ranges to devices; ranges never overlap."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Device]] = []
        self.by_port: dict[int, tuple[Device, int]] = {}

    def add(self, base: int, size: int, device: Device) -> None:
        if size <= 0 or base < 0 or base + size > 0x10000:
            raise BusError(f"bad port range {base:#x}+{size}")
        i = bisect.bisect_left(self._starts, base)
        if i > 0 and self._entries[i - 1][1] > base or i < len(self._entries) and self._entries[i][0] < base + size:
            raise BusError(f"port range {base:#x}+{size} for {device.name} overlaps another device")
        self._starts.insert(i, base)
        self._entries.insert(i, (base, base + size, device))
        for port in range(base, base + size):
            self.by_port[port] = (device, port - base)

    def lookup(self, port: int) -> tuple[Device, int] | None:
        return self.by_port.get(port)

    def devices(self) -> list[tuple[int, int, Device]]:
        return list(self._entries)


class Uart16550(Device):
    """Just enough of a 16550 for polled output: THR writes, LSR says empty."""

    name = "com1"
    THR = 0
    LSR = 5
    LSR_THR_EMPTY = 0x20
    LSR_TX_IDLE = 0x40
    SCRATCH = 7

    def __init__(self, sink: Callable[[bytes], None] | None = None, keep: int = 1 << 20):
        self.sink = sink
        self.keep = keep
        self.output = bytearray()
        self.total_bytes = 0
        self.first_byte_ns: int | None = None
        self._scratch = 0

    def io_out(self, offset: int, data: bytes) -> Stop | None:
        if offset == self.THR:
            if self.first_byte_ns is None:
                self.first_byte_ns = time.perf_counter_ns()
            self.total_bytes += len(data)
            self.output += data
            if len(self.output) > self.keep:
                del self.output[: len(self.output) - self.keep]
            if self.sink is not None:
                self.sink(data)
        elif offset == self.SCRATCH:
            self._scratch = data[0]
        return None

    def io_in(self, offset: int, size: int) -> bytes:
        if offset == self.LSR:
            return bytes([self.LSR_THR_EMPTY | self.LSR_TX_IDLE]) * size
        if offset == self.SCRATCH:
            return bytes([self._scratch]) * size
        return bytes(size)


class ExitDevice(Device):
    """The guest writes its status; the run ends with it as the exit code."""

    name = "exit"

    def io_out(self, offset: int, data: bytes) -> Stop | None:
        value = int.from_bytes(data, "little")
        code = value if value < 256 else 255
        return Stop(code, "exit", f"guest exited with status {value}")


class ReportDevice(Device):
    """The guest writes the physical address of a report record."""

    name = "report"

    def __init__(self, memory: GuestMemory, on_report: Callable[[Report], Stop | None] | None = None):
        self.memory = memory
        self.on_report = on_report
        self.reports: list[Report] = []
        self.errors: list[str] = []
        self.max_reports = 100_000

    def io_out(self, offset: int, data: bytes) -> Stop | None:
        if offset != 0:
            return None
        addr = int.from_bytes(data, "little")
        try:
            report = read_report(self.memory, addr)
        except ReportError as exc:
            if len(self.errors) < 1000:
                self.errors.append(f"report at {addr:#x}: {exc}")
            return None
        if len(self.reports) < self.max_reports:
            self.reports.append(report)
        if self.on_report is not None:
            return self.on_report(report)
        return None


def read_report(memory: GuestMemory, addr: int) -> Report:
    """Read and decode a record at a guest-physical address, bounds-checked."""
    if not memory.contains(addr, REPORT_HEADER_SIZE):
        raise ReportError(f"header outside guest RAM (size {memory.size:#x})")
    kind, length = parse_header(memory.read(addr, REPORT_HEADER_SIZE))
    if not memory.contains(addr + REPORT_HEADER_SIZE, length):
        raise ReportError("payload extends outside guest RAM")
    return decode_payload(kind, memory.read(addr + REPORT_HEADER_SIZE, length))




#: The doorbell's port within the work device, and what the host writes to ring it.
END_OFFSET = WORK_END_PORT - WORK_PORT
END_RUNG = (1).to_bytes(4, "little")


class WorkMailbox(Device):
    """``zygote=1`` guests ask for work here: an OUT of the mailbox's physical
    address. With work queued (``give``) it is written there (u32 length +
    words) and the guest goes on; without, the run stops ("waiting-for-work")
    so the host can snapshot the guest at that point.

    The port after it is the end-of-work doorbell (any guest): a work loop
    OUTs the physical address of a u32 flag, and ``end_work`` writes 1
    there (now, or as soon as the address is known); the `workload=` loops
    read it once per iteration and end as at their deadline. A host write is
    in no dirty log, so ``reset`` puts the flag back to 0 itself."""

    name = "work"

    def __init__(self, memory: GuestMemory, mailbox_size: int, protected: list[tuple[int, int]] = ()):
        self.memory = memory
        self.protected = list(protected)  # the read-only kernel slots: never a flag the host writes
        self.mailbox_size = mailbox_size
        self.mailbox: int | None = None
        self.pending: bytes | None = None
        self.written = 0  # bytes from the mailbox on that the host wrote (the last work's message)
        self.end_requested = False  # set from any thread (end_work)
        self.end_flag: int | None = None  # the guest's doorbell flag (guest-physical), once told
        self._end_lock = threading.Lock()  # end_work (any thread) vs the guest naming its flag (vCPU thread)

    def give(self, words: str) -> None:
        self.message(words)  # too long: refused now, not at delivery
        self.pending = words.encode("utf-8")

    def message(self, words: str) -> bytes:
        """What ``deliver`` writes at the mailbox for ``words``: u32 length, then the words."""
        raw = words.encode("utf-8")
        if len(raw) > self.mailbox_size - 4:
            raise ValueError(f"work is {len(raw)} bytes, the mailbox holds {self.mailbox_size - 4}")
        return len(raw).to_bytes(4, "little") + raw

    def delivered(self, mailbox: int, written: int) -> None:
        """The host wrote the work into the mailbox at ``mailbox`` itself, its
        first ``written`` bytes (a reset in place writes the zygote's bytes
        there with the next work already in them): nothing is pending."""
        self.mailbox = mailbox
        self.pending = None
        self.written = written

    def end_work(self) -> None:
        with self._end_lock:
            self.end_requested = True
            if self.end_flag is not None:
                self.memory.write(self.end_flag, END_RUNG)

    def reset(self) -> None:
        """Back to "no end asked" (a VM reset in place): the flag's page may
        not be in the dirty log, so a rung flag is cleared here."""
        with self._end_lock:
            if self.end_requested and self.end_flag is not None:
                self.memory.write(self.end_flag, bytes(len(END_RUNG)))
            self.end_requested, self.end_flag = False, None

    def deliver(self) -> None:
        """Write the queued work into the mailbox (the guest is stopped in its OUT)."""
        if self.mailbox is not None and self.pending is not None:
            message = len(self.pending).to_bytes(4, "little") + self.pending
            self.memory.write(self.mailbox, message)
            self.pending = None
            self.written = len(message)

    def io_out(self, offset: int, data: bytes) -> Stop | None:
        addr = int.from_bytes(data, "little")
        if offset == END_OFFSET:
            return self._end_flag_at(addr)
        if addr % 4 or not self.memory.contains(addr, self.mailbox_size):
            return Stop(ExitCode.BAD_REPORT, "bad-mailbox", f"work mailbox at {addr:#x} is not 4 KiB inside guest RAM")
        self.mailbox = addr
        if self.pending is not None:
            self.deliver()
            return None
        return Stop(ExitCode.SUCCESS, "waiting-for-work", "the guest waits for work (zygote=1)")

    def _end_flag_at(self, addr: int) -> Stop | None:
        # The guest names where the host will write: it must be aligned guest
        # RAM outside the read-only kernel slots (a host write there would
        # change what KVM protects from the guest itself).
        if addr % 4 or not self.memory.contains(addr, len(END_RUNG)) or any(
                lo < addr + len(END_RUNG) and addr < hi for lo, hi in self.protected):
            return Stop(ExitCode.BAD_REPORT, "bad-end-flag", f"end-of-work flag at {addr:#x} is not writable guest RAM")
        with self._end_lock:
            self.end_flag = addr
            if self.end_requested:
                self.memory.write(addr, END_RUNG)
        return None


class InstructionCounter(Device):
    """Counts the guest's instructions between two marker OUTs by single-stepping.

    ``set_stepping(bool)`` turns KVM_GUESTDBG_SINGLESTEP on or off; the run
    loop calls ``step()`` for every debug exit while ``active``.
    """

    name = "icount"
    MAX_STEPS = 5_000_000  # a runaway count stops stepping (the guest goes on)

    def __init__(self, set_stepping: Callable[[bool], None], completion_step: bool = False):
        self.set_stepping = set_stepping
        # The backend reports the start OUT's own completion as the first step
        # (VMX/SVM): that debug exit is no instruction of the counted window.
        self.completion_step = completion_step
        self.active: int | None = None
        self.steps = 0
        self._skip_next = False
        self.counts: dict[int, int] = {}
        self.errors: list[str] = []

    def io_out(self, offset: int, data: bytes) -> Stop | None:
        ident = int.from_bytes(data, "little")
        if offset == 0:
            if self.active is not None:
                self.errors.append(f"count {ident} started inside count {self.active}")
                return None
            self.active, self.steps = ident, 0
            self._skip_next = self.completion_step
            self.set_stepping(True)
        elif offset == 4:
            if self.active != ident:
                self.errors.append(f"count {ident} stopped but {self.active} was running")
            else:
                self.counts[ident] = self.steps
            self.active = None
            self.set_stepping(False)
        return None

    def step(self) -> None:
        if self._skip_next:
            self._skip_next = False
            return
        self.steps += 1
        if self.steps >= self.MAX_STEPS:
            self.errors.append(f"count {self.active} exceeded {self.MAX_STEPS} instructions: stopped")
            self.active = None
            self.set_stepping(False)


__all__ = ["Device", "ExitCode", "ExitDevice", "InstructionCounter", "PortBus", "ReportDevice", "Stop", "Uart16550",
           "WorkMailbox", "read_report"]
