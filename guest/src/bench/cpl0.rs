//! Benchmarks of privileged paths (CPL0 only): large allocations, the
//! demand-paging fault, map/unmap, INVLPG, CR3 reload.

use super::timing::{calibrate, measure, measure_with};
use super::{emit, Extra, Selection};
use crate::arch::x86_64::{invlpg, reload_cr3};
use crate::memory::layout::{DEMAND_START, SCRATCH_START};
use crate::memory::paging::{map_page, unmap_page, PageFlags, PageSize};
use crate::memory::{demand, frames, PAGE_SIZE};
use alloc::alloc::{alloc, dealloc, Layout};
use core::hint::black_box;

const N: usize = 200;
/// INVLPG and CR3 reloads per sample: one alone is below the timer's noise.
const BATCH: u64 = 16;

fn per_op(mut st: super::Stats) -> super::Stats {
    for v in [&mut st.p50, &mut st.p99, &mut st.min, &mut st.max] {
        *v /= BATCH;
    }
    st
}
/// Scratch addresses the benchmarks map (away from the paging tests').
const BENCH_VA: u64 = SCRATCH_START + 0x80_0000_0000;
const BENCH_DEMAND: u64 = DEMAND_START + 0x2000_0000;

pub fn run(sel: &Selection) {
    let set = sel.cpl0_set();
    let overhead = calibrate(N);
    for (name, size) in [("alloc_free_4k", 4096usize), ("alloc_free_64k", 64 << 10)] {
        if sel.wants(set, name) {
            let layout = Layout::from_size_align(size, 16).unwrap();
            let st = measure(N, overhead, |_| {
                // SAFETY: non-zero layout; freed right away.
                unsafe {
                    let p = black_box(alloc(layout));
                    assert!(!p.is_null());
                    dealloc(p, layout);
                }
            });
            emit(name, name, 0, &st, Extra::default());
        }
    }
    if sel.wants(set, "demand_fault") {
        let st = measure(N, overhead, |i| {
            // SAFETY: demand region, each sample touches a fresh page.
            unsafe { core::ptr::write_volatile((BENCH_DEMAND + i as u64 * PAGE_SIZE) as *mut u64, 1) };
        });
        demand::release(BENCH_DEMAND, N as u64 * PAGE_SIZE);
        emit("demand_fault", "demand_fault", 0, &st, Extra::default());
    }
    let want_map = sel.wants(set, "map_unmap_4k");
    let want_invlpg = sel.wants(set, "invlpg");
    if want_map || want_invlpg {
        // A pinned neighbour keeps the page tables alive, so map/unmap
        // measures the leaf work, not table allocation.
        let pin = frames::alloc_frame().expect("frame");
        let frame = frames::alloc_frame().expect("frame");
        let flags = PageFlags::WRITABLE | PageFlags::NO_EXECUTE;
        map_page(BENCH_VA + PAGE_SIZE, pin, PageSize::Size4K, flags).expect("map pin");
        if want_map {
            let st = measure(N, overhead, |_| {
                map_page(BENCH_VA, frame, PageSize::Size4K, flags).expect("map");
                unmap_page(BENCH_VA).expect("unmap");
            });
            emit("map_unmap_4k", "map_unmap_4k", 0, &st, Extra::default());
        }
        if want_invlpg {
            let st = measure_with(
                N,
                overhead,
                |_| {
                    // SAFETY: the pinned page is ours; touch it so a TLB entry exists.
                    unsafe { core::ptr::read_volatile((BENCH_VA + PAGE_SIZE) as *const u64) };
                },
                |_| {
                    for _ in 0..BATCH {
                        invlpg(BENCH_VA + PAGE_SIZE)
                    }
                },
                |_| {},
            );
            emit("invlpg", "invlpg", 0, &per_op(st), Extra { batch: Some(BATCH), ..Extra::default() });
        }
        unmap_page(BENCH_VA + PAGE_SIZE).expect("unmap pin");
        frames::free_frame(pin).expect("free");
        frames::free_frame(frame).expect("free");
    }
    if sel.wants(set, "cr3_reload") {
        let st = measure(N, overhead, |_| {
            for _ in 0..BATCH {
                reload_cr3()
            }
        });
        emit("cr3_reload", "cr3_reload", 0, &per_op(st), Extra { batch: Some(BATCH), ..Extra::default() });
    }
}
