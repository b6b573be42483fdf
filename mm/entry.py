"""Decoding/encoding of one page-table entry; the levels themselves are data
in ``mm.levels`` (re-exported here).

Levels are numbered as the SDM does: 5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
"""

from __future__ import annotations

from dataclasses import dataclass

from .addr import PAGE_1G, PAGE_4K, PHYS_ADDR_BITS, PageSize
from .errors import AddressError, Misaligned
from .flags import ADDR_MASK, FLAGS_MASK, PteFlags
from .levels import ENTRIES_PER_TABLE, LEVELS, PML5, Level

__all__ = [
    "Level",
    "LEVELS",
    "LEVEL_BY_NUMBER",
    "PML5",
    "ENTRIES_PER_TABLE",
    "Entry",
    "reserved_mask",
    "leaf_addr_mask",
    "leaf_level_for",
]

#: Every level an entry can be read at (5-level paging's PML5 included).
LEVEL_BY_NUMBER = {lv.number: lv for lv in (PML5, *LEVELS)}
#: The level whose leaves map each page size: a huge-capable level, or the last.
_LEAF_LEVEL = {PageSize(lv.span): lv.number for lv in LEVELS if lv.may_be_huge or lv.is_last}


def _reserved_ps(lv: Level) -> bool:
    """PS (bit 7) is reserved at a level that is neither huge-capable nor the last (PML4E, PML5E)."""
    return not lv.may_be_huge and not lv.is_last


def leaf_level_for(size: int) -> int:
    """Level number whose leaves map pages of ``size`` bytes."""
    try:
        return _LEAF_LEVEL[PageSize(size)]
    except ValueError:
        raise ValueError(f"unsupported page size {size:#x}") from None


def leaf_addr_mask(level: int) -> int:
    """Mask of the page-frame address bits of a leaf at ``level``.

    A 2 MiB / 1 GiB leaf keeps only bits 51:21 / 51:30: the low bits of its
    address field hold the PAT bit (12) and reserved bits.
    """
    return ADDR_MASK & ~((1 << LEVEL_BY_NUMBER[level].shift) - 1)


def reserved_mask(
    level: int, huge: bool, maxphyaddr: int = PHYS_ADDR_BITS, nxe: bool = True, gbpages: bool = True
) -> int:
    """Bits that must be 0 in a present entry, else the walk faults with RSVD=1.

    SDM 4.5.4 and tables 4-15..4-20: bits 51:MAXPHYADDR in every entry; bit 63
    (XD) if EFER.NXE=0; PS (bit 7) in a PML4E (and PML5E), and in a PDPTE without 1 GiB
    page support; address bits below the page alignment of a large leaf except
    bit 12, which is its PAT bit.
    """
    if not 32 <= maxphyaddr <= PHYS_ADDR_BITS:
        raise ValueError(f"MAXPHYADDR {maxphyaddr} outside [32, 52]")
    lv = LEVEL_BY_NUMBER[level]
    mask = ((1 << PHYS_ADDR_BITS) - 1) & ~((1 << maxphyaddr) - 1)
    if not nxe:
        mask |= PteFlags.NO_EXECUTE
    if _reserved_ps(lv):
        mask |= PteFlags.HUGE
    elif lv.span == PAGE_1G and not gbpages:  # 1 GiB leaves are a CPU feature (CPUID Page1GB)
        mask |= PteFlags.HUGE
    if huge and lv.may_be_huge:
        mask |= ((1 << lv.shift) - 1) & ~((1 << 13) - 1)  # bits shift-1 .. 13
    return int(mask)


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded page-table entry: the raw ``value`` read at paging ``level``."""

    value: int
    level: int

    @classmethod
    def decode(cls, value: int, level: int) -> "Entry":
        """Wrap a raw 64-bit entry read from a table of ``level``."""
        if level not in LEVEL_BY_NUMBER:
            raise ValueError(f"no paging level {level}")
        return cls(int(value) & ((1 << 64) - 1), level)

    @classmethod
    def encode(cls, address: int, flags: PteFlags | int, level: int) -> "Entry":
        """Build an entry; ``flags`` with HUGE at a huge-capable level (PDPT, PD) make it a large leaf.

        ``address`` must be aligned to the page (or table) it designates and
        below 2**52; ``flags`` must not contain address bits (PAT_HUGE is
        accepted only in a large leaf).
        """
        flags = int(flags)
        lv = LEVEL_BY_NUMBER[level]
        huge = lv.may_be_huge and bool(flags & PteFlags.HUGE)
        align = lv.span if huge else PAGE_4K
        if not 0 <= address < (1 << PHYS_ADDR_BITS):
            raise AddressError(address, "physical address outside [0, 2**52)")
        if address % align:
            raise Misaligned(address, align)
        allowed = FLAGS_MASK | (PteFlags.PAT_HUGE if huge else 0)
        if flags & ~allowed:
            raise ValueError(f"flags {flags:#x} overlap the address field at level {level}")
        if _reserved_ps(lv) and flags & PteFlags.HUGE:
            raise ValueError(f"PS (bit 7) is reserved in a {lv.name} entry")
        return cls(address | flags, level)

    @property
    def present(self) -> bool:
        return bool(self.value & PteFlags.PRESENT)

    @property
    def is_huge(self) -> bool:
        """PS=1 in a PDPTE/PDE (bit 7 means PAT in a PTE and is reserved in a PML4E/PML5E)."""
        return LEVEL_BY_NUMBER[self.level].may_be_huge and bool(self.value & PteFlags.HUGE)

    @property
    def is_leaf(self) -> bool:
        """True if this entry maps a page rather than pointing at a table."""
        return LEVEL_BY_NUMBER[self.level].is_last or self.is_huge

    @property
    def page_size(self) -> PageSize | None:
        """Size of the page a leaf maps, None for a table pointer."""
        return PageSize(LEVEL_BY_NUMBER[self.level].span) if self.is_leaf else None

    @property
    def address(self) -> int:
        """Physical address of the next table, or of the page a leaf maps."""
        if self.is_huge:
            return self.value & leaf_addr_mask(self.level)
        return self.value & ADDR_MASK

    @property
    def flags(self) -> PteFlags:
        """The non-address bits (with PAT_HUGE for a large leaf)."""
        mask = FLAGS_MASK | (PteFlags.PAT_HUGE if self.is_huge else 0)
        return PteFlags(self.value & mask)

    def reserved_bits(self, maxphyaddr: int = PHYS_ADDR_BITS, nxe: bool = True, gbpages: bool = True) -> int:
        """Reserved bits that are set (non-zero means the hardware faults here)."""
        return self.value & reserved_mask(self.level, self.is_huge, maxphyaddr, nxe, gbpages)

    def __repr__(self) -> str:
        lv = LEVEL_BY_NUMBER[self.level].name
        if not self.present:
            return f"Entry({lv}, {self.value:#x}, not present)"
        kind = f"leaf {self.page_size.name}" if self.is_leaf else "table"
        return f"Entry({lv}, {kind}, addr={self.address:#x}, flags={self.flags!r})"
