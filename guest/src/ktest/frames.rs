//! Frame allocator tests.

use super::TestResult;
use crate::abi::{memtype, MemoryDescriptor};
use crate::memory::frames::{self, FrameAllocator, FrameError};
use crate::memory::{phys_to_virt, PAGE_SIZE};
use crate::{boot, boot_info, check, check_eq, check_ok};

pub fn alloc_free_single() -> TestResult {
    let before = frames::free_count();
    let a = check_ok!(frames::alloc_frame());
    let b = check_ok!(frames::alloc_frame());
    check!(a != b, "same frame twice: {:#x}", a);
    check!(a % PAGE_SIZE == 0 && b % PAGE_SIZE == 0);
    check!(frames::with(|fa| fa.is_allocated(a) && fa.is_allocated(b)));
    check_eq!(frames::free_count(), before - 2);
    // The frame is usable RAM through the direct map.
    let p = phys_to_virt(a) as *mut u64;
    // SAFETY: `a` is ours until freed below.
    unsafe {
        p.write_volatile(0x5a5a_1234);
        check_eq!(p.read_volatile(), 0x5a5a_1234);
    }
    check_ok!(frames::free_frame(a));
    check_ok!(frames::free_frame(b));
    check!(!frames::with(|fa| fa.is_allocated(a)));
    check_eq!(frames::free_count(), before);
    Ok(())
}

fn type_of(phys: u64) -> Option<u32> {
    boot::memory_map(boot_info())
        .find(|d| d.physical_start <= phys && phys < d.physical_start + d.number_of_pages * PAGE_SIZE)
        .map(|d| d.typ)
}

pub fn only_conventional() -> TestResult {
    const N: usize = 32;
    let bi = boot_info();
    let mut got = [0u64; N];
    for slot in got.iter_mut() {
        *slot = check_ok!(frames::alloc_frame());
    }
    let mut result = Ok(());
    for &f in &got {
        let t = type_of(f);
        if t != Some(memtype::CONVENTIONAL) {
            result = Err(super::TestError::Fail(super::Msg::new(format_args!("frame {:#x} has type {:?}", f, t))));
        }
        if (bi.kernel_phys_start..bi.kernel_phys_end).contains(&f) || (bi.boot_pt_phys..bi.boot_pt_end).contains(&f) {
            result = Err(super::TestError::Fail(super::Msg::new(format_args!("frame {:#x} is kernel/page tables", f))));
        }
        if f == 0 {
            result = Err(super::TestError::Fail(super::Msg::new(format_args!("frame 0 handed out"))));
        }
    }
    for &f in &got {
        check_ok!(frames::free_frame(f));
    }
    result
}

pub fn double_free_detected() -> TestResult {
    let a = check_ok!(frames::alloc_frame());
    check_ok!(frames::free_frame(a));
    let before = frames::free_count();
    check_eq!(frames::free_frame(a), Err(FrameError::DoubleFree(a)));
    check_eq!(frames::free_count(), before);
    Ok(())
}

pub fn never_allocated_detected() -> TestResult {
    let bi = boot_info();
    let before = frames::free_count();
    check_eq!(frames::free_frame(bi.kernel_phys_start), Err(FrameError::NotManaged(bi.kernel_phys_start)));
    check_eq!(frames::free_frame(0), Err(FrameError::NotManaged(0)));
    check_eq!(frames::free_frame(bi.boot_pt_phys), Err(FrameError::NotManaged(bi.boot_pt_phys)));
    check_eq!(frames::free_frame(bi.ram_size), Err(FrameError::NotManaged(bi.ram_size)));
    check_eq!(frames::free_frame(0x5001), Err(FrameError::BadArgument(0x5001)));
    let bitmap = frames::with(|fa| fa.bitmap().0);
    check_eq!(frames::free_frame(bitmap), Err(FrameError::NotManaged(bitmap)));
    check_eq!(frames::free_count(), before);
    Ok(())
}

pub fn contiguous_aligned() -> TestResult {
    let before = frames::free_count();
    let a = check_ok!(frames::with(|fa| fa.alloc_contiguous(8, 32 * 1024)));
    check!(a % (32 * 1024) == 0, "run at {:#x} not 32 KiB aligned", a);
    for i in 0..8 {
        check!(frames::with(|fa| fa.is_allocated(a + i * PAGE_SIZE)));
    }
    let big = check_ok!(frames::with(|fa| fa.alloc_contiguous(512, 2 << 20)));
    check!(big % (2 << 20) == 0, "2 MiB run at {:#x}", big);
    check!(big >= a + 8 * PAGE_SIZE || big + (2 << 20) <= a, "runs overlap");
    check_eq!(frames::free_count(), before - 520);
    check_eq!(frames::with(|fa| fa.alloc_contiguous(0, PAGE_SIZE)), Err(FrameError::BadArgument(PAGE_SIZE)));
    check_eq!(frames::with(|fa| fa.alloc_contiguous(1, 3 * PAGE_SIZE)), Err(FrameError::BadArgument(3 * PAGE_SIZE)));
    check_ok!(frames::with(|fa| fa.free_contiguous(big, 512)));
    check_ok!(frames::with(|fa| fa.free_contiguous(a, 8)));
    check_eq!(frames::free_count(), before);
    Ok(())
}

/// A private allocator over a tiny fake memory map, run dry.
pub fn exhaustion() -> TestResult {
    let bi = boot_info();
    // Bitmap for the private allocator covers all of RAM (2 bits per frame).
    let bitmap_frames = (bi.ram_size / PAGE_SIZE).div_ceil(64) * 16 / PAGE_SIZE + 1;
    const MANAGED: u64 = 6;
    let total = bitmap_frames + MANAGED;
    let run = check_ok!(frames::with(|fa| fa.alloc_contiguous(total, PAGE_SIZE)));
    let map = [MemoryDescriptor {
        typ: memtype::CONVENTIONAL,
        pad: 0,
        physical_start: run,
        virtual_start: 0,
        number_of_pages: total,
        attribute: 0,
    }];
    let result = (|| -> TestResult {
        let mut fa = check_ok!(FrameAllocator::new(map.iter(), bi.ram_size, &[]));
        let managed = fa.managed_count();
        check!(managed >= MANAGED && managed < total, "managed {}", managed);
        let mut last = 0;
        for _ in 0..managed {
            last = check_ok!(fa.alloc());
            check!(last >= run && last < run + total * PAGE_SIZE, "frame {:#x} outside the map", last);
        }
        check_eq!(fa.free_count(), 0);
        check_eq!(fa.alloc(), Err(FrameError::OutOfFrames));
        check_eq!(fa.alloc_contiguous(2, PAGE_SIZE), Err(FrameError::OutOfFrames));
        check_ok!(fa.free(last));
        check_eq!(fa.alloc(), Ok(last));
        Ok(())
    })();
    check_ok!(frames::with(|fa| fa.free_contiguous(run, total)));
    result
}
