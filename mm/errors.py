"""Errors raised by the memory model.

Every error derives from :class:`MMError` and carries the address (and, where
it applies, the paging level and raw entry) that caused it, so a caller can
report it without re-deriving anything.
"""

from __future__ import annotations

__all__ = [
    "MMError",
    "AddressError",
    "OutOfBounds",
    "Misaligned",
    "OutOfFrames",
    "AlreadyMapped",
    "ParentIsHuge",
    "WXViolation",
    "NotMapped",
    "MemoryMapError",
]

LEVEL_NAMES = {4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}


def _level_name(level: int) -> str:
    return LEVEL_NAMES.get(level, f"L{level}")


class MMError(Exception):
    """Base class of all memory-model errors."""


class AddressError(MMError, ValueError):
    """An address is out of its architectural range (non-canonical, > 52 bits)."""

    def __init__(self, addr: int, reason: str) -> None:
        self.addr = addr
        super().__init__(f"{addr:#_x}: {reason}")


class OutOfBounds(MMError, IndexError):
    """An access to physical memory falls (partly) outside the backing buffer."""

    def __init__(self, paddr: int, n: int, base: int, size: int) -> None:
        self.paddr, self.n, self.base, self.size = paddr, n, base, size
        super().__init__(
            f"physical access [{paddr:#_x}, +{n:#_x}) outside memory [{base:#_x}, {base + size:#_x})"
        )


class NotCopied(MMError, LookupError):
    """A read of a frame a :class:`~mm.physmem.FrameCopy` did not copy."""

    def __init__(self, paddr: int) -> None:
        self.paddr = paddr
        super().__init__(f"frame {paddr:#_x} was not copied")


class Misaligned(MMError, ValueError):
    """An address or length is not a multiple of the required alignment."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr, self.size = addr, size
        super().__init__(f"{addr:#_x} is not aligned to {size:#_x}")


class OutOfFrames(MMError):
    """The frame allocator has no 4 KiB frame left."""

    def __init__(self, detail: str = "frame allocator exhausted") -> None:
        super().__init__(detail)


class _EntryError(MMError):
    """An error about the entry found at ``level`` while handling ``virt``."""

    what = ""

    def __init__(self, virt: int, level: int, entry: int) -> None:
        self.virt, self.level, self.entry = virt, level, entry
        super().__init__(
            f"{virt:#_x}: {self.what} ({_level_name(level)} entry {entry:#018x})"
        )


class AlreadyMapped(_EntryError):
    """The target page already has a present leaf entry."""

    what = "already mapped"


class ParentIsHuge(_EntryError):
    """A parent entry on the way down maps a large page, so no table exists below it."""

    what = "parent entry maps a huge page"


class WXViolation(MMError):
    """A mapping would be writable and executable while W^X is enforced."""

    def __init__(self, virt: int) -> None:
        self.virt = virt
        super().__init__(f"{virt:#_x}: writable and executable mapping refused (W^X)")


class NotMapped(MMError):
    """No present translation exists for the address."""

    def __init__(self, virt: int, level: int | None = None, entry: int | None = None) -> None:
        self.virt, self.level, self.entry = virt, level, entry
        where = "" if level is None else f" (non-present {_level_name(level)} entry {entry or 0:#_x})"
        super().__init__(f"{virt:#_x}: not mapped{where}")


class MemoryMapError(MMError, ValueError):
    """A memory map is malformed, or a carve request is invalid."""
