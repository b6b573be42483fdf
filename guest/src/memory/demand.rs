//! Demand paging: a lazily-backed region of kernel virtual memory.
//!
//! `layout::DEMAND_START..+DEMAND_SIZE` is never mapped up front. A
//! not-present, supervisor-mode page fault inside it makes the #PF handler
//! take a frame, zero it with `rep stosq` (one instruction for KVM-PVM's
//! emulator), map it P|W|NX and return, so the faulting instruction is
//! retried and succeeds. `release` gives pages back.

use super::layout::{DEMAND_SIZE, DEMAND_START};
use super::paging::{self, PageFlags, PageSize};
use super::{align_down, frames, zero_frames, PAGE_SIZE};

pub fn init() {
    crate::inspect::update(|b| {
        b.demand_start = DEMAND_START;
        b.demand_end = DEMAND_START + DEMAND_SIZE;
    });
}

pub fn contains(addr: u64) -> bool {
    addr >= DEMAND_START && addr < DEMAND_START + DEMAND_SIZE
}

/// The #PF handler's hook: maps a zeroed frame at the page of `addr` if the
/// fault is a supervisor not-present access in the demand region. Returns
/// false (not handled) otherwise or if no frame is left.
pub fn handle_fault(addr: u64, error: u64) -> bool {
    const PRESENT: u64 = 1;
    const USER: u64 = 4;
    const RSVD: u64 = 8;
    if !contains(addr) || error & (PRESENT | USER | RSVD) != 0 {
        return false;
    }
    // Frame, mapping and counter change in one inspect critical section.
    crate::inspect::critical(|| map_zeroed(addr))
}

fn map_zeroed(addr: u64) -> bool {
    let Ok(frame) = frames::alloc_frame() else { return false };
    // SAFETY: a frame we just allocated.
    unsafe { zero_frames(frame, 1) };
    if paging::map_page(align_down(addr, PAGE_SIZE), frame, PageSize::Size4K, PageFlags::WRITABLE | PageFlags::NO_EXECUTE).is_err() {
        let _ = frames::free_frame(frame);
        return false;
    }
    crate::inspect::update(|b| b.demand_faults += 1);
    true
}

/// Unmaps every backed page in `[start, start+len)` of the demand region and
/// frees its frame; returns the number of pages released.
pub fn release(start: u64, len: u64) -> u64 {
    let mut n = 0;
    let mut va = align_down(start, PAGE_SIZE);
    while va < start + len {
        if contains(va) && paging::translate(va).is_some() {
            // Unmap and free together: no snapshot between the two.
            crate::inspect::critical(|| {
                if let Ok(t) = paging::unmap_page(va) {
                    let _ = frames::free_frame(t.phys);
                    n += 1;
                }
            });
        }
        va += PAGE_SIZE;
    }
    n
}
