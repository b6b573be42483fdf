"""Host-side model of x86-64 4-level paging and the UEFI-like memory map.

Build the guest's first page tables with :class:`Mapper`, read its live
(possibly hostile) tables with :func:`walk` and friends, check them with
:mod:`mm.audit`, describe RAM with :class:`MemoryMap`.
"""

from .addr import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PageSize,
    PhysAddr,
    VirtAddr,
    align_down,
    align_up,
    canonicalize,
    is_aligned,
    is_canonical,
)
from .entry import LEVELS, Entry, Level, reserved_mask
from .errors import (
    AddressError,
    AlreadyMapped,
    MemoryMapError,
    Misaligned,
    MMError,
    NotMapped,
    OutOfBounds,
    OutOfFrames,
    ParentIsHuge,
    WXViolation,
)
from .findings import Finding, Severity, WalkReport
from .flags import ADDR_MASK, PteFlags
from .frames import BumpFrameAllocator, FrameAllocator
from .mapper import Mapper
from .memmap import DESCRIPTOR_SIZE, EFI_MEMORY_WB, MemoryDescriptor, MemoryMap, MemoryType
from .audit import (
    audit_all,
    audit_guard_pages,
    audit_outside_ram,
    audit_pt_aliases,
    audit_reserved_bits,
    audit_user_in_kernel_half,
    audit_wx,
)
from .physmem import BufferMemory, PhysicalMemory
from .walker import (
    Run,
    RunArrays,
    Translation,
    coalesce,
    naive_translate,
    naive_walk,
    read_virt,
    reverse,
    translate,
    walk,
    walk_arrays,
    write_virt,
)

__all__ = [
    "PAGE_1G", "PAGE_2M", "PAGE_4K", "PageSize", "PhysAddr", "VirtAddr",
    "align_down", "align_up", "canonicalize", "is_aligned", "is_canonical",
    "LEVELS", "Entry", "Level", "reserved_mask",
    "AddressError", "AlreadyMapped", "MemoryMapError", "Misaligned", "MMError", "NotMapped",
    "OutOfBounds", "OutOfFrames", "ParentIsHuge", "WXViolation",
    "Finding", "Severity", "WalkReport",
    "ADDR_MASK", "PteFlags",
    "BumpFrameAllocator", "FrameAllocator",
    "Mapper",
    "DESCRIPTOR_SIZE", "EFI_MEMORY_WB", "MemoryDescriptor", "MemoryMap", "MemoryType",
    "audit_all", "audit_guard_pages", "audit_outside_ram", "audit_pt_aliases", "audit_reserved_bits",
    "audit_user_in_kernel_half", "audit_wx",
    "BufferMemory", "PhysicalMemory",
    "Run", "RunArrays", "Translation", "coalesce", "naive_translate", "naive_walk",
    "read_virt", "reverse", "translate", "walk", "walk_arrays", "write_virt",
]
