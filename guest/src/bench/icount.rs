//! Instruction counts of the hot paths (`bench=icount`), measured by the host.
//!
//! Time is meaningless for CPL0 code on KVM-PVM hosts (every instruction is
//! emulated), but the number of instructions a path executes is the same on
//! every backend and is exactly what the emulation multiplies. Each path runs
//! once to warm up, then once between two OUTs: the first makes the host
//! single-step the vCPU and count, the second stops it (docs/ABI.md,
//! "Instruction counter"). A BENCH report with `unit=instructions` and the
//! `icount_id` names the count; the host fills in the figure. A REP string
//! instruction traps after every iteration, so it counts once per iteration.

use super::Selection;
use crate::abi::{port, ReportKind};
use crate::arch::x86_64::outl;
use crate::memory::heap::{self, Mode};
use crate::memory::layout::SCRATCH_START;
use crate::memory::paging::{map_page, translate, unmap_page, PageFlags, PageSize};
use crate::memory::{frames, PAGE_SIZE};
use crate::{image, println, report};
use alloc::alloc::{alloc, dealloc, Layout};
use core::hint::black_box;

const ICOUNT_VA: u64 = SCRATCH_START + 0xA0_0000_0000;

/// Runs `f` once to warm up, then once counted by the host under `id`.
fn counted(id: u32, name: &str, detail: &str, mut f: impl FnMut()) {
    f();
    outl(port::ICOUNT_START, id);
    f();
    outl(port::ICOUNT_STOP, id);
    report::send(ReportKind::Bench, |r| {
        r.kv("name", name).kv("id", name).kv("unit", "instructions").kv("icount_id", id).kv("n", 1).kv("cpl", 0);
        if !detail.is_empty() {
            r.kv("impl", detail);
        }
    });
    println!("BENCH {:<28} counted by the host (single-step), id {}", name, id);
}

pub fn run(sel: &Selection) {
    if !(sel.has("icount") || sel.has("all")) {
        return;
    }
    let old = heap::mode();
    let backing = heap::backing().name();
    let fast = if heap::backing() == heap::Backing::Tlsf { "fast" } else { "fast-list" };
    // (id, name, layout, mode, impl): the backing allocator alone for every
    // shape, the caches in front for 64 B.
    let shapes = [
        (1u32, "alloc_free_64", (64, 8), Mode::Fast, fast),
        (2, "alloc_free_64", (64, 8), Mode::Backing, backing),
        (7, "alloc_free_3k", (3072, 16), Mode::Backing, backing),
        (8, "alloc_free_64_a512", (64, 512), Mode::Backing, backing),
    ];
    for (id, name, (size, align), mode, detail) in shapes {
        let l = Layout::from_size_align(size, align).unwrap();
        heap::set_mode(mode);
        counted(id, name, detail, || {
            // SAFETY: non-zero layout, freed right away.
            unsafe {
                let p = black_box(alloc(l));
                dealloc(p, l);
            }
        });
    }
    heap::set_mode(old);
    let page = Layout::from_size_align(4096, 16).unwrap();
    counted(3, "alloc_free_4k", "", || {
        // SAFETY: as above.
        unsafe {
            let p = black_box(alloc(page));
            dealloc(p, page);
        }
    });
    counted(4, "frame_alloc_free", "", || {
        let f = frames::alloc_frame().expect("frame");
        frames::free_frame(black_box(f)).expect("free");
    });
    // A pinned neighbour keeps the tables alive: map/unmap is the leaf work.
    let pin = frames::alloc_frame().expect("frame");
    let frame = frames::alloc_frame().expect("frame");
    let flags = PageFlags::WRITABLE | PageFlags::NO_EXECUTE;
    map_page(ICOUNT_VA + PAGE_SIZE, pin, PageSize::Size4K, flags).expect("map pin");
    counted(5, "map_unmap_4k", "", || {
        map_page(ICOUNT_VA, frame, PageSize::Size4K, flags).expect("map");
        unmap_page(ICOUNT_VA).expect("unmap");
    });
    unmap_page(ICOUNT_VA + PAGE_SIZE).expect("unmap pin");
    frames::free_frame(pin).expect("free");
    frames::free_frame(frame).expect("free");
    let text = image::virt_start();
    counted(6, "translate", "", || {
        black_box(translate(black_box(text)));
    });
}
