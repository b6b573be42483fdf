//! Kernel stacks: 64 KiB each, at randomized addresses, with an unmapped
//! guard page below and above.
//!
//! The stack region (`layout::STACKS_START`, `STACK_SLOTS` slots of
//! `STACK_SLOT` bytes) is never mapped except for live stacks. A stack takes
//! a random free slot: the slot's lowest page is the low guard, the next 16
//! pages are the stack, the page after them is the high guard, and the rest
//! of the slot stays unmapped too. Running off either end page-faults in a
//! guard page, reported as a stack overflow (exit 4) by the #PF handler,
//! which runs on its own IST stack.

use super::layout::{STACKS_START, STACK_SLOT, STACK_SLOTS};
use super::paging::{self, MapError, PageFlags, PageSize};
use super::{frames, PAGE_SIZE};
use crate::inspect::{StackRecord, STACK_IN_USE};
use core::arch::asm;

/// Bytes of every kernel stack.
pub const STACK_SIZE: u64 = 64 << 10;
const STACK_PAGES: u64 = STACK_SIZE / PAGE_SIZE;

const _: () = assert!(STACK_SIZE + 2 * PAGE_SIZE <= STACK_SLOT);

fn slot_base(slot: u64) -> u64 {
    STACKS_START + slot * STACK_SLOT
}

/// The record of a stack placed in `slot` (not yet mapped).
pub fn record_for_slot(slot: u64, task_id: u32) -> StackRecord {
    let guard_low = slot_base(slot);
    let base = guard_low + PAGE_SIZE;
    StackRecord { base, top: base + STACK_SIZE, guard_low, guard_high: base + STACK_SIZE, task_id, flags: STACK_IN_USE }
}

/// Maps a 64 KiB stack in a random slot not used by any of `in_use`.
pub fn alloc_stack(task_id: u32, in_use: &[StackRecord]) -> Result<StackRecord, MapError> {
    let mut slot = crate::rand::below(STACK_SLOTS);
    // A few random tries, then a linear probe (the region has thousands of
    // slots and at most 16 stacks, so the probe practically never runs).
    for attempt in 0..STACK_SLOTS {
        let g = slot_base(slot);
        if !in_use.iter().any(|r| r.flags & STACK_IN_USE != 0 && r.guard_low == g) {
            break;
        }
        slot = if attempt < 8 { crate::rand::below(STACK_SLOTS) } else { (slot + 1) % STACK_SLOTS };
    }
    let rec = record_for_slot(slot, task_id);
    for i in 0..STACK_PAGES {
        let frame = match frames::alloc_frame() {
            Ok(f) => f,
            Err(e) => {
                unmap_pages(rec.base, i);
                return Err(e.into());
            }
        };
        if let Err(e) = paging::map_page(rec.base + i * PAGE_SIZE, frame, PageSize::Size4K, PageFlags::WRITABLE | PageFlags::NO_EXECUTE) {
            let _ = frames::free_frame(frame);
            unmap_pages(rec.base, i);
            return Err(e);
        }
    }
    Ok(rec)
}

fn unmap_pages(base: u64, pages: u64) {
    for i in 0..pages {
        if let Ok(t) = paging::unmap_page(base + i * PAGE_SIZE) {
            let _ = frames::free_frame(t.phys);
        }
    }
}

/// Unmaps a stack and frees its frames. Must not be the running stack.
pub fn free_stack(rec: &StackRecord) {
    unmap_pages(rec.base, (rec.top - rec.base) / PAGE_SIZE);
}

/// The record whose guard page (low or high) contains `addr`, if any.
pub fn guard_owner(addr: u64) -> Option<StackRecord> {
    crate::inspect::stack_records().into_iter().find(|r| {
        r.flags & STACK_IN_USE != 0
            && ((addr >= r.guard_low && addr < r.guard_low + PAGE_SIZE)
                || (addr >= r.guard_high && addr < r.guard_high + PAGE_SIZE))
    })
}

/// Continues on the stack ending at `top` by calling `f(arg)`; never returns.
///
/// # Safety
/// `top` must be the top of a mapped, writable, otherwise unused stack.
pub unsafe fn switch_to(top: u64, f: extern "sysv64" fn(u64) -> !, arg: u64) -> ! {
    asm!(
        "mov rsp, {top}",
        "xor ebp, ebp",
        "call {f}",
        "ud2",
        top = in(reg) top,
        f = in(reg) f,
        in("rdi") arg,
        options(noreturn)
    )
}
