//! Page-table tests, in the scratch virtual range.

use super::TestResult;
use crate::abi::{BOOT_FLAG_DIRECT_MAP_1G, BOOT_INFO_MAGIC};
use crate::arch::x86_64::has_1g_pages;
use crate::interrupts::{probe_exec, probe_read_u64, probe_write_u64, PageFaultError};
use crate::memory::layout::SCRATCH_START;
use crate::memory::paging::{self, MapError, PageFlags, PageSize};
use crate::memory::{frames, phys_to_virt, PAGE_SIZE, SIZE_1G, SIZE_2M};
use crate::{check, check_eq, check_ok, image, skip};

const RW: PageFlags = PageFlags::from_bits_truncate(PageFlags::WRITABLE.bits() | PageFlags::NO_EXECUTE.bits());
/// Physical address of the BootInfo (docs/ABI.md): a known value to read
/// back through aliases of physical page 0.
const BOOT_INFO_PHYS: u64 = 0x2000;

pub fn translate_kernel() -> TestResult {
    let s = image::sections();
    let t = check_ok!(paging::translate(s.text.0).ok_or("text unmapped"));
    check_eq!(t.phys, image::phys_start());
    check_eq!(t.size, PageSize::Size4K);
    check!(!t.flags.contains(PageFlags::WRITABLE) && !t.flags.contains(PageFlags::NO_EXECUTE), "text {:?}", t.flags);
    let r = check_ok!(paging::translate(s.rodata).ok_or("rodata unmapped"));
    check!(!r.flags.contains(PageFlags::WRITABLE) && r.flags.contains(PageFlags::NO_EXECUTE), "rodata {:?}", r.flags);
    let d = check_ok!(paging::translate(s.data).ok_or("data unmapped"));
    check!(d.flags.contains(PageFlags::WRITABLE) && d.flags.contains(PageFlags::NO_EXECUTE), "data {:?}", d.flags);
    check_eq!(d.phys, image::virt_to_phys(s.data));
    let bi = check_ok!(paging::translate(phys_to_virt(BOOT_INFO_PHYS) + 8).ok_or("direct map"));
    check_eq!(bi.phys, BOOT_INFO_PHYS + 8);
    check!(paging::translate(0xdead_b000).is_none());
    check!(paging::translate(0x8000_0000_0000_0000).is_none());
    Ok(())
}

pub fn map_unmap_4k() -> TestResult {
    let virt = SCRATCH_START + 0x1000;
    let frame = check_ok!(frames::alloc_zeroed_frame());
    check_ok!(paging::map_page(virt, frame, PageSize::Size4K, RW));
    let t = check_ok!(paging::translate(virt + 0x18).ok_or("not mapped"));
    check_eq!(t.phys, frame + 0x18);
    // SAFETY: freshly mapped page backed by our frame.
    unsafe { ((virt + 0x18) as *mut u64).write_volatile(0xfeed_beef) };
    // SAFETY: direct map of the same frame.
    check_eq!(unsafe { ((phys_to_virt(frame) + 0x18) as *const u64).read_volatile() }, 0xfeed_beef);
    let u = check_ok!(paging::unmap_page(virt));
    check_eq!(u.phys, frame);
    check_eq!(u.size, PageSize::Size4K);
    check!(paging::translate(virt).is_none());
    // The TLB entry is gone too.
    check!(probe_read_u64(virt).is_err(), "read after unmap succeeded");
    check_ok!(frames::free_frame(frame));
    Ok(())
}

/// Maps a huge page of `size` over physical 0 and reads the BootInfo magic.
fn huge_alias(size: PageSize, virt: u64) -> TestResult {
    let before = frames::free_count();
    check_ok!(paging::map_page(virt, 0, size, RW));
    let t = check_ok!(paging::translate(virt + BOOT_INFO_PHYS).ok_or("huge page not mapped"));
    check_eq!(t.size, size);
    check_eq!(t.phys, BOOT_INFO_PHYS);
    check!(t.flags.contains(PageFlags::HUGE));
    check_eq!(probe_read_u64(virt + BOOT_INFO_PHYS), Ok(BOOT_INFO_MAGIC));
    check_eq!(paging::unmap_page(virt + PAGE_SIZE), Err(MapError::NotPageStart { virt: virt + PAGE_SIZE, size }));
    let u = check_ok!(paging::unmap_page(virt));
    check_eq!((u.phys, u.size), (0, size));
    check!(probe_read_u64(virt + BOOT_INFO_PHYS).is_err());
    check_eq!(frames::free_count(), before);
    Ok(())
}

pub fn map_2m() -> TestResult {
    huge_alias(PageSize::Size2M, SCRATCH_START + 16 * SIZE_2M)
}

pub fn map_1g() -> TestResult {
    // PVM hides pdpe1gb from CPUID although 1 GiB pages work (HOST.md), so
    // without CPUID or host support, try one: a reserved-bit fault means the
    // CPU really lacks them.
    let host_1g = crate::boot_info().flags & BOOT_FLAG_DIRECT_MAP_1G != 0;
    let virt = SCRATCH_START + 4 * SIZE_1G;
    if !has_1g_pages() && !host_1g {
        check_ok!(paging::map_page(virt, 0, PageSize::Size1G, RW));
        let r = probe_read_u64(virt + BOOT_INFO_PHYS);
        check_ok!(paging::unmap_page(virt));
        if let Err(f) = r {
            if PageFaultError(f.error).reserved_bit() {
                skip!("no 1 GiB pages (reserved-bit fault, CPUID agrees)");
            }
        }
    }
    huge_alias(PageSize::Size1G, virt)
}

