"""Typed x86-64 addresses and alignment helpers.

``PhysAddr`` and ``VirtAddr`` are ``int`` subclasses that validate on
construction (as the x86_64 crate's types do); hot paths may keep plain ints
and validate at the boundary.
"""

from __future__ import annotations

from enum import IntEnum

from .errors import AddressError
from .levels import ENTRIES_PER_TABLE, LEVELS, linear_bits

__all__ = [
    "PAGE_4K",
    "PAGE_2M",
    "PAGE_1G",
    "PageSize",
    "PHYS_ADDR_BITS",
    "VIRT_ADDR_BITS",
    "PhysAddr",
    "VirtAddr",
    "canonicalize",
    "is_canonical",
    "align_down",
    "align_up",
    "is_aligned",
]

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30

#: Architectural maximum physical-address width (SDM: MAXPHYADDR <= 52).
PHYS_ADDR_BITS = 52
#: Linear-address width of the paging levels (48 with 4-level paging).
VIRT_ADDR_BITS = linear_bits(LEVELS)

_U64 = (1 << 64) - 1


class PageSize(IntEnum):
    """The three page sizes of 4-level paging."""

    SIZE_4K = PAGE_4K
    SIZE_2M = PAGE_2M
    SIZE_1G = PAGE_1G


def canonicalize(x: int, bits: int = VIRT_ADDR_BITS) -> int:
    """Sign-extend bit ``bits-1`` of ``x`` (47 with 4-level paging; the bits
    above it are discarded first)."""
    low = (1 << bits) - 1
    x &= low
    return x | (_U64 ^ low) if x >> (bits - 1) else x


def is_canonical(x: int, bits: int = VIRT_ADDR_BITS) -> bool:
    """True if bits 63..``bits-1`` of the 64-bit value ``x`` are all equal."""
    return 0 <= x <= _U64 and canonicalize(x, bits) == x


def is_aligned(x: int, a: int) -> bool:
    """True if ``x`` is a multiple of the power of two ``a``."""
    return x & (a - 1) == 0


def align_down(x: int, a: int) -> int:
    """Round ``x`` down to a multiple of the power of two ``a``."""
    return x & ~(a - 1)


def align_up(x: int, a: int) -> int:
    """Round ``x`` up to a multiple of the power of two ``a``."""
    return (x + a - 1) & ~(a - 1)


class PhysAddr(int):
    """A physical address: 0 <= value < 2**52."""

    __slots__ = ()

    def __new__(cls, value: int) -> "PhysAddr":
        value = int(value)
        if not 0 <= value < (1 << PHYS_ADDR_BITS):
            raise AddressError(value, f"physical address outside [0, 2**{PHYS_ADDR_BITS})")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"PhysAddr({int(self):#_x})"


class VirtAddr(int):
    """A canonical 64-bit virtual address of ``LEVELS`` paging (bits 63..47 all equal with 4 levels)."""

    __slots__ = ()

    def __new__(cls, value: int) -> "VirtAddr":
        value = int(value)
        if not is_canonical(value):
            raise AddressError(value, f"non-canonical virtual address (bits 63..{VIRT_ADDR_BITS - 1} differ)")
        return super().__new__(cls, value)

    @classmethod
    def from_index(cls, pml4: int, pdpt: int = 0, pd: int = 0, pt: int = 0, offset: int = 0) -> "VirtAddr":
        """Build the canonical address selected by the four 9-bit table indices."""
        for name, i in (("pml4", pml4), ("pdpt", pdpt), ("pd", pd), ("pt", pt)):
            if not 0 <= i < ENTRIES_PER_TABLE:
                raise AddressError(i, f"{name} index outside [0, {ENTRIES_PER_TABLE})")
        if not 0 <= offset < PAGE_4K:
            raise AddressError(offset, "page offset outside [0, 4096)")
        lin = offset
        for lv, i in zip(LEVELS, (pml4, pdpt, pd, pt)):
            lin |= i << lv.shift
        return cls(canonicalize(lin))

    def indices(self) -> tuple[int, ...]:
        """The table index at each of ``LEVELS`` (``(pml4, pdpt, pd, pt)``), then the page offset."""
        v = int(self)
        return (*(lv.index(v) for lv in LEVELS), v & (PAGE_4K - 1))

    def __repr__(self) -> str:
        return f"VirtAddr({int(self):#_x})"
