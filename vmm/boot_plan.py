"""Build a ``BootPlan``: the memory map and the slide-0 page tables of one
(kernel, RAM size, direct-map page size), with the page-table mapper and the
memory-map model of ``mm`` (numpy).

``vmm.boot`` imports this module only when neither this process nor the
kernel file's cache has the plan, so a boot from a cached plan imports no
numpy. Also here: ``build_memory_map`` (what ``vmm memmap`` prints) and
``build_pool``, the mapper's tables for any slide (the fallback for a slide
whose kernel straddles a 1 GiB boundary, and the reference in tests).
"""

from __future__ import annotations

from mm.addr import PageSize, align_down, align_up
from mm.entry import LEVELS, Entry
from mm.flags import PteFlags
from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from mm.memmap import MemoryMap, MemoryType
from mm.levels import INDEX_BITS
from mm.physmem import BufferMemory

from .boot import BootPlan, TablesTemplate, _page_down, check_kernel_fits, segment_phys_range
from .elf import KernelImage, Segment
from .layout import (
    ACPI_NVS_PHYS,
    ACPI_RECLAIM_PHYS,
    BOOT_STACK_PHYS,
    BOOT_STACK_SIZE,
    CMDLINE_MAX,
    CMDLINE_PHYS,
    FB_SIZE,
    GDT_PHYS,
    KERNEL_PHYS_MIN,
    LEGACY_HOLE_START,
    PAGE_SIZE,
    PHYS_OFFSET,
    PT_POOL_END,
    PT_POOL_START,
    framebuffer_phys,
)


def build_plan(image: KernelImage | None, ram_size: int, use_1g: bool) -> BootPlan:
    memmap = build_memory_map(ram_size, image)
    tables = tables_template(ram_size, image, use_1g) if image is not None else None
    return BootPlan(memmap.to_bytes(), len(memmap.descriptors), tables)


# --- memory map -------------------------------------------------------------------
def build_memory_map(ram_size: int, image: KernelImage | None) -> MemoryMap:
    """Carve the fixed regions and the kernel image out of RAM (also what ``vmm memmap`` prints)."""
    mm = MemoryMap.from_ram(ram_size)
    mm.carve(0, PAGE_SIZE, MemoryType.RESERVED)  # the null page is never handed out
    mm.carve(GDT_PHYS, CMDLINE_PHYS + CMDLINE_MAX - GDT_PHYS, MemoryType.LOADER_DATA)
    mm.carve(PT_POOL_START, PT_POOL_END - PT_POOL_START, MemoryType.LOADER_DATA)
    mm.carve(BOOT_STACK_PHYS, BOOT_STACK_SIZE, MemoryType.LOADER_DATA)
    mm.carve(LEGACY_HOLE_START, ACPI_RECLAIM_PHYS - LEGACY_HOLE_START, MemoryType.RESERVED)
    mm.carve(ACPI_RECLAIM_PHYS, ACPI_NVS_PHYS - ACPI_RECLAIM_PHYS, MemoryType.ACPI_RECLAIM)
    mm.carve(ACPI_NVS_PHYS, KERNEL_PHYS_MIN - ACPI_NVS_PHYS, MemoryType.ACPI_NVS)
    if image is not None:
        check_kernel_fits(image, ram_size)
        for seg in sorted(image.segments, key=lambda s: s.paddr):
            start, end = segment_phys_range(seg)
            kind = MemoryType.LOADER_CODE if seg.executable else MemoryType.LOADER_DATA
            mm.carve(start, end - start, kind)
    mm.carve(framebuffer_phys(ram_size), FB_SIZE, MemoryType.FRAMEBUFFER)
    mm.validate()
    return mm


# --- page tables -----------------------------------------------------------------------
def segment_flags(seg: Segment) -> PteFlags:
    """R -> P|NX, RX -> P, RW -> P|W|NX; W+X was refused at parse time."""
    flags = PteFlags.PRESENT
    if seg.writable:
        flags |= PteFlags.WRITABLE
    if not seg.executable:
        flags |= PteFlags.NO_EXECUTE
    return flags


def _map_direct(mapper: Mapper, ram_size: int, use_1g: bool) -> None:
    """Map [0, ram_size) at PHYS_OFFSET with the largest pages that fit."""
    flags = PteFlags.PRESENT | PteFlags.WRITABLE | PteFlags.NO_EXECUTE | PteFlags.GLOBAL
    pos = 0
    sizes = [PageSize.SIZE_1G, PageSize.SIZE_2M, PageSize.SIZE_4K] if use_1g else [PageSize.SIZE_2M, PageSize.SIZE_4K]
    for size in sizes:
        length = (ram_size - pos) // size * size
        if length:
            mapper.map_range(PHYS_OFFSET + pos, pos, length, flags, size)
            pos += length
    assert pos == ram_size


