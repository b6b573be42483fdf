//! `workload=mm`: memory-management churn after READY, for live inspection
//! by the host (the inspect block stays current throughout).
//!
//! Each iteration frees or allocates a heap block of a random size (16 B to
//! 64 KiB, so both the free list, the size-class caches and frame-backed
//! blocks move), maps or unmaps a page in a scratch range, keeps up to two
//! short-lived tasks around (they allocate, yield, free) and yields to them.
//! A status line is printed about once a second (TSC). `workload_ms=N` ends
//! the loop after N ms, frees everything and returns (exit 0); without it
//! the loop runs until the host stops the guest. Either way the host can end
//! it early, the same way (`zygote::end_requested`: a flag the host
//! writes, read once per iteration). `workload_iters=N` ends it
//! after N iterations instead and prints no timed status lines, so that with
//! `rng=seed` the whole console output is a function of the saved state
//! (snapshot determinism tests resume such a guest mid-way).

use crate::arch::x86_64::rdtsc;
use crate::memory::layout::SCRATCH_START;
use crate::memory::paging::{self, PageFlags, PageSize};
use crate::memory::{frames, heap, PAGE_SIZE};
use crate::{inspect, println, rand, task};
use alloc::alloc::{alloc, dealloc, Layout};

const SLOTS: usize = 32;
const PAGES: u64 = 8;
const VA: u64 = SCRATCH_START + 0x90_0000_0000;
const SIZES: [usize; 12] = [16, 24, 48, 64, 100, 256, 1000, 2048, 3000, 4096, 8192, 65536];

extern "sysv64" fn worker(seed: u64) {
    let l = Layout::from_size_align(SIZES[(seed % 8) as usize], 16).unwrap();
    // SAFETY: non-zero layout; freed before returning.
    let p = unsafe { alloc(l) };
    task::yield_now();
    if !p.is_null() {
        // SAFETY: allocated above with `l`.
        unsafe { dealloc(p, l) };
    }
}

pub fn run(ms: Option<u64>, max_iters: Option<u64>) {
    let khz = match crate::boot_info().tsc_khz {
        0 => 2_600_000,
        k => k,
    };
    let start = rdtsc();
    let deadline = ms.map(|m| start + m * khz);
    let mut next_status = start + 1000 * khz;
    let mut blocks: [(u64, Layout); SLOTS] = [(0, Layout::new::<u8>()); SLOTS];
    let mut mapped = [0u64; PAGES as usize];
    let mut workers = [0u32; 2];
    let mut iters = 0u64;
    match (ms, max_iters) {
        (_, Some(n)) => println!("workload: mm, {} iterations", n),
        (Some(m), None) => println!("workload: mm, {} ms", m),
        (None, None) => println!("workload: mm, until stopped"),
    }
    crate::zygote::watch_for_end();
    loop {
        let r = rand::u64();
        // Heap churn.
        let s = (r % SLOTS as u64) as usize;
        if blocks[s].0 != 0 {
            // SAFETY: allocated below with this layout.
            unsafe { dealloc(blocks[s].0 as *mut u8, blocks[s].1) };
            blocks[s].0 = 0;
        } else {
            let l = Layout::from_size_align(SIZES[((r >> 8) % SIZES.len() as u64) as usize], 16).unwrap();
            // SAFETY: non-zero layout.
            blocks[s] = (unsafe { alloc(l) } as u64, l);
        }
        // Map/unmap churn.
        let pg = ((r >> 16) % PAGES) as usize;
        let va = VA + pg as u64 * PAGE_SIZE;
        // Frame and mapping change in one inspect critical section.
        inspect::critical(|| {
            if mapped[pg] != 0 {
                if paging::unmap_page(va).is_ok() {
                    let _ = frames::free_frame(mapped[pg]);
                }
                mapped[pg] = 0;
            } else if let Ok(f) = frames::alloc_frame() {
                if paging::map_page(va, f, PageSize::Size4K, PageFlags::WRITABLE | PageFlags::NO_EXECUTE).is_ok() {
                    mapped[pg] = f;
                } else {
                    let _ = frames::free_frame(f);
                }
            }
        });
        // Task churn.
        for w in workers.iter_mut() {
            if *w == 0 || task::state_of(*w).map_or(true, |s| s == task::State::Dead) {
                *w = task::spawn("churn", worker, r >> 24).unwrap_or(0);
            }
        }
        task::yield_now();
        iters += 1;
        inspect::update(|b| b.workload_iters = iters);

        if max_iters.is_some_and(|n| iters >= n) {
            break;
        }
        let now = rdtsc();
        if max_iters.is_none() && now >= next_status {
            let h = heap::stats_raw();
            println!(
                "workload: t={}ms iters={} heap_end={:#x} heap_free={} cached={} frames_free={} tasks={}",
                (now - start) / khz,
                iters,
                h.end,
                h.free_bytes,
                heap::cached_bytes(),
                frames::free_count(),
                task::count()
            );
            next_status = now + 1000 * khz;
        }
        if deadline.is_some_and(|d| now >= d) || crate::zygote::end_requested() {
            break;
        }
    }
    for w in workers {
        if w != 0 {
            task::join(w);
        }
    }
    for (p, l) in blocks {
        if p != 0 {
            // SAFETY: allocated above with `l`.
            unsafe { dealloc(p as *mut u8, l) };
        }
    }
    inspect::critical(|| {
        for (pg, f) in mapped.iter().enumerate() {
            if *f != 0 && paging::unmap_page(VA + pg as u64 * PAGE_SIZE).is_ok() {
                let _ = frames::free_frame(*f);
            }
        }
    });
    let h = heap::stats_raw();
    println!(
        "workload: done, {} iterations, heap_end={:#x} heap_free={} frames_free={}",
        iters,
        h.end,
        h.free_bytes,
        frames::free_count()
    );
}

