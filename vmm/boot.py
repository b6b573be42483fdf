"""Host-side boot: everything the guest finds in memory at its first instruction.

Each step is one function with its own error type:

- ``load_kernel``: PT_LOAD segments copied to their physical addresses and
  R_X86_64_RELATIVE relocations applied for the KASLR slide;
- ``build_page_tables``: direct map of all RAM plus each kernel segment at its
  (slid) virtual address with its own permissions;
- ``write_boot_info``: GDT, memory map, command line and BootInfo.

What depends only on (kernel, RAM size, direct-map page size) -- the memory
map and the page tables at slide 0 -- is a ``BootPlan``, built once by
``vmm.boot_plan`` with the page-table mapper (``mm``, numpy) and reused: from
this process, or from the kernel file's cache (``vmm.kernel_cache``). A boot
whose plan is cached therefore never imports ``mm`` or numpy: this module and
its imports are the whole of the boot path. So this module encodes no page
table itself: the plan says, as data ``mm`` derived, which entries a slide
moves, and ``_slid_pool`` only moves them.
"""

from __future__ import annotations

import ctypes as C
import os
import random
import struct
import time
from dataclasses import dataclass, field

from . import gdt
from .abi import BOOT_FLAG_DIRECT_MAP_1G, BOOT_INFO_MAGIC, BOOT_INFO_SIZE, BOOT_INFO_VERSION, BootInfo
from .elf import KernelImage, KernelImageError, Segment
from .errors import UsageError
from .layout import (
    BOOT_INFO_PHYS,
    BOOT_STACK_PHYS,
    BOOT_STACK_SIZE,
    CMDLINE_MAX,
    CMDLINE_PHYS,
    FB_FORMAT_BGRX8888,
    FB_HEIGHT,
    FB_STRIDE,
    FB_WIDTH,
    GDT_PHYS,
    GiB,
    KASLR_ALIGN,
    KASLR_WINDOW,
    KERNEL_LINK_BASE,
    KERNEL_PHYS_MIN,
    MEMMAP_END,
    MEMMAP_PHYS,
    MiB,
    PAGE_SIZE,
    PHYS_OFFSET,
    PT_POOL_START,
    framebuffer_phys,
)
from .memory import GuestMemory


class BootError(UsageError):
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
_U64 = (1 << 64) - 1


@dataclass
class _SegmentPlan:
    """How to load one segment fast: its bytes up to the last relocated word,
    and where the relocations go (computed once per image)."""

    written: int  # bytes to write (file size, or up to the last relocation)
    base: bytes | None  # a copy of those bytes, padded to 8 (None: no relocations)
    offsets: list[int]  # byte offset of each R_X86_64_RELATIVE target in the segment
    addends: list[int]
    aligned: bool  # every offset 8-aligned: the words are set through a u64 view


