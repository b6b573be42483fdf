"""Page-table entry bits (Intel SDM Vol. 3A, 4.5, tables 4-15 to 4-20)."""

from __future__ import annotations

from enum import IntFlag

__all__ = ["PteFlags", "ADDR_MASK", "FLAGS_MASK", "PERM_MASK"]


class PteFlags(IntFlag):
    """Bits of a 4-level paging entry; one line each on what the hardware does."""

    #: Bit 0: the entry is used; if clear, the access faults (#PF, P=0) and bits 63:1 are ignored.
    PRESENT = 1 << 0
    #: Bit 1: R/W; writes are allowed only if set at every level (or CPL0 with CR0.WP=0).
    WRITABLE = 1 << 1
    #: Bit 2: U/S; CPL3 accesses are allowed only if set at every level.
    USER = 1 << 2
    #: Bit 3: PWT; page-level write-through, one of the three bits indexing the PAT.
    WRITE_THROUGH = 1 << 3
    #: Bit 4: PCD; page-level cache disable, one of the three bits indexing the PAT.
    CACHE_DISABLE = 1 << 4
    #: Bit 5: set by the CPU when the entry is used for a translation.
    ACCESSED = 1 << 5
    #: Bit 6: set by the CPU on the first write through a leaf entry (ignored in non-leaf entries).
    DIRTY = 1 << 6
    #: Bit 7: PS in PDPTE/PDE: the entry maps a 1 GiB/2 MiB page; reserved in PML4E; PAT bit in a 4 KiB PTE.
    HUGE = 1 << 7
    #: Bit 8: global leaf; its TLB entry survives CR3 loads when CR4.PGE=1 (ignored in non-leaf entries).
    GLOBAL = 1 << 8
    #: Bit 9: ignored by the hardware, free for software.
    AVAIL_9 = 1 << 9
    #: Bit 10: ignored by the hardware, free for software.
    AVAIL_10 = 1 << 10
    #: Bit 11: ignored by the hardware (HLAT restart with some features), free for software.
    AVAIL_11 = 1 << 11
    #: Bit 12: PAT bit of a 1 GiB/2 MiB leaf (an address bit everywhere else).
    PAT_HUGE = 1 << 12
    #: Bit 52: ignored by the hardware, free for software.
    AVAIL_52 = 1 << 52
    #: Bit 53: ignored by the hardware, free for software.
    AVAIL_53 = 1 << 53
    #: Bit 54: ignored by the hardware, free for software.
    AVAIL_54 = 1 << 54
    #: Bit 55: ignored by the hardware, free for software.
    AVAIL_55 = 1 << 55
    #: Bit 56: ignored by the hardware, free for software.
    AVAIL_56 = 1 << 56
    #: Bit 57: ignored by the hardware, free for software.
    AVAIL_57 = 1 << 57
    #: Bit 58: ignored by the hardware, free for software.
    AVAIL_58 = 1 << 58
    #: Bit 59: ignored, or protection-key bit 0 of a leaf when CR4.PKE/PKS=1.
    AVAIL_59 = 1 << 59
    #: Bit 60: ignored, or protection-key bit 1 of a leaf when CR4.PKE/PKS=1.
    AVAIL_60 = 1 << 60
    #: Bit 61: ignored, or protection-key bit 2 of a leaf when CR4.PKE/PKS=1.
    AVAIL_61 = 1 << 61
    #: Bit 62: ignored, or protection-key bit 3 of a leaf when CR4.PKE/PKS=1.
    AVAIL_62 = 1 << 62
    #: Bit 63: XD; with EFER.NXE=1 instruction fetches fault if set at any level (reserved if NXE=0).
    NO_EXECUTE = 1 << 63


#: Bits 51:12: the physical address of the next table or 4 KiB page.
ADDR_MASK = 0x000F_FFFF_FFFF_F000
#: Every bit that is not an address bit of a 4 KiB-granular entry.
FLAGS_MASK = ((1 << 64) - 1) ^ ADDR_MASK
#: The permission bits combined across levels (AND for W/U, OR for NX).
PERM_MASK = PteFlags.WRITABLE | PteFlags.USER | PteFlags.NO_EXECUTE
