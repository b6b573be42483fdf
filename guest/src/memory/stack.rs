//! Kernel stacks with guard pages, and switching onto one.
//!
//! Slot `i` covers `STACKS_START + i * STACK_SLOT` for `STACK_SLOT` bytes;
//! its lowest page is never mapped, so running off the bottom of a stack
//! page-faults in a known guard page (reported as a stack overflow, exit 4;
//! the #PF handler runs on its own IST stack, so it still has a stack).

use super::layout::{STACKS_START, STACK_SLOT};
use super::paging::{self, MapError, PageFlags, PageSize};
use super::{frames, PAGE_SIZE};
use core::arch::asm;

/// Maps `pages` 4 KiB pages for stack slot `slot` (above its guard page);
/// returns the stack top (exclusive, 16-byte aligned).
pub fn map_stack(slot: u64, pages: u64) -> Result<u64, MapError> {
    assert!((pages + 1) * PAGE_SIZE <= STACK_SLOT, "stack larger than its slot");
    let base = STACKS_START + slot * STACK_SLOT + PAGE_SIZE;
    for i in 0..pages {
        let frame = frames::alloc_frame()?;
        paging::map_page(base + i * PAGE_SIZE, frame, PageSize::Size4K, PageFlags::WRITABLE | PageFlags::NO_EXECUTE)?;
    }
    Ok(base + pages * PAGE_SIZE)
}

/// The guard page of slot `slot`.
pub fn guard_page(slot: u64) -> u64 {
    STACKS_START + slot * STACK_SLOT
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
