"""Host-side boot: everything the guest finds in memory at its first instruction.

Each step is one function with its own error type:

- ``build_memory_map``: the UEFI-like map the guest receives (also what
  ``vmm.py memmap`` prints);
- ``load_kernel``: PT_LOAD segments copied to their physical addresses and
  R_X86_64_RELATIVE relocations applied for the KASLR slide;
- ``build_page_tables``: direct map of all RAM plus each kernel segment at its
  (slid) virtual address with its own permissions;
- ``write_boot_info``: GDT, memory map, command line and BootInfo.
"""

from __future__ import annotations

import ctypes as C
import os
import random
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from mm.addr import PageSize
from mm.flags import PteFlags
from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from mm.physmem import BufferMemory
from mm.memmap import MemoryMap, MemoryType

from . import gdt
from .abi import BOOT_FLAG_DIRECT_MAP_1G, BOOT_INFO_MAGIC, BOOT_INFO_SIZE, BOOT_INFO_VERSION, BootInfo
from .elf import KernelImage, KernelImageError, Segment
from .layout import (
    ACPI_NVS_PHYS,
    ACPI_RECLAIM_PHYS,
    BOOT_INFO_PHYS,
    BOOT_STACK_PHYS,
    BOOT_STACK_SIZE,
    CMDLINE_MAX,
    CMDLINE_PHYS,
    FB_FORMAT_BGRX8888,
    FB_HEIGHT,
    FB_SIZE,
    FB_STRIDE,
    FB_WIDTH,
    GDT_PHYS,
    GiB,
    KASLR_ALIGN,
    KASLR_WINDOW,
    KERNEL_LINK_BASE,
    KERNEL_PHYS_MIN,
    LEGACY_HOLE_START,
    MEMMAP_END,
    MEMMAP_PHYS,
    MiB,
    PAGE_SIZE,
    PHYS_OFFSET,
    PT_POOL_END,
    PT_POOL_START,
    framebuffer_phys,
)
from .memory import GuestMemory


class BootError(ValueError):
    """The guest cannot be set up as asked (one-line message)."""


def _page_down(x: int) -> int:
    return x & ~(PAGE_SIZE - 1)


def _page_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def segment_phys_range(seg: Segment) -> tuple[int, int]:
    return _page_down(seg.paddr), _page_up(seg.paddr + seg.memsz)


# --- memory map -------------------------------------------------------------------
def check_kernel_fits(image: KernelImage, ram_size: int) -> None:
    fb = framebuffer_phys(ram_size)
    for seg in image.segments:
        start, end = segment_phys_range(seg)
        if start < KERNEL_PHYS_MIN:
            raise KernelImageError(f"segment at paddr {seg.paddr:#x} is below {KERNEL_PHYS_MIN:#x} (reserved low memory)")
        if end > ram_size:
            raise KernelImageError(
                f"segment at paddr {seg.paddr:#x}+{seg.memsz:#x} lies outside guest RAM ({ram_size >> 20} MiB)"
            )
        if end > fb:
            raise KernelImageError(
                f"segment at paddr {seg.paddr:#x}+{seg.memsz:#x} overlaps the framebuffer at {fb:#x}: "
                f"memory is too small for this kernel"
            )


_MEMMAP_CACHE: dict[tuple, MemoryMap] = {}


def cached_memory_map(ram_size: int, image: KernelImage | None) -> MemoryMap:
    """``build_memory_map``, memoised: the map depends only on RAM size and segments.
    Callers must treat the result as read-only."""
    key = (ram_size, None if image is None else tuple((s.paddr, s.memsz, s.flags) for s in image.segments))
    memmap = _MEMMAP_CACHE.get(key)
    if memmap is None:
        if len(_MEMMAP_CACHE) > 64:
            _MEMMAP_CACHE.clear()
        memmap = _MEMMAP_CACHE[key] = build_memory_map(ram_size, image)
        memmap.cached_bytes = memmap.to_bytes()
    return memmap


def build_memory_map(ram_size: int, image: KernelImage | None) -> MemoryMap:
    """Carve the fixed regions and the kernel image out of RAM."""
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