_DIRECT_MAP_CACHE: dict[tuple[int, bool], tuple[bytes, int, int]] = {}
_POOL_SIZE = PT_POOL_END - PT_POOL_START


def _pool_memory(initial: bytes = b"", spare_frames: int | None = None) -> tuple[bytearray, BufferMemory]:
    """A host-side scratch copy of (the start of) the page-table pool,
    addressed like guest RAM: ``initial`` plus ``spare_frames`` free frames."""
    size = _POOL_SIZE if spare_frames is None else min(_POOL_SIZE, len(initial) + spare_frames * PAGE_SIZE)
    scratch = bytearray(initial)
    scratch.extend(bytes(size - len(initial)))
    return scratch, BufferMemory(scratch, base=PT_POOL_START)


def _kernel_table_frames(image: KernelImage | None) -> int:
    """An upper bound on the tables the kernel's mappings add (PDPT, PD,
    one PT per 2 MiB spanned, plus one for a boundary crossing)."""
    if image is None:
        return 0
    span = image.vaddr_end - image.vaddr_start
    return 3 + (span + (2 << 20) - 1) // (2 << 20) + 1


def _direct_map_template(ram_size: int, use_1g: bool) -> tuple[bytes, int, int]:
    """The page-table pool holding just the direct map, built once per RAM size:
    (pool bytes up to the first free frame, root, first free frame)."""
    key = (ram_size, use_1g)
    hit = _DIRECT_MAP_CACHE.get(key)
    if hit is None:
        scratch, pool = _pool_memory()
        frames = BumpFrameAllocator(PT_POOL_START, PT_POOL_END)
        mapper = Mapper.new(pool, frames, forbid_wx=True)
        _map_direct(mapper, ram_size, use_1g)
        hit = (bytes(scratch[: frames.next - PT_POOL_START]), mapper.root, frames.next)
        pool.close()
        if len(_DIRECT_MAP_CACHE) > 16:
            _DIRECT_MAP_CACHE.clear()
        _DIRECT_MAP_CACHE[key] = hit
    return hit


def build_pool(ram_size: int, image: KernelImage | None, slide: int, use_1g: bool) -> tuple[bytearray, int, int, int]:
    """Direct map plus kernel segments with the mapper, in a host buffer:
    (pool bytes, root, first free frame after the direct map, end of used frames)."""
    template, root, first_free = _direct_map_template(ram_size, use_1g)
    scratch, pool = _pool_memory(template, _kernel_table_frames(image))
    frames = BumpFrameAllocator(first_free, PT_POOL_START + len(scratch))
    frames.allocated = [PT_POOL_START + i * PAGE_SIZE for i in range((first_free - PT_POOL_START) // PAGE_SIZE)]
    mapper = Mapper(pool, root, frames, forbid_wx=True)
    if image is not None:
        for seg in image.segments:
            vstart = _page_down(seg.vaddr) + slide
            pstart, pend = segment_phys_range(seg)
            mapper.map_range(vstart, pstart, pend - pstart, segment_flags(seg), PageSize.SIZE_4K)
    pool.close()
    return scratch, root, first_free, frames.next


def tables_template(ram_size: int, image: KernelImage, use_1g: bool) -> TablesTemplate | None:
    """The tables at slide 0, and the chain of tables a slide moves entries in:
    every level between the root (whose one entry for the kernel stays) and
    the last (a slide by whole entries of the level above leaves it as it is).
    None when the kernel does not sit in one such chain of its own."""
    scratch, root, first_free, end = build_pool(ram_size, image, 0, use_1g)
    pool = BufferMemory(scratch, base=PT_POOL_START)
    try:
        top, *chain, _last = LEVELS
        lowest = chain[-1]
        base = align_down(image.vaddr_start, lowest.span)
        size = align_up(image.vaddr_end, lowest.span) - base
        if (base + size - 1) // lowest.table_span != base // lowest.table_span:
            return None  # already at slide 0 the kernel needs two tables of the lowest level
        tables = []
        table, parent = root, top
        for lv in chain:
            e = Entry.decode(pool.read_u64(table + 8 * parent.index(base)), parent.number)
            # Each table of the chain must be the kernel's own, allocated after the direct map's.
            if not e.present or e.is_leaf or e.address < first_free:
                return None
            table, parent = e.address, lv
            tables.append((table, lv.shift))
    finally:
        pool.close()
    return TablesTemplate(bytes(scratch[: end - PT_POOL_START]), root, end, base, size, INDEX_BITS, tuple(tables))