pub fn errors() -> TestResult {
    let v = SCRATCH_START + 8 * SIZE_1G;
    let frame = check_ok!(frames::alloc_zeroed_frame());
    check_eq!(paging::map_page(v + 8, frame, PageSize::Size4K, RW), Err(MapError::Unaligned { virt: v + 8, phys: frame }));
    check_eq!(paging::map_page(v, frame, PageSize::Size2M, RW), Err(MapError::Unaligned { virt: v, phys: frame }));
    check_eq!(
        paging::map_page(0x0000_8000_0000_0000, frame, PageSize::Size4K, RW),
        Err(MapError::NonCanonical { virt: 0x0000_8000_0000_0000 })
    );
    check_ok!(paging::map_page(v, frame, PageSize::Size4K, RW));
    match paging::map_page(v, frame, PageSize::Size4K, RW) {
        Err(MapError::AlreadyMapped { virt, .. }) => check_eq!(virt, v),
        other => crate::fail!("double map gave {:?}", other),
    }
    check_ok!(paging::unmap_page(v));
    check_eq!(paging::unmap_page(v), Err(MapError::NotMapped { virt: v }));
    // A 4 KiB page inside an existing 2 MiB page.
    check_ok!(paging::map_page(v, 0, PageSize::Size2M, RW));
    check_eq!(
        paging::map_page(v + PAGE_SIZE, frame, PageSize::Size4K, RW),
        Err(MapError::ParentEntryHugePage { virt: v + PAGE_SIZE, level: 2 })
    );
    check_ok!(paging::unmap_page(v));
    check_ok!(frames::free_frame(frame));
    Ok(())
}

pub fn frees_empty_tables() -> TestResult {
    // A fresh 512 GiB slot: PDPT, PD and PT all get created.
    let v = SCRATCH_START + 0x40_0000_0000 + 0x3000;
    let before = frames::free_count();
    let frame = check_ok!(frames::alloc_zeroed_frame());
    check_ok!(paging::map_page(v, frame, PageSize::Size4K, RW));
    check_eq!(frames::free_count(), before - 4);
    check_ok!(paging::map_page(v + PAGE_SIZE, frame, PageSize::Size4K, RW));
    check_eq!(frames::free_count(), before - 4);
    check_eq!(paging::recorded_child_count(v, 1), Some(2));
    check_eq!(paging::recorded_child_count(v, 2), Some(1));
    check_eq!(paging::recorded_child_count(v, 3), Some(1));
    check_ok!(paging::unmap_page(v));
    check_eq!(frames::free_count(), before - 4);
    check_eq!(paging::recorded_child_count(v, 1), Some(1));
    check_ok!(paging::unmap_page(v + PAGE_SIZE));
    // PT, PD and PDPT are gone; only the test's own frame is still out.
    check_eq!(frames::free_count(), before - 1);
    check_eq!(paging::recorded_child_count(v, 3), None);
    check_ok!(frames::free_frame(frame));
    check_eq!(frames::free_count(), before);
    Ok(())
}

pub fn permissions() -> TestResult {
    let v = SCRATCH_START + 0x2000;
    let frame = check_ok!(frames::alloc_zeroed_frame());
    check_ok!(paging::map_page(v, frame, PageSize::Size4K, PageFlags::NO_EXECUTE));
    check_eq!(probe_read_u64(v), Ok(0));
    // SAFETY: the page is ours; the write is expected to fault.
    let w = unsafe { probe_write_u64(v, 1) };
    let result = match w {
        Ok(()) => Err("write to a read-only page succeeded"),
        Err(f) if f.vector == 14 && PageFaultError(f.error).protection() && PageFaultError(f.error).write() => Ok(()),
        Err(_) => Err("wrong fault on read-only write"),
    };
    check_ok!(paging::unmap_page(v));
    check_ok!(frames::free_frame(frame));
    check_ok!(result);
    Ok(())
}

/// The hardware honours NX: a fetch from a no-execute page faults with the
/// instruction-fetch bit set, and the same code runs once the page is
/// executable (read-only, so W^X still holds).
pub fn no_execute() -> TestResult {
    let v = SCRATCH_START + 0x4000;
    let frame = check_ok!(frames::alloc_zeroed_frame());
    // SAFETY: a frame we own, through the direct map: a lone `ret`.
    unsafe { (phys_to_virt(frame) as *mut u8).write_volatile(0xC3) };
    check_ok!(paging::map_page(v, frame, PageSize::Size4K, PageFlags::NO_EXECUTE));
    // SAFETY: the page holds only `ret`.
    let nx = unsafe { probe_exec(v) };
    let verdict = match nx {
        Ok(()) => Err("executed from a no-execute page"),
        Err(f) if f.vector == 14 && f.addr == v && PageFaultError(f.error).instruction_fetch()
            && PageFaultError(f.error).protection() => Ok(()),
        Err(_) => Err("wrong fault for a fetch from a no-execute page"),
    };
    check_ok!(paging::unmap_page(v));
    check_ok!(verdict);
    check_ok!(paging::map_page(v, frame, PageSize::Size4K, PageFlags::empty()));
    // SAFETY: as above; now executable.
    let x = unsafe { probe_exec(v) };
    check_ok!(paging::unmap_page(v));
    check_ok!(frames::free_frame(frame));
    check!(x.is_ok(), "fetch from an executable page faulted: {:?}", x);
    Ok(())
}
