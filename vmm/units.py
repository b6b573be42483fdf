"""Sizes, durations and addresses as people type and read them (pure).

The parsers are argparse ``type=`` callables: bad text raises
``argparse.ArgumentTypeError`` with one line saying what was expected.
"""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_PAGE_SIZES = {"4k": 4096, "2m": 2 << 20, "1g": 1 << 30}


def parse_size(text: str) -> int:
    """'64M', '2G', '128MiB', '16777216' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse memory size {text!r} (examples: 64M, 2G, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_sizes(text: str) -> list[int]:
    """'16M,64G' -> [16 MiB, 64 GiB]."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_timeout(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"timeout must be a positive number of seconds, got {text!r}")
    return value


def parse_slide(text: str) -> int:
    """A non-negative integer in any base Python accepts (0x200000)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"slide {text!r} is not an integer (e.g. 0x200000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("slide must not be negative")
    return value


def parse_page_size(text: str) -> int:
    """'4K', '2M', '1G' (with or without 'iB'/'B') -> bytes."""
    try:
        return _PAGE_SIZES[text.strip().lower().removesuffix("ib").removesuffix("b")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"page size {text!r} is not one of 4K, 2M, 1G") from None


def parse_range(text: str) -> tuple[int, int]:
    """'START:END' -> (start, end), a non-empty half-open range."""
    try:
        lo, hi = (int(x, 0) for x in text.split(":", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"range {text!r} is not START:END (e.g. 0xffff800000000000:0xffff800040000000)") from None
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"range {text!r} is empty")
    return lo, hi


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def human_size(n: int) -> str:
    """``4 KiB``, ``1.5 GiB``: binary units, exact where possible."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} B"


def hex_addr(x: int, digits: int = 16) -> str:
    """``0xffff_8000_0000_0000``: zero-padded hex in groups of four."""
    width = digits + (digits - 1) // 4 + 2
    return f"{x:#0{width}_x}"
