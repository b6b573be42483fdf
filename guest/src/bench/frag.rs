//! Fragmentation after a long random churn (`bench=heap_frag`, part of the
//! CPL3 set): the same trace replayed on a private heap of each backing
//! allocator (`heap::PrivateHeap`, no caches) over the same fresh memory.
//!
//! The trace (xorshift, fixed seed, so both allocators see the same
//! requests): a short-lived pool of 256 slots takes 80 % of the steps and a
//! long-lived pool of 3,840 slots the rest; a step frees the slot's block
//! if it has one, else allocates: 60 % 16-256 B, 25 % 257 B-1 KiB, 12 %
//! 1-4 KiB (under 4 KiB, the heap range's limit), 3 % 16-512 B aligned to
//! 64-512. Every block is filled with a pattern checked before its free.
//!
//! Three traces (seeds). One INFO report per trace and allocator,
//! `event=heap_frag`: `allocator`, `ops`,
//! `live_blocks`, `live_bytes` (requested bytes live at the end),
//! `free_bytes` and `largest_free` (inside the grown part), `free_blocks`,
//! `pages` (high-water mark of the private heap: the pages a real heap
//! would map), `cpl`, `seed`, `check` (`ok` or the first corruption).

use super::user;
use super::Selection;
use crate::abi::ReportKind;
use crate::memory::heap::{Backing, PrivateHeap};
use crate::memory::{frames, phys_to_virt, PAGE_SIZE};
use crate::{println, report};
use alloc::alloc::Layout;
use core::cell::UnsafeCell;

const SHORT: usize = 256;
const LONG: usize = 3840;
const SLOTS: usize = SHORT + LONG;
/// One trace per seed (each replayed on both allocators).
const SEEDS: [u64; 3] = [0x2545_F491_4F6C_DD1D, 0x9E37_79B9_7F4A_7C15, 0xD1B5_4A32_D192_ED03];
/// Memory the private heaps may grow into.
const REGION_PAGES: u64 = 4096;
/// Growth step: one page, so `pages` is exact.
const STEP: u64 = PAGE_SIZE;

#[derive(Clone, Copy, Default)]
struct Slot {
    ptr: u64,
    size: u32,
    align: u32,
}

struct Slots(UnsafeCell<[Slot; SLOTS]>);
// SAFETY: one CPU, benchmarks never nest.
unsafe impl Sync for Slots {}
static SLOTS_TABLE: Slots = Slots(UnsafeCell::new([Slot { ptr: 0, size: 0, align: 0 }; SLOTS]));

#[derive(Clone, Copy, Default)]
struct Outcome {
    live_blocks: u64,
    live_bytes: u64,
    free_bytes: u64,
    largest_free: u64,
    free_blocks: u64,
    pages: u64,
    findings: u64,
    corrupt: u64,
    failed: u64,
}

fn pattern(p: u64, i: usize) -> u8 {
    (p.wrapping_mul(31) ^ i as u64) as u8
}