# --- KASLR -------------------------------------------------------------------------
def slide_range(image: KernelImage) -> int:
    """Number of distinct 2 MiB-aligned slides this image can take."""
    if not image.relocatable:
        return 1
    span = image.vaddr_end - (image.vaddr_start & ~(KASLR_ALIGN - 1))
    room = KASLR_WINDOW - ((span + KASLR_ALIGN - 1) & ~(KASLR_ALIGN - 1))
    return max(1, room // KASLR_ALIGN + 1)


def choose_slide(image: KernelImage, requested: int | None = None, rng: random.Random | None = None) -> int:
    """Pick (or validate) the KASLR slide; always 0 for a non-relocatable kernel."""
    n = slide_range(image)
    if requested is not None:
        if requested and not image.relocatable:
            raise BootError("this kernel is not relocatable (ET_EXEC): it only loads with slide 0")
        if requested % KASLR_ALIGN or not 0 <= requested < n * KASLR_ALIGN:
            raise BootError(f"KASLR slide {requested:#x} must be a multiple of 2 MiB below {n * KASLR_ALIGN:#x}")
        return requested
    if n == 1:
        return 0
    r = rng or random.SystemRandom()
    return r.randrange(n) * KASLR_ALIGN


# --- kernel image --------------------------------------------------------------------
@dataclass
class _SegmentPlan:
    """How to load one segment fast: its bytes up to the last relocated word,
    and where the relocations go (computed once per image)."""

    written: int  # bytes to write (file size, or up to the last relocation)
    base: np.ndarray | None  # uint8 copy of those bytes (None: no relocations)
    word_index: np.ndarray | None  # u64 index of each RELATIVE target (8-aligned case)
    byte_index: np.ndarray | None  # (n, 8) byte indices (unaligned fallback)
    addends: np.ndarray | None


def _segment_plans(image: KernelImage) -> list[_SegmentPlan]:
    cached = getattr(image, "_load_plans", None)
    if cached is not None:
        return cached
    plans = []
    for seg in image.segments:
        picked = [(r - seg.vaddr, a) for r, a in image.relocations if seg.vaddr <= r and r + 8 <= seg.vaddr + seg.memsz]
        if not picked:
            plans.append(_SegmentPlan(seg.filesz, None, None, None, None))
            continue
        offs = np.array([o for o, _ in picked], dtype=np.int64)
        adds = np.array([a for _, a in picked], dtype=np.uint64)
        written = max(seg.filesz, int(offs.max()) + 8)
        size = (written + 7) // 8 * 8
        base = np.zeros(size, dtype=np.uint8)
        base[: seg.filesz] = np.frombuffer(image.data, dtype=np.uint8, count=seg.filesz, offset=seg.offset)
        if not (offs % 8).any():
            plans.append(_SegmentPlan(written, base, offs // 8, None, adds))
        else:
            plans.append(_SegmentPlan(written, base, None, offs[:, None] + np.arange(8)[None, :], adds))
    image._load_plans = plans
    return plans


def load_kernel(memory: GuestMemory, image: KernelImage, slide: int, *, fresh_memory: bool = False) -> None:
    """Copy PT_LOAD segments to their physical addresses and apply relocations.

    Segments without relocations are written straight from the file image;
    the others from a per-image template with every R_X86_64_RELATIVE word
    set in one vectorised store. The zero-filled tail (.bss) is only written
    when ``fresh_memory`` is false: fresh guest RAM already reads as zero.
    """
    check_kernel_fits(image, memory.size)
    data = memoryview(image.data)
    for seg, plan in zip(image.segments, _segment_plans(image)):
        if plan.base is None:
            memory.write(seg.paddr, data[seg.offset : seg.offset + seg.filesz])
        else:
            buf = plan.base.copy()
            # R_X86_64_RELATIVE: the word becomes B + A, B being the load bias (the slide).
            values = plan.addends + np.uint64(slide)
            if plan.word_index is not None:
                buf.view("<u8")[plan.word_index] = values
            else:
                buf[plan.byte_index] = values.astype("<u8").view(np.uint8).reshape(-1, 8)
            memory.write(seg.paddr, memoryview(buf)[: plan.written])
        if seg.memsz > plan.written and not fresh_memory:
            memory.zero(seg.paddr + plan.written, seg.memsz - plan.written)


def segment_flags(seg: Segment) -> PteFlags:
    """R -> P|NX, RX -> P, RW -> P|W|NX; W+X was refused at parse time."""
    flags = PteFlags.PRESENT
    if seg.writable:
        flags |= PteFlags.WRITABLE
    if not seg.executable:
        flags |= PteFlags.NO_EXECUTE
    return flags


# --- page tables -----------------------------------------------------------------------
@dataclass
class PageTables:
    cr3: int
    frames_used: int
    pool_end: int
    direct_map_1g: bool


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


def _build_pool(ram_size: int, image: KernelImage | None, slide: int, use_1g: bool) -> tuple[bytearray, int, int, int]:
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


@dataclass
class _KernelTablesTemplate:
    """The boot tables built once at slide 0, and where the kernel's
    intermediate entries sit, so another slide only moves those entries."""

    pool: bytes
    root: int
    end: int
    pdpt_frame: int  # the PDPT the kernel's PML4 entry points to
    pd_frame: int
    pdpt_index: int  # at slide 0
    pd_index: int  # first PD entry at slide 0
    pd_count: int  # PD entries (one per PT) the kernel uses


_KERNEL_TABLES_CACHE: dict[tuple, _KernelTablesTemplate | None] = {}
_ADDR = 0x000F_FFFF_FFFF_F000


def _kernel_tables_template(ram_size: int, image: KernelImage, use_1g: bool) -> _KernelTablesTemplate | None:
    """None when the kernel does not sit in one PDPT/PD chain of its own."""
    key = (ram_size, use_1g, id(image), tuple((s.vaddr, s.paddr, s.memsz, s.flags) for s in image.segments))
    if key in _KERNEL_TABLES_CACHE:
        return _KERNEL_TABLES_CACHE[key]
    scratch, root, _first_free, end = _build_pool(ram_size, image, 0, use_1g)
    u64 = np.frombuffer(scratch, dtype="<u8")
    base = image.vaddr_start & ~((2 << 20) - 1)
    i4, i3, i2 = (base >> 39) & 511, (base >> 30) & 511, (base >> 21) & 511
    last = image.vaddr_end - 1
    pd_count = ((last >> 21) - (base >> 21)) + 1

    def entry(frame: int, index: int) -> int:
        return int(u64[(frame - PT_POOL_START) // 8 + index])

    template = None
    e4 = entry(root, i4)
    if e4 & 1 and i4 == 511 and (last >> 30) == (base >> 30):
        pdpt = e4 & _ADDR
        e3 = entry(pdpt, i3)
        # The kernel's PDPT and PD must be its own (allocated after the direct map).
        if e3 & 1 and not e3 & 0x80 and pdpt >= _first_free:
            pd = e3 & _ADDR
            template = _KernelTablesTemplate(bytes(scratch[: end - PT_POOL_START]), root, end, pdpt, pd, i3, i2, pd_count)
    if len(_KERNEL_TABLES_CACHE) > 16:
        _KERNEL_TABLES_CACHE.clear()
    _KERNEL_TABLES_CACHE[key] = template
    return template


def _slid_pool(t: _KernelTablesTemplate, image: KernelImage, slide: int) -> bytearray | None:
    """The template's tables with the kernel's PDPT and PD entries moved to
    where ``slide`` puts it (2 MiB-aligned slides leave the PTs unchanged)."""
    base = (image.vaddr_start & ~((2 << 20) - 1)) + slide
    i3, i2 = (base >> 30) & 511, (base >> 21) & 511
    if i2 + t.pd_count > 512 or ((base + (t.pd_count << 21) - 1) >> 30) != (base >> 30):
        return None  # the kernel would straddle a 1 GiB boundary: let the mapper do it
    pool = bytearray(t.pool)
    u64 = np.frombuffer(pool, dtype="<u8")
    pdpt, pd = (t.pdpt_frame - PT_POOL_START) // 8, (t.pd_frame - PT_POOL_START) // 8
    e3 = u64[pdpt + t.pdpt_index]
    pd_entries = u64[pd + t.pd_index : pd + t.pd_index + t.pd_count].copy()
    u64[pdpt + t.pdpt_index] = 0
    u64[pdpt + i3] = e3
    u64[pd + t.pd_index : pd + t.pd_index + t.pd_count] = 0
    u64[pd + i2 : pd + i2 + t.pd_count] = pd_entries
    return pool


def build_page_tables(memory: GuestMemory, image: KernelImage | None, slide: int, use_1g: bool) -> PageTables:
    """Direct map plus the kernel's segments, written to guest RAM in one copy.

    The tables are built once per (RAM size, kernel) at slide 0 with the
    mapper; another slide only moves the kernel's PDPT and PD entries (a
    2 MiB-aligned slide leaves every PT unchanged). If the kernel would
    straddle a 1 GiB boundary, the mapper builds that slide from scratch.
    """
    if image is not None and slide % (2 << 20) == 0:
        t = _kernel_tables_template(memory.size, image, use_1g)
        pool = _slid_pool(t, image, slide) if t is not None else None
        if pool is not None:
            memory.write(PT_POOL_START, pool)
            return PageTables(t.root, (t.end - PT_POOL_START) // PAGE_SIZE, t.end, use_1g)
    scratch, root, _first_free, end = _build_pool(memory.size, image, slide, use_1g)
    memory.write(PT_POOL_START, memoryview(scratch)[: end - PT_POOL_START])
    return PageTables(root, (end - PT_POOL_START) // PAGE_SIZE, end, use_1g)


# --- boot info ------------------------------------------------------------------------
@dataclass
class BootLayout:
    """What the vCPU needs to start, plus what the host reports about the boot."""

    entry: int
    stack_top: int
    boot_info_virt: int
    cr3: int
    gdt_base: int
    slide: int
    memmap: MemoryMap
    page_tables: PageTables
    timings_ms: dict[str, float] = field(default_factory=dict)


def encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode("utf-8")
    if len(raw) > CMDLINE_MAX:
        raise BootError(f"command line is {len(raw)} bytes, the limit is {CMDLINE_MAX}")
    return raw


def write_boot_info(
    memory: GuestMemory,
    image: KernelImage | None,
    memmap: MemoryMap,
    tables: PageTables,
    slide: int,
    cmdline: bytes,
    backend: int,
    tsc_khz: int,
) -> None:
    memory.write(GDT_PHYS, gdt.gdt_bytes())
    raw_map = getattr(memmap, "cached_bytes", None) or memmap.to_bytes()
    if MEMMAP_PHYS + len(raw_map) > MEMMAP_END:
        raise BootError(f"memory map of {len(memmap.descriptors)} descriptors does not fit its area")
    memory.write(MEMMAP_PHYS, raw_map)
    memory.write(CMDLINE_PHYS, cmdline)
    bi = BootInfo(
        magic=BOOT_INFO_MAGIC,
        version=BOOT_INFO_VERSION,
        size=BOOT_INFO_SIZE,
        phys_offset=PHYS_OFFSET,
        ram_size=memory.size,
        memmap_phys=MEMMAP_PHYS,
        memmap_count=len(memmap.descriptors),
        memmap_desc_size=40,
        kernel_phys_start=image.paddr_start if image else 0,
        kernel_phys_end=image.paddr_end if image else 0,
        kernel_link_base=KERNEL_LINK_BASE,
        kaslr_slide=slide,
        boot_pt_phys=tables.cr3,
        boot_pt_end=tables.pool_end,
        fb_phys=framebuffer_phys(memory.size),
        fb_width=FB_WIDTH,
        fb_height=FB_HEIGHT,
        fb_stride=FB_STRIDE,
        fb_format=FB_FORMAT_BGRX8888,
        cmdline_phys=CMDLINE_PHYS,
        cmdline_len=len(cmdline),
        flags=BOOT_FLAG_DIRECT_MAP_1G if tables.direct_map_1g else 0,
        rng_seed=struct.unpack("<Q", os.urandom(8))[0],
        tsc_khz=tsc_khz,
        backend=backend,
    )
    assert C.sizeof(bi) == BOOT_INFO_SIZE
    memory.write_cstruct(BOOT_INFO_PHYS, bi)


def prepare_guest(
    memory: GuestMemory,
    image: KernelImage,
    *,
    slide: int,
    cmdline: str = "",
    backend: int = 0,
    tsc_khz: int = 0,
    use_1g: bool = True,
    fresh_memory: bool = False,
) -> BootLayout:
    """Run every boot step against ``memory``; returns the entry state."""
    t = time.perf_counter_ns
    timings: dict[str, float] = {}
    t0 = t()
    memmap = cached_memory_map(memory.size, image)
    raw_cmdline = encode_cmdline(cmdline)
    t1 = t()
    timings["memory_map"] = (t1 - t0) / 1e6
    load_kernel(memory, image, slide, fresh_memory=fresh_memory)
    t2 = t()
    timings["elf_load"] = (t2 - t1) / 1e6
    tables = build_page_tables(memory, image, slide, use_1g)
    t3 = t()
    timings["page_tables"] = (t3 - t2) / 1e6
    write_boot_info(memory, image, memmap, tables, slide, raw_cmdline, backend, tsc_khz)
    timings["boot_info"] = (t() - t3) / 1e6
    return BootLayout(
        entry=image.entry + slide,
        stack_top=PHYS_OFFSET + BOOT_STACK_PHYS + BOOT_STACK_SIZE - 8,
        boot_info_virt=PHYS_OFFSET + BOOT_INFO_PHYS,
        cr3=tables.cr3,
        gdt_base=PHYS_OFFSET + GDT_PHYS,
        slide=slide,
        memmap=memmap,
        page_tables=tables,
        timings_ms=timings,
    )


__all__ = [
    "BootError",
    "BootLayout",
    "GiB",
    "MiB",
    "build_memory_map",
    "build_page_tables",
    "choose_slide",
    "load_kernel",
    "prepare_guest",
    "write_boot_info",
]
