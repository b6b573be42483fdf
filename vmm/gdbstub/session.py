"""One gdb client's commands answered against a stopped debug target.

``Session.handle(command)`` returns the reply payload, or a resume action
for the debugger's run loop. What it needs from the VM is the small
:class:`DebugTarget` protocol (registers, memory, breakpoints, monitor), so
the protocol rules live here and the KVM details in ``debugger.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import commands as C
from . import regs as R
from .memory import MemoryFault
from .packets import MAX_PACKET, escape

# gdb's signal numbers (gdb/signals.def; the remote protocol uses these,
# which match Linux only up to 15).
SIGINT = 2
SIGILL = 4
SIGTRAP = 5
SIGABRT = 6
SIGBUS = 10
SIGSEGV = 11
SIGALRM = 14
SIGXCPU = 24

# errno-style values for E replies (gdb prints them, nothing more).
EINVAL = 22
EFAULT = 14
ENOSPC = 28


class TargetError(Exception):
    """A request the target refuses; ``code`` goes into the ``E`` reply."""

    def __init__(self, message: str, code: int = EINVAL):
        super().__init__(message)
        self.code = code


class DebugTarget(Protocol):
    def registers(self) -> dict[str, int]: ...

    def set_registers(self, values: dict[str, int]) -> None: ...

    def read_memory(self, addr: int, n: int) -> bytes: ...

    def write_memory(self, addr: int, data: bytes) -> None: ...

    def breakpoint(self, insert: bool, kind: int, addr: int) -> None: ...

    def monitor(self, command: str) -> str: ...

    def offsets(self) -> int: ...


@dataclass(frozen=True)
class ResumeAction:
    step: bool


@dataclass(frozen=True)
class DetachAction:
    pass


@dataclass(frozen=True)
class KillAction:
    pass


Action = ResumeAction | DetachAction | KillAction


@dataclass(frozen=True)
class StopEvent:
    """Why the target stopped: a signal, and what to tell gdb about it."""

    signal: int
    reason: str = ""  # "swbreak", "hwbreak" or "" (the stop-reason key of a T reply)
    message: str = ""  # printed in gdb's console (O packet) before the stop reply


def error(code: int) -> bytes:
    return b"E%02x" % (code & 0xFF)


def stop_reply(event: StopEvent, regs: dict[str, int]) -> bytes:
    """``T`` reply with the registers gdb needs first (rbp, rsp, rip) so a
    stepi costs one round trip, and the stop reason if it was a breakpoint."""
    out = b"T%02x" % event.signal
    for name in ("rbp", "rsp", "rip"):
        n = R.BY_NAME[name]
        out += b"%02x:" % n + R.encode_one(n, regs) + b";"
    if event.reason:
        out += event.reason.encode() + b":;"
    return out + b"thread:01;"


def console_packets(text: str) -> list[bytes]:
    """``O`` packets carrying ``text`` to gdb's console, each within the packet size."""
    raw = text.encode()
    step = MAX_PACKET // 2 - 8
    return [b"O" + raw[i : i + step].hex().encode() for i in range(0, len(raw), step)]


class Session:
    """Protocol state of one connection (ack mode, features, the last stop)."""

    def __init__(self, target: DebugTarget, *, xml: str | None = None):
        self.target = target
        self.no_ack = False
        self.last_stop = StopEvent(SIGTRAP)
        self.features: set[bytes] = set()
        self._xml = (xml or R.target_xml()).encode()

    def handle(self, cmd: C.Command) -> bytes | list[bytes] | Action:
        t = self.target
        try:
            if isinstance(cmd, C.QueryHalt):
                return stop_reply(self.last_stop, t.registers())
            if isinstance(cmd, C.ReadRegisters):
                return R.encode_all(t.registers())
            if isinstance(cmd, C.ReadRegister):
                if cmd.number >= len(R.REGISTERS):
                    return error(EINVAL)
                return R.encode_one(cmd.number, t.registers())
            if isinstance(cmd, C.WriteRegister):
                if cmd.number >= len(R.REGISTERS):
                    return error(EINVAL)
                reg = R.REGISTERS[cmd.number]
                if reg.name not in R.WRITABLE:
                    return error(EINVAL)
                t.set_registers({reg.name: R.decode_one(cmd.number, cmd.data)})
                return b"OK"
            if isinstance(cmd, C.WriteRegisters):
                new = R.decode_all(cmd.data)
                old = t.registers()
                changed = {k: v for k, v in new.items() if old.get(k) != v and R.REGISTERS[R.BY_NAME[k]].group != "float"}
                if any(k not in R.WRITABLE for k in changed):
                    return error(EINVAL)
                if changed:
                    t.set_registers(changed)
                return b"OK"
            if isinstance(cmd, C.ReadMemory):
                if cmd.length == 0:
                    return b""
                return t.read_memory(cmd.addr, cmd.length).hex().encode()
            if isinstance(cmd, C.WriteMemory):
                t.write_memory(cmd.addr, cmd.data)
                return b"OK"
            if isinstance(cmd, C.Resume):
                if cmd.addr is not None:
                    t.set_registers({"rip": cmd.addr})
                return ResumeAction(cmd.step)
            if isinstance(cmd, C.VContQuery):
                return b"vCont;c;C;s;S"
            if isinstance(cmd, C.Breakpoint):
                if cmd.type > 1:
                    # Data breakpoints did not fire on KVM-PVM (HOST.md): an
                    # empty reply says "not supported", and gdb then uses
                    # software watchpoints when told `set can-use-hw-watchpoints 0`.
                    return b""
                t.breakpoint(cmd.insert, cmd.type, cmd.addr)
                return b"OK"
            if isinstance(cmd, C.Detach):
                return DetachAction()
            if isinstance(cmd, C.Kill):
                return KillAction()
            if isinstance(cmd, C.Supported):
                self.features = set(cmd.features)
                return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;vContSupported+"
                        % MAX_PACKET)
            if isinstance(cmd, C.StartNoAck):
                self.no_ack = True
                return b"OK"
            if isinstance(cmd, C.XferRead):
                if cmd.object != "features":
                    return b""
                if cmd.annex != "target.xml":
                    return error(EINVAL)
                chunk = self._xml[cmd.offset : cmd.offset + min(cmd.length, MAX_PACKET // 2)]
                more = cmd.offset + len(chunk) < len(self._xml)
                return (b"m" if more else b"l") + escape(chunk)
            if isinstance(cmd, C.Monitor):
                # Output as O packets (any length), then OK: the protocol's
                # way for qRcmd, so a long page-table view is not cut.
                text = t.monitor(cmd.command)
                if text and not text.endswith("\n"):
                    text += "\n"
                return console_packets(text) + [b"OK"]
            if isinstance(cmd, C.Simple):
                return self._simple(cmd.name)
        except MemoryFault as exc:
            return error(exc.code)
        except TargetError as exc:
            return error(exc.code)
        except ValueError:
            return error(EINVAL)
        return b""  # Unknown: the empty reply means "not supported"

    def _simple(self, name: str) -> bytes:
        if name == "thread":
            return b"OK"
        if name == "qC":
            return b"QC01"
        if name == "qAttached":
            return b"1"  # attached to an existing process: `quit` detaches, it does not kill
        if name == "qfThreadInfo":
            return b"m01"
        if name == "qsThreadInfo":
            return b"l"
        if name == "qOffsets":
            off = self.target.offsets()
            return b"Text=%x;Data=%x;Bss=%x" % (off, off, off)
        if name == "qSymbol":
            return b"OK"
        return b""
