"""Paging levels as data: the one place that knows how many levels there are.

Levels are numbered as the SDM does: 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
Everything else -- the linear-address width and so the canonical hole, which
level maps which page size, where an address indexes a table -- is derived
from ``LEVELS`` (or from the ``levels`` a caller passes), so 5-level paging is
``(PML5, *LEVELS)``, a data change. This module imports nothing: ``mm.addr``
derives the 4-level address width from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["ENTRIES_PER_TABLE", "INDEX_BITS", "Level", "LEVELS", "PML5", "linear_bits"]

#: Each table is one 4 KiB frame of 512 eight-byte entries, so each level
#: consumes 9 bits of the linear address.
ENTRIES_PER_TABLE = 512
INDEX_BITS = 9
#: Bits 11:0 of a linear address are the offset in its 4 KiB page.
_PAGE_SHIFT = 12


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

    @property
    def table_span(self) -> int:
        """Bytes mapped by one whole table of this level."""
        return 1 << (self.shift + INDEX_BITS)

    @property
    def is_last(self) -> bool:
        """The level whose entries always map 4 KiB pages (the PT): there bit 7
        is the PAT bit, not PS."""
        return self.shift == _PAGE_SHIFT

    def index(self, virt: int) -> int:
        """The entry of a table of this level that ``virt`` selects."""
        return (virt >> self.shift) & (ENTRIES_PER_TABLE - 1)


#: 4-level paging, top-down.
LEVELS: tuple[Level, ...] = (
    Level("PML4", 4, 39, False),
    Level("PDPT", 3, 30, True),
    Level("PD", 2, 21, True),
    Level("PT", 1, 12, False),
)
#: The top level of 5-level paging (CR4.LA57): walk and map with
#: ``levels=(PML5, *LEVELS)``. PS is reserved in a PML5E as in a PML4E: both
#: are neither huge-capable nor the last level (``mm.entry.reserved_mask``).
PML5 = Level("PML5", 5, 48, False)


def linear_bits(levels: Sequence[Level] = LEVELS) -> int:
    """Width of the linear address that ``levels`` translate (48 for 4-level, 57 for 5)."""
    return levels[0].shift + INDEX_BITS