def _segment_plans(image: KernelImage) -> list[_SegmentPlan]:
    cached = getattr(image, "_load_plans", None)
    if cached is not None:
        return cached
    plans = []
    for seg in image.segments:
        picked = [(r - seg.vaddr, a) for r, a in image.relocations if seg.vaddr <= r and r + 8 <= seg.vaddr + seg.memsz]
        if not picked:
            plans.append(_SegmentPlan(seg.filesz, None, [], [], True))
            continue
        offs = [o for o, _ in picked]
        written = max(seg.filesz, max(offs) + 8)
        base = bytearray((written + 7) // 8 * 8)
        base[: seg.filesz] = image.data[seg.offset : seg.offset + seg.filesz]
        aligned = not any(o % 8 for o in offs)
        plans.append(_SegmentPlan(written, bytes(base), offs, [a for _, a in picked], aligned))
    image._load_plans = plans
    return plans


def load_kernel(memory: GuestMemory, image: KernelImage, slide: int, *, fresh_memory: bool = False) -> None:
    """Copy PT_LOAD segments to their physical addresses and apply relocations.

    Segments without relocations are written straight from the file image;
    the others from a per-image template with every R_X86_64_RELATIVE word
    set (about 250 words for the guest: a Python loop is cheaper than
    importing numpy for it). The zero-filled tail (.bss) is only written
    when ``fresh_memory`` is false: fresh guest RAM already reads as zero.
    """
    check_kernel_fits(image, memory.size)
    data = memoryview(image.data)
    for seg, plan in zip(image.segments, _segment_plans(image)):
        if plan.base is None:
            memory.write(seg.paddr, data[seg.offset : seg.offset + seg.filesz])
        else:
            buf = bytearray(plan.base)
            # R_X86_64_RELATIVE: the word becomes B + A, B being the load bias (the slide).
            if plan.aligned:
                words = memoryview(buf).cast("Q")  # native order: x86-64 hosts only
                for off, addend in zip(plan.offsets, plan.addends):
                    words[off >> 3] = (addend + slide) & _U64
                words.release()
            else:
                for off, addend in zip(plan.offsets, plan.addends):
                    buf[off : off + 8] = ((addend + slide) & _U64).to_bytes(8, "little")
            memory.write(seg.paddr, memoryview(buf)[: plan.written])
        if seg.memsz > plan.written and not fresh_memory:
            memory.zero(seg.paddr + plan.written, seg.memsz - plan.written)


# --- page tables -----------------------------------------------------------------------

@dataclass
class PageTables:
    cr3: int
    frames_used: int
    pool_end: int
    direct_map_1g: bool


@dataclass
class TablesTemplate:
    """The boot tables built once at slide 0 (``vmm.boot_plan.tables_template``),
    and which entries another slide moves.

    The kernel's virtual range ``[base, base + size)`` hangs off one entry of
    the root table, and below it off one chain of tables of its own (``tables``,
    top-down: with 4-level paging its PDPT, then its PD). A slide that is a
    multiple of the lowest table's entry span leaves the tables under it
    unchanged; it moves the kernel's entries inside each table of the chain.
    """

    pool: bytes
    root: int
    end: int
    base: int  # the kernel's range at slide 0, whole entries of the lowest table
    size: int
    index_bits: int  # bits of a table index (9: 512 entries of 8 bytes in a 4 KiB frame)
    tables: tuple[tuple[int, int], ...]  # (frame, index shift) of each table of the chain, top-down


@dataclass
class BootPlan:
    """What boot writes that depends only on (kernel segments, RAM size,
    direct-map page size): built once, then reused for every slide."""

    memmap: bytes  # the descriptors as the guest reads them
    memmap_count: int
    tables: TablesTemplate | None  # None: the kernel needs the mapper at every slide


def plan_key(image: KernelImage | None, ram_size: int, use_1g: bool) -> tuple:
    segs = () if image is None else tuple((s.vaddr, s.paddr, s.memsz, s.flags) for s in image.segments)
    return (ram_size, bool(use_1g), segs)


_PLANS: dict[tuple, BootPlan] = {}


def boot_plan(image: KernelImage | None, ram_size: int, use_1g: bool) -> BootPlan:
    """The plan from this process, else from the kernel file's cache, else built
    (``vmm.boot_plan``, the one place the boot path needs the mapper) and stored in both."""
    key = plan_key(image, ram_size, use_1g)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if image is not None:
        check_kernel_fits(image, ram_size)  # before a cached plan could hide a kernel that does not fit
    cache = getattr(image, "cache", None)
    plan = cache.boot_plan(ram_size, use_1g, key[2]) if cache is not None else None
    if plan is None:
        plan = plan_builder().build_plan(image, ram_size, use_1g)
        if cache is not None:
            cache.store_boot_plan(ram_size, use_1g, key[2], plan)
    if len(_PLANS) > 32:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def memory_map_bytes(image: KernelImage | None, ram_size: int) -> bytes:
    """The memory map the guest receives, as bytes: from any plan of this
    (kernel, RAM size) made or cached already (the map does not depend on
    the direct map's page size), else from a new plan."""
    cache = getattr(image, "cache", None)
    for use_1g in (False, True):
        key = plan_key(image, ram_size, use_1g)
        plan = _PLANS.get(key)
        if plan is None and cache is not None:
            plan = cache.boot_plan(ram_size, use_1g, key[2])
        if plan is not None:
            if image is not None:
                check_kernel_fits(image, ram_size)
            return plan.memmap
    return boot_plan(image, ram_size, False).memmap


def plan_builder():
    """``vmm.boot_plan``: mm and numpy, imported only when a plan must be built."""
    from . import boot_plan as builder

    return builder


def _slid_pool(t: TablesTemplate, slide: int) -> bytearray | None:
    """The template's tables with the kernel's entries moved to where ``slide``
    puts it; None if the template cannot express that slide (the mapper can)."""
    if slide % (1 << t.tables[-1][1]):
        return None  # the tables below the chain would change too
    old, new = t.base, t.base + slide
    last_old, last_new = old + t.size - 1, new + t.size - 1
    root_shift = t.tables[0][1] + t.index_bits
    if new >> root_shift != old >> root_shift or last_new >> root_shift != old >> root_shift:
        return None  # outside the root entry the chain hangs off
    if any(new >> (shift + t.index_bits) != last_new >> (shift + t.index_bits) for _, shift in t.tables):
        return None  # the kernel would straddle two tables of a level (for the PD: a 1 GiB boundary)
    mask = (1 << t.index_bits) - 1
    pool = bytearray(t.pool)
    u64 = memoryview(pool).cast("Q")  # page-table entries are little-endian u64, as is the host
    for frame, shift in t.tables:
        first = (frame - PT_POOL_START) // 8
        i_old, i_new = first + ((old >> shift) & mask), first + ((new >> shift) & mask)
        n = (last_old >> shift) - (old >> shift) + 1
        entries = u64[i_old : i_old + n].tolist()
        for i in range(n):
            u64[i_old + i] = 0
        for i, e in enumerate(entries):
            u64[i_new + i] = e
    u64.release()
    return pool


def build_page_tables(memory: GuestMemory, image: KernelImage | None, slide: int, use_1g: bool) -> PageTables:
    """Direct map plus the kernel's segments, written to guest RAM in one copy.

    The tables are built once per (RAM size, kernel) at slide 0 with the
    mapper; another slide only moves the kernel's PDPT and PD entries (a
    2 MiB-aligned slide leaves every PT unchanged). If the kernel would
    straddle a 1 GiB boundary, the mapper builds that slide from scratch.
    """
    if image is not None:
        t = boot_plan(image, memory.size, use_1g).tables
        pool = _slid_pool(t, slide) if t is not None else None
        if pool is not None:
            memory.write(PT_POOL_START, pool)
            return PageTables(t.root, (t.end - PT_POOL_START) // PAGE_SIZE, t.end, use_1g)
    scratch, root, _first_free, end = plan_builder().build_pool(memory.size, image, slide, use_1g)
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
    memmap_bytes: bytes  # as the guest received it
    ram_size: int
    page_tables: PageTables
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def memmap(self):
        """The memory map as ``mm.memmap.MemoryMap`` (decoded on demand: mm is not on the boot path)."""
        from mm.memmap import MemoryMap

        return MemoryMap.parse(self.memmap_bytes, ram_size=self.ram_size)


def encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode("utf-8")
    if len(raw) > CMDLINE_MAX:
        raise BootError(f"command line is {len(raw)} bytes, the limit is {CMDLINE_MAX}")
    return raw


def write_boot_info(
    memory: GuestMemory,
    image: KernelImage | None,
    plan: BootPlan,
    tables: PageTables,
    slide: int,
    cmdline: bytes,
    backend: int,
    tsc_khz: int,
) -> None:
    memory.write(GDT_PHYS, gdt.gdt_bytes())
    if MEMMAP_PHYS + len(plan.memmap) > MEMMAP_END:
        raise BootError(f"memory map of {plan.memmap_count} descriptors does not fit its area")
    memory.write(MEMMAP_PHYS, plan.memmap)
    memory.write(CMDLINE_PHYS, cmdline)
    bi = BootInfo(
        magic=BOOT_INFO_MAGIC,
        version=BOOT_INFO_VERSION,
        size=BOOT_INFO_SIZE,
        phys_offset=PHYS_OFFSET,
        ram_size=memory.size,
        memmap_phys=MEMMAP_PHYS,
        memmap_count=plan.memmap_count,
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
    plan = boot_plan(image, memory.size, use_1g)
    raw_cmdline = encode_cmdline(cmdline)
    t1 = t()
    timings["boot_plan"] = (t1 - t0) / 1e6
    load_kernel(memory, image, slide, fresh_memory=fresh_memory)
    t2 = t()
    timings["elf_load"] = (t2 - t1) / 1e6
    tables = build_page_tables(memory, image, slide, use_1g)
    t3 = t()
    timings["page_tables"] = (t3 - t2) / 1e6
    write_boot_info(memory, image, plan, tables, slide, raw_cmdline, backend, tsc_khz)
    timings["boot_info"] = (t() - t3) / 1e6
    return BootLayout(
        entry=image.entry + slide,
        stack_top=PHYS_OFFSET + BOOT_STACK_PHYS + BOOT_STACK_SIZE - 8,
        boot_info_virt=PHYS_OFFSET + BOOT_INFO_PHYS,
        cr3=tables.cr3,
        gdt_base=PHYS_OFFSET + GDT_PHYS,
        slide=slide,
        memmap_bytes=plan.memmap,
        ram_size=memory.size,
        page_tables=tables,
        timings_ms=timings,
    )


__all__ = [
    "BootError",
    "BootLayout",
    "BootPlan",
    "GiB",
    "MiB",
    "boot_plan",
    "build_page_tables",
    "choose_slide",
    "load_kernel",
    "prepare_guest",
    "write_boot_info",
]
