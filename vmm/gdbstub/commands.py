"""GDB remote protocol: a packet's payload decoded into a typed command.

Decode first, then handle: the session never looks at raw bytes. Numbers
are hex as the protocol says, bounded (addresses to 64 bits, lengths to
``MAX_LENGTH``); anything malformed raises :class:`BadCommand`, which the
session answers with an error reply. A packet we do not know becomes
:class:`Unknown`, answered with the empty reply the protocol prescribes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .packets import MAX_PACKET, PacketError, unescape

#: Bytes one m/M/X may move: the reply (hex) must fit in one packet.
MAX_LENGTH = MAX_PACKET // 2

_HEX = re.compile(rb"[0-9a-fA-F]+")


class BadCommand(ValueError):
    """A known packet with malformed arguments (answered with ``E``)."""


def _hex(text: bytes, what: str, bits: int = 64) -> int:
    if not _HEX.fullmatch(text) or len(text) > (bits + 3) // 4 + 16:
        raise BadCommand(f"bad {what}: {text[:32]!r}")
    value = int(text, 16)
    if value >> bits:
        raise BadCommand(f"{what} {value:#x} does not fit in {bits} bits")
    return value


def _hexbytes(text: bytes, what: str) -> bytes:
    if len(text) % 2:
        raise BadCommand(f"odd number of hex digits in {what}")
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadCommand(f"bad hex in {what}") from None


def _addr_len(text: bytes) -> tuple[int, int]:
    addr, sep, length = text.partition(b",")
    if not sep:
        raise BadCommand("expected ADDR,LENGTH")
    a = _hex(addr, "address")
    n = _hex(length, "length")
    if n > MAX_LENGTH:
        raise BadCommand(f"length {n:#x} is above the packet limit {MAX_LENGTH:#x}")
    return a, n


# --- the commands ---------------------------------------------------------------


@dataclass(frozen=True)
class QueryHalt:  # ?
    pass


@dataclass(frozen=True)
class ReadRegisters:  # g
    pass


@dataclass(frozen=True)
class WriteRegisters:  # G
    data: bytes


@dataclass(frozen=True)
class ReadRegister:  # p n
    number: int


@dataclass(frozen=True)
class WriteRegister:  # P n=v
    number: int
    data: bytes


@dataclass(frozen=True)
class ReadMemory:  # m addr,len
    addr: int
    length: int


@dataclass(frozen=True)
class WriteMemory:  # M addr,len:hex / X addr,len:binary
    addr: int
    data: bytes


@dataclass(frozen=True)
class Resume:
    """c / s / C / S / vCont: ``step`` or continue, optionally from ``addr``."""

    step: bool
    addr: int | None = None
    signal: int = 0


@dataclass(frozen=True)
class VContQuery:  # vCont?
    pass


@dataclass(frozen=True)
class Breakpoint:  # Z/z type,addr,kind
    insert: bool
    type: int  # 0 software, 1 hardware, 2 write, 3 read, 4 access watchpoint
    addr: int
    kind: int


@dataclass(frozen=True)
class Detach:  # D
    pass


@dataclass(frozen=True)
class Kill:  # k, vKill
    pass


@dataclass(frozen=True)
class Supported:  # qSupported
    features: tuple[bytes, ...]


@dataclass(frozen=True)
class StartNoAck:  # QStartNoAckMode
    pass


@dataclass(frozen=True)
class XferRead:  # qXfer:OBJECT:read:ANNEX:OFFSET,LENGTH
    object: str
    annex: str
    offset: int
    length: int


@dataclass(frozen=True)
class Monitor:  # qRcmd,hex
    command: str


@dataclass(frozen=True)
class Simple:
    """A query with a fixed answer (threads, attach state, offsets...)."""

    name: str


@dataclass(frozen=True)
class Unknown:
    payload: bytes


Command = (
    QueryHalt | ReadRegisters | WriteRegisters | ReadRegister | WriteRegister | ReadMemory | WriteMemory
    | Resume | VContQuery | Breakpoint | Detach | Kill | Supported | StartNoAck | XferRead | Monitor
    | Simple | Unknown
)

# Queries answered by name (their arguments do not matter to a one-thread target).
_SIMPLE = {
    b"qC": "qC",
    b"qAttached": "qAttached",
    b"qfThreadInfo": "qfThreadInfo",
    b"qsThreadInfo": "qsThreadInfo",
    b"qOffsets": "qOffsets",
    b"qSymbol": "qSymbol",
    b"qTStatus": "qTStatus",
}


def _resume(args: bytes, step: bool, with_signal: bool) -> Resume:
    sig = 0
    if with_signal:
        sig_text, _, args = args.partition(b";")
        sig = _hex(sig_text, "signal", 8)
    addr = _hex(args, "address") if args else None
    return Resume(step, addr, sig)


def _vcont(args: bytes) -> Resume:
    """``vCont;ACTION[:THREAD]...``: one thread here, so the first action
    that applies to it (all actions do) decides; stepping wins over continue."""
    actions = [a for a in args.split(b";") if a]
    if not actions:
        raise BadCommand("vCont without actions")
    step = False
    sig = 0
    for a in actions:
        act, _, _thread = a.partition(b":")
        code = act[:1]
        if code in (b"c", b"s"):
            if len(act) != 1:
                raise BadCommand(f"bad vCont action {act!r}")
        elif code in (b"C", b"S"):
            sig = _hex(act[1:], "signal", 8)
        elif code == b"t":
            continue  # stop a thread: our only thread is already stopped
        elif code == b"r":
            raise BadCommand("vCont;r (range stepping) is not supported")
        else:
            raise BadCommand(f"bad vCont action {act!r}")
        step = step or code in (b"s", b"S")
    return Resume(step, None, sig)


def decode(payload: bytes) -> Command:
    """The command in ``payload`` (RLE already expanded, escapes in place)."""
    if not payload:
        return Unknown(payload)
    head, rest = payload[:1], payload[1:]
    try:
        if payload == b"?":
            return QueryHalt()
        if payload == b"g":
            return ReadRegisters()
        if head == b"G":
            return WriteRegisters(_hexbytes(rest, "registers"))
        if head == b"p":
            return ReadRegister(_hex(rest, "register number", 16))
        if head == b"P":
            num, sep, val = rest.partition(b"=")
            if not sep:
                raise BadCommand("expected P n=value")
            return WriteRegister(_hex(num, "register number", 16), _hexbytes(val, "register value"))
        if head == b"m":
            return ReadMemory(*_addr_len(rest))
        if head in (b"M", b"X"):
            where, sep, data = rest.partition(b":")
            if not sep:
                raise BadCommand(f"expected {head.decode()} addr,length:data")
            addr, n = _addr_len(where)
            try:
                raw = _hexbytes(data, "memory data") if head == b"M" else unescape(data)
            except PacketError as exc:
                raise BadCommand(str(exc)) from None
            if len(raw) != n:
                raise BadCommand(f"length {n:#x} does not match the {len(raw):#x} bytes sent")
            return WriteMemory(addr, raw)
        if head in (b"c", b"s"):
            return _resume(rest, head == b"s", False)
        if head in (b"C", b"S"):
            return _resume(rest, head == b"S", True)
        if payload == b"vCont?":
            return VContQuery()
        if payload.startswith(b"vCont;"):
            return _vcont(payload[6:])
        if head in (b"Z", b"z"):
            parts = rest.split(b";", 1)[0].split(b",")
            if len(parts) != 3:
                raise BadCommand("expected Z type,addr,kind")
            return Breakpoint(head == b"Z", _hex(parts[0], "breakpoint type", 8), _hex(parts[1], "address"),
                              _hex(parts[2], "kind", 16))
        if head == b"D":
            return Detach()
        if payload == b"k" or payload.startswith(b"vKill"):
            return Kill()
        if payload.startswith(b"qSupported"):
            feats = payload[11:].split(b";") if payload.startswith(b"qSupported:") else []
            return Supported(tuple(f for f in feats if f))
        if payload == b"QStartNoAckMode":
            return StartNoAck()
        if payload.startswith(b"qXfer:"):
            fields = payload[6:].split(b":")
            if len(fields) != 4 or fields[1] != b"read":
                return Unknown(payload)
            off, n = _addr_len(fields[3]) if b"," in fields[3] else (None, None)
            if off is None:
                raise BadCommand("expected qXfer offset,length")
            return XferRead(fields[0].decode("ascii", "replace"), fields[2].decode("ascii", "replace"), off, n)
        if payload.startswith(b"qRcmd,"):
            text = _hexbytes(payload[6:], "monitor command")
            return Monitor(text.decode("utf-8", "replace"))
        if head == b"H" or head == b"T":
            return Simple("thread")  # select/query thread: the one vCPU
        name = payload.split(b":", 1)[0].split(b",", 1)[0]
        if name in _SIMPLE:
            return Simple(_SIMPLE[name])
    except BadCommand:
        raise
    except (ValueError, UnicodeDecodeError) as exc:  # pragma: no cover - every path above raises BadCommand
        raise BadCommand(str(exc)) from None
    return Unknown(payload)
