"""Every fixed guest-physical and guest-virtual address, in one place.

Physical layout (guest RAM starts at 0; see docs/ABI.md):

    0x0000_0000 +--------------------------+ Reserved (null page)
    0x0000_1000 | GDT                      | LoaderData
    0x0000_2000 | BootInfo                 | LoaderData
    0x0000_2100 | memory-map descriptors   | LoaderData
    0x0000_4000 | command line             | LoaderData
    0x0000_5000 | (free)                   | Conventional
    0x0001_0000 | boot page-table pool     | LoaderData (used frames only)
    0x0009_0000 | boot stack (64 KiB)      | LoaderData
    0x000A_0000 | legacy VGA/ROM hole      | Reserved
    0x000E_0000 | ACPI tables              | ACPIReclaimMemory
    0x000F_0000 | ACPI NVS                 | ACPIMemoryNVS
    0x0010_0000 | kernel image (PT_LOADs)  | LoaderCode / LoaderData
       ...      | free RAM                 | Conventional
    fb_phys     | framebuffer              | Framebuffer (near the top)
    ram_size    +--------------------------+
"""

from __future__ import annotations

from .errors import UsageError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# --- guest RAM limits ---------------------------------------------------------
MIN_RAM = 16 * MiB
MAX_RAM = 64 * GiB
DEFAULT_RAM = 128 * MiB


class GuestMemoryError(UsageError):
    """An unusable guest RAM size (one line)."""


def check_ram_size(size: int) -> None:
    if size <= 0:
        raise GuestMemoryError("memory size must be positive")
    if size % PAGE_SIZE:
        raise GuestMemoryError(f"memory size {size} is not a multiple of 4 KiB")
    if size < MIN_RAM:
        raise GuestMemoryError(f"memory size {size // 1024} KiB is below the minimum of {MIN_RAM >> 20} MiB")
    if size > MAX_RAM:
        raise GuestMemoryError(f"memory size {size >> 30} GiB is above the maximum of {MAX_RAM >> 30} GiB")


# --- fixed physical addresses -----------------------------------------------
NULL_PAGE = 0x0000_0000
GDT_PHYS = 0x0000_1000
BOOT_INFO_PHYS = 0x0000_2000
MEMMAP_PHYS = 0x0000_2100
MEMMAP_END = 0x0000_4000  # exclusive
CMDLINE_PHYS = 0x0000_4000
CMDLINE_MAX = 4 * KiB
PT_POOL_START = 0x0001_0000
PT_POOL_END = 0x0009_0000  # exclusive: 128 frames
BOOT_STACK_PHYS = 0x0009_0000
BOOT_STACK_SIZE = 64 * KiB
LEGACY_HOLE_START = 0x000A_0000
ACPI_RECLAIM_PHYS = 0x000E_0000
ACPI_NVS_PHYS = 0x000F_0000
KERNEL_PHYS_MIN = 0x0010_0000  # a kernel's p_paddr must not be below 1 MiB

# --- framebuffer --------------------------------------------------------------
FB_WIDTH = 640
FB_HEIGHT = 480
FB_BYTES_PER_PIXEL = 4
FB_STRIDE = FB_WIDTH * FB_BYTES_PER_PIXEL
FB_SIZE = FB_STRIDE * FB_HEIGHT  # 1.17 MiB, a whole number of pages
FB_FORMAT_BGRX8888 = 1
FB_TOP_GAP = 1 * MiB  # framebuffer ends this far below the top of RAM

# --- virtual layout -------------------------------------------------------------
PHYS_OFFSET = 0xFFFF_8000_0000_0000  # direct map of all RAM
KERNEL_LINK_BASE = 0xFFFF_FFFF_8000_0000  # top 2 GiB (-2 GiB)
KASLR_ALIGN = 2 * MiB
KASLR_WINDOW = 2 * GiB  # the whole top 2 GiB: about 1023 distinct 2 MiB slides


def framebuffer_phys(ram_size: int) -> int:
    """Where the framebuffer lives for a given RAM size (page aligned)."""
    return (ram_size - FB_TOP_GAP - FB_SIZE) & ~(PAGE_SIZE - 1)
