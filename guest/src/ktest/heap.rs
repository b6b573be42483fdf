//! Kernel heap tests.

use super::TestResult;
use crate::memory::heap::{self, LARGE_THRESHOLD};
use crate::memory::layout::HEAP_MAX;
use crate::memory::{frames, phys_offset, PAGE_SIZE};
use crate::{check, check_eq};
use alloc::alloc::{alloc, dealloc, Layout};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

fn in_heap(p: *mut u8) -> bool {
    let start = heap::stats().start;
    (p as u64) >= start && (p as u64) < start + HEAP_MAX
}

pub fn box_and_vec() -> TestResult {
    let before = heap::stats();
    {
        let b = Box::new(0x1234_5678u64);
        check_eq!(*b, 0x1234_5678);
        check!(in_heap(&*b as *const u64 as *mut u8));
        let mut v: Vec<u32> = Vec::new();
        for i in 0..100 {
            v.push(i * 3);
        }
        check_eq!(v.iter().sum::<u32>(), 3 * 4950);
        let mut s = String::new();
        let _ = write!(s, "heap {} {:#x}", 7, 255);
        check_eq!(s.as_str(), "heap 7 0xff");
    }
    let after = heap::stats();
    check_eq!(after.free_bytes, before.free_bytes);
    check_eq!(after.free_blocks, before.free_blocks);
    Ok(())
}

pub fn coalesce() -> TestResult {
    let before = heap::stats();
    let layout = Layout::from_size_align(64, 16).unwrap();
    let mut ptrs = [core::ptr::null_mut::<u8>(); 8];
    for p in ptrs.iter_mut() {
        // SAFETY: non-zero size layout.
        *p = unsafe { alloc(layout) };
        check!(!p.is_null());
    }
    for w in ptrs.windows(2) {
        check!(w[0] != w[1]);
    }
    // Free every other block first (no merges possible), then the rest.
    for i in (0..8).step_by(2).chain((1..8).step_by(2)) {
        // SAFETY: allocated above with `layout`.
        unsafe { dealloc(ptrs[i], layout) };
    }
    let after = heap::stats();
    check_eq!(after.free_bytes, before.free_bytes);
    check_eq!(after.free_blocks, before.free_blocks);
    check_eq!(after.largest_free, before.largest_free);
    Ok(())
}

pub fn alignment() -> TestResult {
    let before = heap::stats();
    let mut align = 16;
    while align <= 2048 {
        let layout = Layout::from_size_align(24, align).unwrap();
        // SAFETY: non-zero size layout.
        let p = unsafe { alloc(layout) };
        check!(!p.is_null() && p as usize % align == 0, "align {}: {:p}", align, p);
        // SAFETY: just allocated with `layout`.
        unsafe { dealloc(p, layout) };
        align *= 2;
    }
    let after = heap::stats();
    check_eq!(after.free_bytes, before.free_bytes);
    check_eq!(after.free_blocks, before.free_blocks);
    Ok(())
}

pub fn large_from_frames() -> TestResult {
    let free = frames::free_count();
    let layout = Layout::from_size_align(2 * PAGE_SIZE as usize + 1, 8).unwrap();
    // SAFETY: non-zero size layout.
    let p = unsafe { alloc(layout) };
    check!(!p.is_null());
    check!(!in_heap(p) && p as u64 >= phys_offset(), "large block at {:p}", p);
    check_eq!(frames::free_count(), free - 3);
    // SAFETY: the block is ours and 2 pages + 1 byte long.
    unsafe {
        p.write_volatile(1);
        p.add(2 * PAGE_SIZE as usize).write_volatile(2);
        dealloc(p, layout);
    }
    check_eq!(frames::free_count(), free);
    let l2 = Layout::from_size_align(LARGE_THRESHOLD, 16 * 1024).unwrap();
    // SAFETY: non-zero size layout.
    let q = unsafe { alloc(l2) };
    check!(!q.is_null() && q as usize % (16 * 1024) == 0, "{:p}", q);
    // SAFETY: allocated above with `l2`.
    unsafe { dealloc(q, l2) };
    check_eq!(frames::free_count(), free);
    Ok(())
}

pub fn grows() -> TestResult {
    let before = heap::stats();
    let layout = Layout::from_size_align(2048, 16).unwrap();
    let n = (before.free_bytes / 2048 + 8).min(128);
    let mut v: [*mut u8; 128] = [core::ptr::null_mut(); 128];
    for slot in v.iter_mut().take(n) {
        // SAFETY: non-zero size layout.
        *slot = unsafe { alloc(layout) };
        check!(!slot.is_null(), "allocation failed before the heap grew");
    }
    let grown = heap::stats();
    check!(grown.end > before.end, "heap did not grow: end {:#x}", grown.end);
    for &p in v.iter().take(n) {
        // SAFETY: allocated above with `layout`.
        unsafe { dealloc(p, layout) };
    }
    let after = heap::stats();
    check_eq!(after.free_bytes, before.free_bytes + (grown.end - before.end) as usize);
    Ok(())
}

