//! Kernel heap tests.

use super::TestResult;
use crate::memory::heap::{self, LARGE_THRESHOLD};
use crate::memory::layout::HEAP_MAX;
use crate::memory::{frames, phys_offset, PAGE_SIZE};
use crate::{check, check_eq, check_ok, skip};
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
    heap::set_mode(heap::Mode::Backing);
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
    heap::set_mode(heap::Mode::Backing);
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

/// Random mixed traffic (sizes 1 B .. 4 KiB, alignments 16 .. 4096) on a
/// private heap of `backing` over fresh frames, every block filled with a
/// pattern checked before its free; then everything is freed, the tags are
/// walked (TLSF) and all memory must be one free block again.
fn random_private(backing: heap::Backing) -> TestResult {
    const PAGES: u64 = 64;
    const SLOTS: usize = 64;
    let phys = check_ok!(frames::with(|fa| fa.alloc_contiguous(PAGES, PAGE_SIZE)));
    let base = crate::memory::phys_to_virt(phys);
    let mut h = heap::PrivateHeap::new(backing, base, base + PAGES * PAGE_SIZE, 16 * 1024);
    let mut live = [(0usize, 0usize, 0usize); SLOTS];
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ crate::rand::u64();
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pattern = |p: usize, i: usize| (p.wrapping_mul(31) ^ i) as u8;
    let mut result = Ok(());
    for _ in 0..400 {
        let slot = (next() % SLOTS as u64) as usize;
        let (p, size, align) = live[slot];
        if p != 0 {
            for i in (0..size).step_by(size / 8 + 1) {
                // SAFETY: inside the live block.
                if unsafe { *((p + i) as *const u8) } != pattern(p, i) {
                    result = Err(crate::ktest::TestError::Fail(crate::ktest::Msg::new(format_args!(
                        "{}: block {:#x}+{} corrupted", backing.name(), p, i
                    ))));
                }
            }
            // SAFETY: allocated from `h` with this layout.
            check_ok!(unsafe { h.dealloc(p as *mut u8, Layout::from_size_align(size, align).unwrap()) });
            live[slot] = (0, 0, 0);
        } else {
            let size = [1usize, 8, 24, 64, 100, 256, 1000, 2048, 3000, 4000][(next() % 10) as usize];
            let align = 1usize << (4 + next() % 9);
            let l = Layout::from_size_align(size, align).unwrap();
            // SAFETY: the private heap's memory is ours.
            let p = unsafe { h.alloc(l) } as usize;
            check!(p != 0, "{}: allocation of {} bytes (align {}) failed", backing.name(), size, align);
            check!(p % align == 0, "{}: block {:#x} not aligned to {}", backing.name(), p, align);
            for i in (0..size).step_by(size / 8 + 1) {
                // SAFETY: inside the new block.
                unsafe { *((p + i) as *mut u8) = pattern(p, i) };
            }
            live[slot] = (p, size, align);
        }
    }
    result?;
    check_ok!(h.check());
    for &(p, size, align) in live.iter().filter(|l| l.0 != 0) {
        // SAFETY: allocated from `h` with this layout.
        check_ok!(unsafe { h.dealloc(p as *mut u8, Layout::from_size_align(size, align).unwrap()) });
    }
    check_eq!(h.findings, 0);
    let (blocks, largest) = h.list_stats();
    check_eq!(blocks, 1);
    check_eq!(largest, h.free_bytes());
    check_ok!(h.check());
    check_ok!(frames::with(|fa| fa.free_contiguous(phys, PAGES)));
    Ok(())
}

pub fn random_tlsf() -> TestResult {
    random_private(heap::Backing::Tlsf)
}

pub fn random_list() -> TestResult {
    random_private(heap::Backing::List)
}

/// A second free of the same block is refused and counted, with and
/// without the size-class caches; the heap stays consistent.
pub fn double_free_detected() -> TestResult {
    // Private heaps of both backings first.
    for backing in [heap::Backing::Tlsf, heap::Backing::List] {
        let phys = check_ok!(frames::with(|fa| fa.alloc_contiguous(4, PAGE_SIZE)));
        let base = crate::memory::phys_to_virt(phys);
        let mut h = heap::PrivateHeap::new(backing, base, base + 4 * PAGE_SIZE, 4 * PAGE_SIZE);
        let l = Layout::from_size_align(200, 16).unwrap();
        // SAFETY: private memory; the second free is the point of the test.
        unsafe {
            let a = h.alloc(l);
            let b = h.alloc(l);
            check!(!a.is_null() && !b.is_null());
            check_ok!(h.dealloc(a, l));
            let e = h.dealloc(a, l);
            check!(matches!(e, Err(f) if f.kind == heap::FindingKind::DoubleFree), "{}: {:?}", backing.name(), e);
            check_ok!(h.dealloc(b, l));
        }
        check_eq!(h.findings, 1);
        check_eq!(h.list_stats().0, 1);
        check_ok!(h.check());
        check_ok!(frames::with(|fa| fa.free_contiguous(phys, 4)));
    }
    // The kernel heap: a backing-path block (3000 B), then a cached one.
    if heap::backing() != heap::Backing::Tlsf {
        return Ok(());
    }
    let (n0, _) = heap::findings();
    for size in [3000usize, 64] {
        let l = Layout::from_size_align(size, 16).unwrap();
        // SAFETY: the second free is the point of the test; it is refused.
        unsafe {
            let p = core::hint::black_box(alloc(l));
            check!(!p.is_null());
            dealloc(p, l);
            dealloc(core::hint::black_box(p), l);
        }
    }
    let (n1, last) = heap::findings();
    check_eq!(n1, n0 + 2);
    check!(matches!(last, Some(f) if f.kind == heap::FindingKind::DoubleFree), "{:?}", last);
    check_ok!(heap::check());
    let s = heap::stats();
    check_ok!(heap::check());
    check!(s.free_blocks >= 1);
    Ok(())
}

