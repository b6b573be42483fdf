"""GDB remote serial protocol: framing only (no sockets, no VM).

A packet on the wire is ``$payload#cs``: ``cs`` is two lower-case hex digits,
the sum of the payload's bytes modulo 256 (GDB manual, "Overview" of the
remote protocol). Inside a payload:

- ``}`` escapes the next byte, which is sent XOR 0x20; ``$``, ``#``, ``}``
  and ``*`` must be escaped in binary data (gdb escapes all four in ``X``);
- ``*`` is run-length encoding: ``c*N`` stands for ``c`` followed by
  ``ord(N) - 29`` more copies of ``c``. Only responses are supposed to use
  it. We never produce it (``*`` is always escaped in what we send, so a
  reply can never be mistaken for RLE), and we expand it on input, as gdb's
  own reader does, so a client that uses it is understood too.

The checksum covers the bytes as sent (escaped and RLE-encoded). Outside a
packet, ``+``/``-`` acknowledge or reject the last packet (until
``QStartNoAckMode``) and a bare 0x03 byte is the user's Ctrl-C.

:class:`Framer` is incremental: feed it whatever ``recv`` returned and it
yields typed events. Garbage between packets is skipped, an oversize packet is
dropped (its bytes are never buffered beyond the limit), and a client that
stops mid-packet leaves the framer waiting, never raising.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_PACKET",
    "Packet",
    "BadChecksum",
    "Malformed",
    "Oversize",
    "Interrupt",
    "Ack",
    "Nack",
    "Event",
    "PacketError",
    "checksum",
    "escape",
    "unescape",
    "rle_expand",
    "encode",
    "Framer",
]

#: The largest payload we accept (and advertise as PacketSize). gdb sizes its
#: memory requests to fit: ``m`` of 4 KiB needs 8 KiB of hex in the reply.
MAX_PACKET = 0x4000

_ESCAPE = 0x7D  # '}'
_ESCAPED = frozenset(b"$#}*")
_RLE_BIAS = 29  # the repeat count byte is count + 29 (so it is printable)
INTERRUPT = 0x03
_HEX2 = re.compile(rb"[0-9a-fA-F]{2}")
_FRAME_END = re.compile(rb"[#$]")


class PacketError(ValueError):
    """A payload that cannot be decoded (bad escape, bad RLE)."""


@dataclass(frozen=True, slots=True)
class Packet:
    """A well-formed packet: its payload, RLE expanded, ``}`` escapes still in
    place (only binary fields are unescaped, by the command decoder)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BadChecksum:
    """A complete packet whose checksum did not match (answered with ``-``)."""

    payload: bytes
    expected: int
    got: int | None  # None: the two checksum characters were not hex


@dataclass(frozen=True, slots=True)
class Malformed:
    """A packet with a good checksum whose run-length encoding is invalid."""

    payload: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Oversize:
    """A packet longer than the limit; its bytes were discarded."""

    length: int


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Ctrl-C: a 0x03 byte outside a packet."""


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Nack:
    pass


Event = Packet | BadChecksum | Malformed | Oversize | Interrupt | Ack | Nack


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary data made safe for a payload (``$#}*`` become ``}`` + byte ^ 0x20)."""
    if not any(b in _ESCAPED for b in data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out.append(_ESCAPE)
            out.append(b ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The inverse of :func:`escape`; a trailing lone ``}`` is an error."""
    if _ESCAPE not in data:
        return bytes(data)
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == _ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                raise PacketError("payload ends inside an escape")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def rle_expand(data: bytes, limit: int = MAX_PACKET) -> bytes:
    """Expand ``c*N`` runs. The byte before ``*`` is repeated as sent (it may be
    the second byte of an escape); the result is bounded by ``limit``."""
    if b"*" not in data:
        return bytes(data)
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b == 0x2A:  # '*'
            if not out or i + 1 >= n:
                raise PacketError("run-length marker without a byte to repeat or a count")
            count = data[i + 1] - _RLE_BIAS
            if count < 0:
                raise PacketError(f"run-length count byte {data[i + 1]:#04x} is below {_RLE_BIAS}")
            if len(out) + count > limit:
                raise PacketError(f"run-length expansion exceeds {limit} bytes")
            out += bytes([out[-1]]) * count
            i += 2
            continue
        out.append(b)
        i += 1
    return bytes(out)


def encode(payload: bytes) -> bytes:
    """``$payload#cs`` for a payload that is already escaped where needed.

    Hex and text payloads never contain ``$#}*``; binary parts must go
    through :func:`escape` first. A stray ``*`` or ``#`` here would corrupt
    the frame, so it is refused rather than sent.
    """
    if b"#" in payload or b"$" in payload or b"*" in payload:
        raise PacketError("unescaped framing byte in an outgoing payload")
    return b"$" + payload + b"#%02x" % checksum(payload)


class Framer:
    """Incremental parser of the byte stream a client sends.

    States: between packets (acks, Ctrl-C, garbage), inside a payload, and
    reading the two checksum characters. ``limit`` bounds the payload as
    sent; once exceeded, the rest of the packet is counted, not stored.
    """

    def __init__(self, limit: int = MAX_PACKET):
        self.limit = limit
        self._body = bytearray()
        self._state = 0  # 0 idle, 1 payload, 2 first checksum char, 3 second
        self._length = 0
        self._cs = bytearray()

    @property
    def mid_packet(self) -> bool:
        """True while a packet has started and not ended (a client that drops now left one)."""
        return self._state != 0

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        i, n = 0, len(data)
        while i < n:
            st = self._state
            if st == 1:
                # Payload bytes up to the next '#' or '$' in one slice (a 4 KiB
                # write is 8 KiB of hex: no per-byte Python here). As gdb's own
                # reader: '#' always ends the payload (an escaped '#' travels
                # as '}' 0x03), and a '$' inside one means the previous packet
                # was cut short: start over with the new one.
                m = _FRAME_END.search(data, i)
                end = m.start() if m else n
                if end > i:
                    room = self.limit - self._length
                    if room > 0:
                        self._body += data[i : min(end, i + room)]
                    self._length += end - i
                i = end
                if m is None:
                    break
                i += 1
                if data[end] == 0x23:  # '#'
                    self._state = 2
                    self._cs.clear()
                else:
                    self._body.clear()
                    self._length = 0
                continue
            b = data[i]
            i += 1
            if st == 0:
                if b == 0x24:  # '$'
                    self._state = 1
                    self._body.clear()
                    self._length = 0
                elif b == 0x2B:
                    events.append(Ack())
                elif b == 0x2D:
                    events.append(Nack())
                elif b == INTERRUPT:
                    events.append(Interrupt())
                # anything else between packets is line noise: skipped
            else:
                self._cs.append(b)
                if st == 2:
                    self._state = 3
                    continue
                self._state = 0
                events.append(self._finish())
        return events

    def _finish(self) -> Event:
        body = bytes(self._body)
        if self._length > self.limit:
            return Oversize(self._length)
        expected = checksum(body)
        got = int(self._cs, 16) if _HEX2.fullmatch(self._cs) else None
        if got != expected:
            return BadChecksum(body, expected, got)
        try:
            return Packet(rle_expand(body, self.limit * 2))
        except PacketError as exc:
            return Malformed(body, str(exc))
