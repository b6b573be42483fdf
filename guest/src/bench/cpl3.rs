//! Hot paths that execute no privileged instruction, measured at CPL0 and
//! (with `bench=cpl3`) at CPL3, where KVM-PVM runs them natively: small heap
//! allocation at several free-list lengths, frame bitmap allocate/free,
//! page-table entry construction, the `translate` walk.
//!
//! Free list of length L: L-1 free 32-byte fragments (each followed by a
//! live 32-byte block, so they cannot merge) lie before the block that
//! serves the request, so the first-fit list walks past all of them on
//! allocation and on free (address-ordered insert); TLSF keeps them on the
//! 48-byte list and never looks at them. `freelist_len` is the measured
//! number of free blocks (the heap may hold a few other fragments).
//!
//! Requests: 64 B (`alloc_free_64`, with the backing allocator alone and
//! with the size-class caches in front), 3 KiB (`alloc_free_3k`) and 64 B
//! aligned to 512 (`alloc_free_64_a512`), which the caches never serve.

use super::timing::{calibrate, measure, Stats};
use super::user;
use super::{emit, Extra, Selection};
use crate::memory::heap::{self, Backing, Mode};
use crate::memory::paging::{self, PageFlags, PageSize};
use crate::memory::frames;
use alloc::alloc::{alloc, dealloc, Layout};
use core::cell::UnsafeCell;
use core::hint::black_box;

const LENGTHS: [u64; 4] = [1, 64, 1024, 16384];
const MAX_FRAGS: usize = 16384;
const N3: usize = 500;
const N0: usize = 200;
const BATCH: u64 = 32;

struct Frags(UnsafeCell<[[u64; MAX_FRAGS]; 2]>);
// SAFETY: one CPU, benchmarks never nest.
unsafe impl Sync for Frags {}
static FRAGS: Frags = Frags(UnsafeCell::new([[0; MAX_FRAGS]; 2]));

fn frags() -> &'static mut [[u64; MAX_FRAGS]; 2] {
    // SAFETY: see `Frags`.
    unsafe { &mut *FRAGS.0.get() }
}

const FRAG: Layout = match Layout::from_size_align(32, 16) {
    Ok(l) => l,
    Err(_) => panic!(),
};
/// The sizes measured at every free-list length: (name, layout). 3 KiB and
/// the 512-aligned request always miss the size-class caches.
const SHAPES: [(&str, Layout); 3] = [
    ("alloc_free_64", layout(64, 16)),
    ("alloc_free_3k", layout(3072, 16)),
    ("alloc_free_64_a512", layout(64, 512)),
];

const fn layout(size: usize, align: usize) -> Layout {
    match Layout::from_size_align(size, align) {
        Ok(l) => l,
        Err(_) => panic!(),
    }
}

/// Makes `len - 1` unmergeable 32-byte holes; returns the measured list length.
fn build(len: u64) -> u64 {
    let f = frags();
    let k = (len - 1) as usize;
    for i in 0..k {
        // SAFETY: non-zero layouts; all freed in `teardown`.
        unsafe {
            f[0][i] = alloc(FRAG) as u64;
            f[1][i] = alloc(FRAG) as u64;
        }
        assert!(f[0][i] != 0 && f[1][i] != 0, "benchmark heap exhausted");
    }
    // Highest first: every insert stops at the previous hole.
    for i in (0..k).rev() {
        // SAFETY: allocated above with FRAG.
        unsafe { dealloc(f[0][i] as *mut u8, FRAG) };
    }
    heap::stats_raw().free_blocks as u64
}

/// Leaves `blocks` (at most 16,384) unmergeable 32-byte holes on the heap's
/// free list for good (`workload=compute frag_blocks=N`: what the host's
/// heap walk faces on a fragmented heap); returns the measured free-list
/// length. Built at CPL3 when long (native speed on KVM-PVM); the live
/// blocks between the holes are never freed.
pub fn fragment(blocks: u64) -> u64 {
    let blocks = blocks.min(MAX_FRAGS as u64);
    let mode = heap::mode();
    heap::set_mode(Mode::Backing);
    // 48 B per hole and per live block with TLSF tags.
    heap::reserve(blocks * 128 + (128 << 10)).expect("heap reserve");
    let builder = if blocks > 64 { 3 } else { 0 };
    let measured = at(builder, || build(blocks + 1));
    heap::set_mode(mode);
    measured
}

fn teardown(len: u64) {
    let f = frags();
    // Lowest first: each free merges with the holes around it, so the
    // walk stays short.
    for i in 0..(len - 1) as usize {
        // SAFETY: allocated in `build` with FRAG.
        unsafe { dealloc(f[1][i] as *mut u8, FRAG) };
    }
}

/// Runs `f` at `cpl` (3: in ring 3 through `user::run`).
fn at<R: Copy + Default>(cpl: u8, mut f: impl FnMut() -> R) -> R {
    if cpl == 3 {
        let mut out = R::default();
        user::run(&mut || {
            out = f();
            0
        });
        out
    } else {
        f()
    }
}

/// `batch` alloc+free pairs per sample; the figures are per pair (at CPL3
/// one pair is a few TSC ticks: 26 cycles each on the development hosts).
fn alloc_free(l: Layout, n: usize, overhead: u64, batch: u64) -> Stats {
    let mut st = measure(n, overhead, |_| {
        for _ in 0..batch {
            // SAFETY: non-zero layout; freed right away.
            unsafe {
                let p = black_box(alloc(l));
                dealloc(p, l);
            }
        }
    });
    for v in [&mut st.p50, &mut st.p99, &mut st.min, &mut st.max] {
        *v /= batch;
    }
    st
}