/// Writing past the end of a block breaks the next block's tag: its free
/// is refused with an `overflow` finding (nothing is changed), and once the
/// tag is repaired the same free succeeds.
pub fn overflow_into_tag_detected() -> TestResult {
    if heap::backing() != heap::Backing::Tlsf {
        skip!("the list allocator has no tags");
    }
    let before = heap::stats();
    let (n0, _) = heap::findings();
    let l = Layout::from_size_align(3000, 16).unwrap();
    // SAFETY: we write 16 bytes past the block on purpose and restore them.
    unsafe {
        let p = core::hint::black_box(alloc(l));
        check!(!p.is_null());
        // The block may be a little larger than asked: overwrite the
        // slack and the next tag.
        let usable = check_ok!(heap::usable(p));
        check!(usable >= 3000 && usable < 3000 + 48, "usable {}", usable);
        let over = p.add(usable - 8) as *mut [u8; 16];
        let saved = over.read();
        over.write([0xAA; 16]);
        dealloc(p, l);
        let (n1, last) = heap::findings();
        check_eq!(n1, n0 + 1);
        check!(
            matches!(last, Some(f) if f.kind == heap::FindingKind::Overflow && f.addr == p as u64 + usable as u64),
            "{:?} (block {:p})",
            last,
            p
        );
        over.write(saved);
        check_ok!(heap::check());
        dealloc(p, l);
    }
    check_eq!(heap::findings().0, n0 + 1);
    check_ok!(heap::check());
    let after = heap::stats();
    check_eq!(after.free_bytes, before.free_bytes);
    check_eq!(after.free_blocks, before.free_blocks);
    Ok(())
}

/// The inline paths on the top block check as much as the general ones, on
/// a private TLSF heap: an overflow from the block below the top into the
/// top's tag is refused on free (`overflow`, nothing changed), a second free
/// of a block merged into the top is a `double_free`, and a broken top tag is
/// refused on allocation (`bad_tag`, the top dropped, no block handed out).
pub fn top_block_tag_checked() -> TestResult {
    let phys = check_ok!(frames::with(|fa| fa.alloc_contiguous(4, PAGE_SIZE)));
    let base = crate::memory::phys_to_virt(phys);
    let mut h = heap::PrivateHeap::new(heap::Backing::Tlsf, base, base + 4 * PAGE_SIZE, 4 * PAGE_SIZE);
    let l = Layout::from_size_align(64, 16).unwrap();
    // SAFETY: private memory; the overflows and the second free are the
    // point of the test, and each overwritten tag is restored.
    unsafe {
        let a = h.alloc(l);
        check!(!a.is_null());
        // 64 payload bytes in an 80-byte block (tag 8, rounded to 16): the
        // top's tag starts 72 bytes into the payload.
        let over = a.add(64) as *mut [u8; 16];
        let saved = over.read();
        over.write([0xAA; 16]);
        let e = h.dealloc(a, l);
        check!(matches!(e, Err(f) if f.kind == heap::FindingKind::Overflow && f.addr == a as u64 + 72), "{:?}", e);
        over.write(saved);
        check_ok!(h.check());
        check_ok!(h.dealloc(a, l));
        let e = h.dealloc(a, l);
        check!(matches!(e, Err(f) if f.kind == heap::FindingKind::DoubleFree), "{:?}", e);
        check_ok!(h.check());
        let b = h.alloc(l);
        check_eq!(b, a);
        let top_tag = b.add(72) as *mut u64;
        let saved = top_tag.read();
        top_tag.write(saved ^ (1 << 20)); // a size bit
        check!(h.alloc(l).is_null());
        check!(matches!(h.last, Some(f) if f.kind == heap::FindingKind::BadTag && f.addr == b as u64 + 72), "{:?}", h.last);
        top_tag.write(saved);
    }
    check_eq!(h.findings, 3);
    check_ok!(frames::with(|fa| fa.free_contiguous(phys, 4)));
    Ok(())
}

/// The tags of the kernel heap are consistent after the other tests' kind
/// of traffic, and the index the host reads says which allocator runs.
pub fn tags_consistent() -> TestResult {
    let mut v: Vec<Box<[u8]>> = Vec::new();
    for i in 0..64usize {
        v.push(alloc::vec![i as u8; 1 + (i * 97) % 3000].into_boxed_slice());
    }
    for i in (0..64).step_by(3) {
        v[i] = Box::new([]);
    }
    let (blocks, free) = check_ok!(heap::check());
    if heap::backing() == heap::Backing::Tlsf {
        check!(blocks > free && free >= 1, "{} blocks, {} free", blocks, free);
    }
    drop(v);
    check_ok!(heap::check());
    let b = crate::inspect::snapshot();
    check_eq!(b.heap_index, heap::index_addr());
    // SAFETY: the index is a static inside the heap's lock; read-only here.
    let magic = unsafe { (b.heap_index as *const u64).read_volatile() };
    check_eq!(magic, heap::INDEX_MAGIC);
    Ok(())
}
