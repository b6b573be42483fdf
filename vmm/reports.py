"""Decode guest report records (docs/ABI.md, "Report record").

Pure and defensive: the bytes come from the guest. ``decode_report`` either
returns a ``Report`` or raises ``ReportError`` with a one-line reason.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from .abi import REPORT_HEADER_SIZE, REPORT_MAGIC, REPORT_MAX_PAYLOAD, ReportKind

_HEADER = struct.Struct("<IIII")
_KEY = re.compile(r"[a-z0-9_]+\Z")


class ReportError(ValueError):
    """A malformed report record."""


@dataclass
class Report:
    kind: ReportKind | int
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def kind_name(self) -> str:
        return self.kind.name if isinstance(self.kind, ReportKind) else f"kind_{self.kind}"

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)

    def int(self, key: str, default: int | None = None) -> int | None:
        """A field as an integer (decimal or 0x-hex); default if absent or bad."""
        raw = self.fields.get(key)
        if raw is None:
            return default
        try:
            return int(raw, 0)
        except ValueError:
            return default

    def to_json(self) -> dict:
        return {"kind": self.kind_name, "fields": dict(self.fields)}


def parse_header(data: bytes) -> tuple[int, int]:
    """Validate a 16-byte header; returns (kind, payload length)."""
    if len(data) < REPORT_HEADER_SIZE:
        raise ReportError("report header truncated")
    magic, kind, length, _reserved = _HEADER.unpack_from(data)
    if magic != REPORT_MAGIC:
        raise ReportError(f"bad report magic {magic:#010x}")
    if length > REPORT_MAX_PAYLOAD:
        raise ReportError(f"report payload of {length} bytes exceeds {REPORT_MAX_PAYLOAD}")
    return kind, length


def decode_payload(kind: int, payload: bytes) -> Report:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ReportError("report payload is not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not _KEY.match(key):
            raise ReportError(f"bad report line {line[:40]!r}")
        fields[key] = value
    try:
        k: ReportKind | int = ReportKind(kind)
    except ValueError:
        k = kind
    return Report(k, fields)


def decode_report(data: bytes) -> Report:
    """Decode a whole record (header plus payload) from bytes."""
    kind, length = parse_header(data)
    if len(data) < REPORT_HEADER_SIZE + length:
        raise ReportError("report payload truncated")
    return decode_payload(kind, data[REPORT_HEADER_SIZE : REPORT_HEADER_SIZE + length])


def encode_report(kind: int, fields: dict[str, object]) -> bytes:
    """The inverse of decode_report (used by tests and fuzzers)."""
    payload = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
    return _HEADER.pack(REPORT_MAGIC, int(kind), len(payload), 0) + payload