/// Alloc+free pairs per sample at CPL3 (CPL0 is emulated: one pair).
const ALLOC_BATCH: u64 = 16;

pub fn run(sel: &Selection) {
    let set0 = sel.cpl0_set();
    let set3 = sel.cpl3_set();
    // `bench=heap`: only the heap shapes, at every free-list length, at
    // CPL3 (and 64 B at CPL0): what `vmm bench` boots `allocator=list` for.
    let heap_only = sel.has("heap");
    let cpl3_ok = set3 || heap_only || sel.has_cpl3_name();
    let mut cpls: [(u8, bool, u64); 2] = [(0, true, 0), (3, cpl3_ok, 0)];
    let any = set0 || set3 || heap_only || ["alloc_free_64", "alloc_free_3k", "alloc_free_64_a512", "frame_alloc_free", "pte_build", "translate"].iter().any(|n| sel.wants(false, n));
    if !any {
        return;
    }
    for c in cpls.iter_mut().filter(|c| c.1) {
        c.2 = at(c.0, || calibrate(N0));
    }
    let lengths: &[u64] = if set3 || heap_only { &LENGTHS } else { &LENGTHS[..2] };

    let shapes: alloc::vec::Vec<(&str, Layout)> =
        SHAPES.iter().copied().filter(|(name, _)| sel.wants(set0 || set3 || heap_only, name)).collect();
    if !shapes.is_empty() {
        let default_mode = heap::mode();
        let backing = heap::backing();
        // The backing allocator alone, then with the size-class caches in
        // front (only 64 B can hit them).
        let fast_name = if backing == Backing::Tlsf { "fast" } else { "fast-list" };
        for (mode, imp) in [(Mode::Backing, backing.name()), (Mode::Fast, fast_name)] {
            for &len in lengths {
                heap::set_mode(Mode::Backing);
                // Room for the fragments (48 B each with TLSF tags) without
                // growing (growing maps pages: privileged, impossible at CPL3).
                heap::reserve(len * 128 + (128 << 10)).expect("heap reserve");
                let builder = if len > 64 && cpl3_ok { 3 } else { 0 };
                let measured = at(builder, || build(len));
                heap::set_mode(mode);
                for &(name, l) in shapes.iter() {
                    if mode == Mode::Fast && name != "alloc_free_64" {
                        continue;
                    }
                    for &(cpl, _, overhead) in cpls.iter().filter(|c| c.1) {
                        // Only 64 B is measured at emulated CPL0 (its cost
                        // history); the others where the CPU runs natively.
                        if cpl == 0 && name != "alloc_free_64" && cpl3_ok {
                            continue;
                        }
                        // Under CPL0 emulation a walk of 16384 nodes costs ~50 ms.
                        let n = if cpl == 3 { N3 } else { (N0 as u64 * 64 / len.max(64)).max(5) as usize };
                        let batch = if cpl == 3 { ALLOC_BATCH } else { 1 };
                        let st = at(cpl, || alloc_free(l, n, overhead, batch));
                        let id = alloc::format!("{}.{}.fl{}.cpl{}", name, imp, len, cpl);
                        emit(
                            name,
                            &id,
                            cpl,
                            &st,
                            Extra {
                                imp: Some(imp),
                                freelist_len: Some(measured),
                                freelist_target: Some(len),
                                batch: (batch > 1).then_some(batch),
                            },
                        );
                    }
                }
                heap::set_mode(Mode::Backing);
                at(builder, || {
                    teardown(len);
                    0u64
                });
            }
        }
        heap::set_mode(default_mode);
    }

    if sel.wants(set0 || set3, "frame_alloc_free") {
        for &(cpl, _, overhead) in cpls.iter().filter(|c| c.1) {
            let st = at(cpl, || {
                measure(if cpl == 3 { N3 } else { N0 }, overhead, |_| {
                    frames::with(|fa| {
                        let f = fa.alloc().expect("frame");
                        fa.free(black_box(f)).expect("free");
                    })
                })
            });
            emit("frame_alloc_free", &alloc::format!("frame_alloc_free.cpl{}", cpl), cpl, &st, Extra::default());
        }
    }

    let root = crate::arch::x86_64::read_cr3();
    let probe = heap::stats_raw().start;
    let per_op = |mut st: Stats| {
        for v in [&mut st.p50, &mut st.p99, &mut st.min, &mut st.max] {
            *v /= BATCH;
        }
        st
    };
    if sel.wants(set0 || set3, "pte_build") {
        for &(cpl, _, overhead) in cpls.iter().filter(|c| c.1) {
            let st = at(cpl, || {
                measure(if cpl == 3 { N3 } else { N0 }, overhead, |i| {
                    for k in 0..BATCH {
                        let phys = black_box(((i as u64) << 12) + (k << 21));
                        black_box(paging::make_entry(phys, PageSize::Size4K, PageFlags::WRITABLE | PageFlags::NO_EXECUTE).ok());
                    }
                })
            });
            emit_batched("pte_build", cpl, &per_op(st));
        }
    }
    if sel.wants(set0 || set3, "translate") {
        for &(cpl, _, overhead) in cpls.iter().filter(|c| c.1) {
            let st = at(cpl, || {
                measure(if cpl == 3 { N3 } else { N0 }, overhead, |_| {
                    for k in 0..BATCH {
                        black_box(paging::translate_in(root, black_box(probe + (k & 7) * 4096)));
                    }
                })
            });
            emit_batched("translate", cpl, &per_op(st));
        }
    }
}

fn emit_batched(name: &str, cpl: u8, st: &Stats) {
    let id = alloc::format!("{}.cpl{}", name, cpl);
    emit(name, &id, cpl, st, Extra { batch: Some(BATCH), ..Extra::default() });
}
