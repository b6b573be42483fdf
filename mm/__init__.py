"""Host-side model of x86-64 paging and the UEFI-like memory map.

4-level paging by default; the levels are data (``mm.levels``), so the
mapper and the walker do 5-level paging given ``levels=(PML5, *LEVELS)``.

Build the guest's first page tables with :class:`Mapper`, read its live
(possibly hostile) tables with :func:`walk` and friends, check them with
:mod:`mm.audit`, describe RAM with :class:`MemoryMap`.

The names below are loaded on first use (PEP 562), each from its submodule:
``from mm.memmap import MemoryMap`` (or ``mm.MemoryMap``) does not import the
mapper, the walker or the audits, and so not numpy. A plain ``vmm run`` uses
the memory-map model without any of them.
"""

from __future__ import annotations

import importlib

#: submodule -> the public names it defines (each loaded on first use)
_SUBMODULES: dict[str, tuple[str, ...]] = {
    "addr": (
        "PAGE_1G", "PAGE_2M", "PAGE_4K", "PageSize", "PhysAddr", "VirtAddr", "align_down", "align_up",
        "canonicalize", "is_aligned", "is_canonical",
    ),
    "entry": ("LEVELS", "Entry", "Level", "reserved_mask"),
    "errors": (
        "AddressError", "AlreadyMapped", "MemoryMapError", "Misaligned", "MMError", "NotMapped",
        "OutOfBounds", "OutOfFrames", "ParentIsHuge", "WXViolation",
    ),
    "findings": ("Finding", "Severity", "WalkReport"),
    "levels": ("PML5", "linear_bits"),
    "flags": ("ADDR_MASK", "PteFlags"),
    "frames": ("BumpFrameAllocator", "FrameAllocator"),
    "mapper": ("Mapper",),
    "memmap": ("DESCRIPTOR_SIZE", "EFI_MEMORY_WB", "MemoryDescriptor", "MemoryMap", "MemoryType"),
    "audit": (
        "audit_all", "audit_guard_pages", "audit_outside_ram", "audit_pt_aliases", "audit_reserved_bits",
        "audit_user_in_kernel_half", "audit_wx",
    ),
    "physmem": ("BufferMemory", "PhysicalMemory"),
    "walker": (
        "Run", "RunArrays", "Translation", "coalesce", "read_virt",
        "reverse", "translate", "walk", "walk_arrays", "write_virt",
    ),
}
_EXPORTS = {name: module for module, names in _SUBMODULES.items() for name in names}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:  # ``import mm; mm.walker.walk(...)`` as with an eager package
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