/// Replays the trace on a fresh private heap of `backing` over `base`.
fn replay(backing: Backing, base: u64, ops: u64, seed: u64) -> Outcome {
    // SAFETY: see `Slots`.
    let slots = unsafe { &mut *SLOTS_TABLE.0.get() };
    slots.iter_mut().for_each(|s| *s = Slot::default());
    let mut h = PrivateHeap::new(backing, base, base + REGION_PAGES * PAGE_SIZE, STEP);
    let mut seed = seed;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = Outcome::default();
    for _ in 0..ops {
        let r = next();
        let slot = if r % 10 < 8 { (r >> 8) as usize % SHORT } else { SHORT + (r >> 8) as usize % LONG };
        let s = slots[slot];
        if s.ptr != 0 {
            let size = s.size as usize;
            for i in (0..size).step_by(size / 4 + 1) {
                // SAFETY: inside the live block.
                if unsafe { *((s.ptr + i as u64) as *const u8) } != pattern(s.ptr, i) {
                    out.corrupt += 1;
                }
            }
            let l = Layout::from_size_align(size, s.align as usize).unwrap();
            // SAFETY: allocated from `h` with this layout.
            let _ = unsafe { h.dealloc(s.ptr as *mut u8, l) };
            slots[slot] = Slot::default();
        } else {
            let k = next();
            let pick = k % 100;
            let (size, align) = if pick < 60 {
                (16 + (k >> 8) % 241, 16)
            } else if pick < 85 {
                (257 + (k >> 8) % 768, 16)
            } else if pick < 97 {
                (1025 + (k >> 8) % 3071, 16)
            } else {
                (16 + (k >> 8) % 497, 64 << ((k >> 20) % 4))
            };
            let l = Layout::from_size_align(size as usize, align as usize).unwrap();
            // SAFETY: the region is ours (see `run`).
            let p = unsafe { h.alloc(l) } as u64;
            if p == 0 {
                out.failed += 1;
                continue;
            }
            for i in (0..size as usize).step_by(size as usize / 4 + 1) {
                // SAFETY: inside the new block.
                unsafe { *((p + i as u64) as *mut u8) = pattern(p, i) };
            }
            slots[slot] = Slot { ptr: p, size: size as u32, align: align as u32 };
        }
    }
    for s in slots.iter().filter(|s| s.ptr != 0) {
        out.live_blocks += 1;
        out.live_bytes += s.size as u64;
    }
    let (blocks, largest) = h.list_stats();
    out.free_blocks = blocks as u64;
    out.largest_free = largest as u64;
    out.free_bytes = h.free_bytes() as u64;
    out.pages = (h.end - h.base) / PAGE_SIZE;
    out.findings = h.findings + h.check().is_err() as u64;
    out
}

pub fn run(sel: &Selection) {
    if !sel.wants(sel.cpl3_set(), "heap_frag") {
        return;
    }
    // At CPL3 (native on KVM-PVM; CPL0 would be emulated, ~270 ns per
    // instruction).
    let ops: u64 = 200_000;
    let region = match frames::with(|fa| fa.alloc_contiguous(REGION_PAGES, PAGE_SIZE)) {
        Ok(p) => p,
        Err(e) => {
            println!("bench: heap_frag skipped: no {} contiguous frames ({:?})", REGION_PAGES, e);
            return;
        }
    };
    for (seed, backing) in SEEDS.iter().flat_map(|&s| [(s, Backing::Tlsf), (s, Backing::List)]) {
        let mut o = Outcome::default();
        user::run(&mut || {
            // The direct map is not usable at CPL3: `phys_to_virt` gives
            // the user alias during the run.
            o = replay(backing, phys_to_virt(region), ops, seed);
            0
        });
        let ratio_milli = if o.largest_free == 0 { 0 } else { o.free_bytes * 1000 / o.largest_free };
        report::send(ReportKind::Info, |r| {
            r.kv("event", "heap_frag")
                .kv("allocator", backing.name())
                .kv("ops", ops)
                .kv_hex("seed", seed)
                .kv("cpl", 3)
                .kv("live_blocks", o.live_blocks)
                .kv("live_bytes", o.live_bytes)
                .kv("free_bytes", o.free_bytes)
                .kv("largest_free", o.largest_free)
                .kv("free_blocks", o.free_blocks)
                .kv("pages", o.pages)
                .kv("failed", o.failed)
                .kv("check", if o.corrupt == 0 && o.findings == 0 { "ok" } else { "corrupt" });
        });
        println!(
            "BENCH heap_frag.{:<4} seed {:#x} ops={} live={} B in {} blocks, pages={}, free={} B in {} blocks, largest={} B, free/largest={}.{:03}{}",
            backing.name(),
            seed >> 48,
            ops,
            o.live_bytes,
            o.live_blocks,
            o.pages,
            o.free_bytes,
            o.free_blocks,
            o.largest_free,
            ratio_milli / 1000,
            ratio_milli % 1000,
            if o.corrupt == 0 && o.findings == 0 { "" } else { " CORRUPT" }
        );
    }
    let _ = frames::with(|fa| fa.free_contiguous(region, REGION_PAGES));
}