pub fn exhaustion_returns_null() -> TestResult {
    let start = heap::stats();
    let old = heap::set_limit(start.end);
    let layout = Layout::from_size_align(3000, 16).unwrap();
    let mut v: [*mut u8; 256] = [core::ptr::null_mut(); 256];
    let mut n = 0;
    let mut got_null = false;
    while n < v.len() {
        // SAFETY: non-zero size layout.
        let p = unsafe { alloc(layout) };
        if p.is_null() {
            got_null = true;
            break;
        }
        v[n] = p;
        n += 1;
    }
    for &p in v.iter().take(n) {
        // SAFETY: allocated above with `layout`.
        unsafe { dealloc(p, layout) };
    }
    heap::set_limit(old);
    check!(got_null, "no null after {} allocations", n);
    check_eq!(heap::stats().end, start.end);
    // A large request no frame run can satisfy. (black_box: LLVM may
    // otherwise elide an unused allocation and assume it non-null.)
    let huge = Layout::from_size_align(1 << 40, 8).unwrap();
    // SAFETY: non-zero size layout; null expected.
    let p = core::hint::black_box(unsafe { alloc(core::hint::black_box(huge)) });
    check!(p.is_null(), "1 TiB allocation returned {:p}", p);
    Ok(())
}

/// The size-class fast path hands back the block just freed, and switching
/// to the list flushes it back.
pub fn fast_path_reuses() -> TestResult {
    let old = heap::mode();
    // Start from empty caches whatever ran before (List mode flushes them).
    heap::set_mode(heap::Mode::List);
    heap::set_mode(heap::Mode::Fast);
    let l = Layout::from_size_align(40, 8).unwrap();
    // SAFETY: non-zero layouts, freed below.
    // black_box: LLVM may otherwise pair up and elide alloc/dealloc calls.
    let (a, b) = unsafe { (core::hint::black_box(alloc(l)), core::hint::black_box(alloc(l))) };
    check!(!a.is_null() && !b.is_null() && a != b);
    unsafe { dealloc(a, l) };
    check_eq!(heap::cached_bytes(), 64);
    let c = core::hint::black_box(unsafe { alloc(l) });
    check_eq!(c, a);
    unsafe {
        dealloc(c, l);
        dealloc(b, l);
    }
    check_eq!(heap::cached_bytes(), 128);
    heap::set_mode(heap::Mode::List);
    check_eq!(heap::cached_bytes(), 0);
    heap::set_mode(old);
    Ok(())
}

/// Random allocations and frees of mixed sizes (8 B .. 8 KiB, both paths)
/// and alignments (8 .. 4096), each block filled with a pattern derived
/// from its address and checked before it is freed.
pub fn random_mixed() -> TestResult {
    use alloc::alloc::{alloc, dealloc, Layout};
    const SLOTS: usize = 48;
    let mut live: [(usize, usize, usize); SLOTS] = [(0, 0, 0); SLOTS]; // (ptr, size, align)
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ crate::rand::u64();
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pattern = |p: usize, i: usize| (p.wrapping_mul(31) ^ i) as u8;
    for _ in 0..300 {
        let slot = (next() % SLOTS as u64) as usize;
        let (p, size, align) = live[slot];
        if p != 0 {
            for i in (0..size).step_by(size / 8 + 1) {
                // SAFETY: inside the live block.
                let b = unsafe { *((p + i) as *const u8) };
                check!(b == pattern(p, i), "block {:#x}+{} corrupted", p, i);
            }
            // SAFETY: allocated below with this layout.
            unsafe { dealloc(p as *mut u8, Layout::from_size_align(size, align).unwrap()) };
            live[slot] = (0, 0, 0);
        } else {
            let size = [8usize, 24, 64, 100, 256, 1000, 3000, 4096, 8192][(next() % 9) as usize];
            let align = 1usize << (3 + next() % 10);
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { alloc(layout) } as usize;
            check!(p != 0, "allocation of {} bytes (align {}) failed", size, align);
            check!(p % align == 0, "block {:#x} not aligned to {}", p, align);
            for i in (0..size).step_by(size / 8 + 1) {
                // SAFETY: inside the new block.
                unsafe { *((p + i) as *mut u8) = pattern(p, i) };
            }
            live[slot] = (p, size, align);
        }
    }
    for &(p, size, align) in live.iter().filter(|l| l.0 != 0) {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(p as *mut u8, Layout::from_size_align(size, align).unwrap()) };
    }
    Ok(())
}