/// Rounds of xorshift per `workload=compute` iteration (a few ms of
/// emulated CPL0 code on KVM-PVM).
const COMPUTE_ROUNDS: u32 = 500;

/// `workload=compute`: a CPL0 compute loop whose iteration count (published
/// in the inspect block, printed at the end) measures the guest's speed, so
/// the host can tell what watching it costs. `frag_blocks=N` first leaves N
/// free 32-byte holes on the heap's free list (the list the host walks on
/// every snapshot). Each iteration also allocates and frees 16 bytes: with
/// `allocator=list` that changes the head of the free list every iteration
/// (inside the allocator's critical section), with the default fast path it
/// touches only the size-class cache. `workload_ms=N` ends the loop (or the
/// host, earlier: `zygote::end_requested`).
pub fn compute(ms: Option<u64>, frag_blocks: u64) {
    let khz = match crate::boot_info().tsc_khz {
        0 => 2_600_000,
        k => k,
    };
    if frag_blocks > 0 {
        let len = crate::bench::cpl3::fragment(frag_blocks);
        println!("workload: heap fragmented, free list {} blocks", len);
    }
    let start = rdtsc();
    let deadline = ms.map(|m| start + m * khz);
    println!("workload: compute, {}", ms.map_or("until stopped".into(), |m| alloc::format!("{} ms", m)));
    let small = Layout::from_size_align(16, 16).unwrap();
    let (mut x, mut iters) = (rdtsc() | 1, 0u64);
    crate::zygote::watch_for_end();
    loop {
        for _ in 0..COMPUTE_ROUNDS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        // SAFETY: non-zero layout; freed right away.
        unsafe {
            let p = alloc(small);
            if !p.is_null() {
                dealloc(core::hint::black_box(p), small);
            }
        }
        iters += 1;
        inspect::update(|b| b.workload_iters = iters);
        if deadline.is_some_and(|d| rdtsc() >= d) || crate::zygote::end_requested() {
            break;
        }
    }
    println!("workload: done, {} iterations (x={:#x})", iters, x);
}

/// Largest `touch_pages` honoured (16 MiB of frames).
const TOUCH_MAX: u64 = 4096;

/// `workload=touch touch_pages=N [touch_stride=S]`: write exactly N pages of
/// guest RAM, for the host's reset-in-place benchmark and its test that every
/// written page comes back. Takes N*S physically contiguous free frames,
/// writes one u64 (the page's own physical address) into every S-th, through
/// the direct map, and gives the frames back. A stride above 1 leaves clean
/// pages between the written ones (no run of contiguous dirty pages); the
/// allocator's bitmap, the stack and the console are written too, as by any
/// work, so the host sees N plus a handful.
pub fn touch(pages: u64, stride: u64) {
    let pages = pages.min(TOUCH_MAX);
    let stride = stride.clamp(1, 64);
    if pages == 0 {
        return;
    }
    let Ok(base) = frames::with(|fa| fa.alloc_contiguous(pages * stride, PAGE_SIZE)) else {
        println!("workload: touch, no {} contiguous frames", pages * stride);
        return;
    };
    for i in 0..pages {
        let phys = base + i * stride * PAGE_SIZE;
        // SAFETY: the frames are ours until freed below; the direct map covers RAM.
        unsafe { core::ptr::write_volatile(crate::memory::phys_to_virt(phys) as *mut u64, phys) };
    }
    let _ = frames::with(|fa| fa.free_contiguous(base, pages * stride));
    println!("workload: touch, {} pages from {:#x}, stride {}", pages, base, stride);
}
