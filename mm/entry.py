"""Paging levels as data, and decoding/encoding of one page-table entry.

Levels are numbered as the SDM does: 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
"""

from __future__ import annotations

from dataclasses import dataclass

from .addr import PAGE_4K, PHYS_ADDR_BITS, PageSize
from .errors import AddressError, Misaligned
from .flags import ADDR_MASK, FLAGS_MASK, PteFlags

__all__ = [
    "Level",
    "LEVELS",
    "LEVEL_BY_NUMBER",
    "ENTRIES_PER_TABLE",
    "Entry",
    "reserved_mask",
    "leaf_addr_mask",
    "leaf_level_for",
]

ENTRIES_PER_TABLE = 512


@dataclass(frozen=True, slots=True)
class Level:
    """One paging level: its name, the shift of its index, whether PS may be set."""

    name: str
    number: int
    shift: int
    may_be_huge: bool

    @property
    def span(self) -> int:
        """Bytes mapped by one entry of this level."""
        return 1 << self.shift


#: 4-level paging, top-down. 5-level paging would prepend ("PML5", 5, 48, False)
#: (and teach reserved_mask that PS is reserved in a PML5E too).
LEVELS: tuple[Level, ...] = (
    Level("PML4", 4, 39, False),
    Level("PDPT", 3, 30, True),
    Level("PD", 2, 21, True),
    Level("PT", 1, 12, False),
)
LEVEL_BY_NUMBER = {lv.number: lv for lv in LEVELS}
_LEAF_LEVEL = {PageSize.SIZE_4K: 1, PageSize.SIZE_2M: 2, PageSize.SIZE_1G: 3}


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
    (XD) if EFER.NXE=0; PS (bit 7) in a PML4E, and in a PDPTE without 1 GiB
    page support; address bits below the page alignment of a large leaf except
    bit 12, which is its PAT bit.
    """
    if not 32 <= maxphyaddr <= PHYS_ADDR_BITS:
        raise ValueError(f"MAXPHYADDR {maxphyaddr} outside [32, 52]")
    mask = ((1 << PHYS_ADDR_BITS) - 1) & ~((1 << maxphyaddr) - 1)
    if not nxe:
        mask |= PteFlags.NO_EXECUTE
    if level == 4:
        mask |= PteFlags.HUGE
    elif level == 3 and not gbpages:
        mask |= PteFlags.HUGE
    if huge and level in (2, 3):
        shift = LEVEL_BY_NUMBER[level].shift
        mask |= ((1 << shift) - 1) & ~((1 << 13) - 1)  # bits shift-1 .. 13
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
        """Build an entry; ``flags`` with HUGE at level 2/3 make it a large leaf.

        ``address`` must be aligned to the page (or table) it designates and
        below 2**52; ``flags`` must not contain address bits (PAT_HUGE is
        accepted only in a large leaf).
        """
        flags = int(flags)
        huge = level in (2, 3) and bool(flags & PteFlags.HUGE)
        align = LEVEL_BY_NUMBER[level].span if huge else PAGE_4K
        if not 0 <= address < (1 << PHYS_ADDR_BITS):
            raise AddressError(address, "physical address outside [0, 2**52)")
        if address % align:
            raise Misaligned(address, align)
        allowed = FLAGS_MASK | (PteFlags.PAT_HUGE if huge else 0)
        if flags & ~allowed:
            raise ValueError(f"flags {flags:#x} overlap the address field at level {level}")
        if level == 4 and flags & PteFlags.HUGE:
            raise ValueError("PS (bit 7) is reserved in a PML4 entry")
        return cls(address | flags, level)

    @property
    def present(self) -> bool:
        return bool(self.value & PteFlags.PRESENT)

    @property
    def is_huge(self) -> bool:
        """PS=1 in a PDPTE/PDE (bit 7 means PAT in a PTE and is reserved in a PML4E)."""
        return self.level in (2, 3) and bool(self.value & PteFlags.HUGE)

    @property
    def is_leaf(self) -> bool:
        """True if this entry maps a page rather than pointing at a table."""
        return self.level == 1 or self.is_huge

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
