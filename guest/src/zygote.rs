//! `zygote=1`: after READY, ask the host what to run instead of taking it
//! only from the boot command line.
//!
//! The host snapshots the guest while it waits here and starts every test's
//! VM from that point (a fork of the snapshot, or the same VM reset), so the
//! work after READY (`tests=`, `bench=`, `workload=`, ...) comes from a
//! mailbox the host fills before resuming the guest: one OUT of the
//! mailbox's physical address to `port::WORK`, then the guest reads a u32
//! length and that many bytes of command-line words. They are appended to
//! the boot command line (a later `key=` wins), so boot-time words stay.

use crate::abi::port;
use crate::arch::x86_64 as cpu;
use crate::cmdline::Cmdline;
use crate::image;
use alloc::string::String;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

const MAILBOX_SIZE: usize = 4096;

#[repr(C, align(4096))]
struct Mailbox(UnsafeCell<[u8; MAILBOX_SIZE]>);

// SAFETY: only the boot CPU touches it, and only inside `wait_for_work`.
unsafe impl Sync for Mailbox {}

static MAILBOX: Mailbox = Mailbox(UnsafeCell::new([0; MAILBOX_SIZE]));

/// Written by the host (non-zero: end the current work), read by the guest.
/// Its address goes to the host once per work loop (`watch_for_end`), so
/// asking costs a memory read, not an exit per iteration: an exit would also
/// make a busy watcher's Python (the GIL) part of the guest's speed.
static END_FLAG: AtomicU32 = AtomicU32::new(0);

/// Tell the host where to ring when it wants the current work to end (one
/// OUT exit, at the start of a `workload=` loop).
pub fn watch_for_end() {
    cpu::outl(port::WORK_END, image::virt_to_phys(END_FLAG.as_ptr() as u64) as u32);
}

/// Has the host asked the current work to end? The `workload=` loops ask
/// once per iteration and end as at their deadline, so a host done
/// watching a guest need not wait out its `workload_ms`.
#[inline]
pub fn end_requested() -> bool {
    END_FLAG.load(Ordering::Relaxed) != 0
}

/// Block (one OUT exit) until the host has put work in the mailbox; returns
/// the boot command line with the work's words appended.
pub fn wait_for_work(boot: Cmdline) -> Cmdline {
    let base = MAILBOX.0.get() as *mut u8;
    let phys = image::virt_to_phys(base as u64);
    // SAFETY: the mailbox is ours; a zero length means "no work" if the host
    // resumes without writing.
    unsafe { core::ptr::write_volatile(base as *mut u32, 0) };
    cpu::outl(port::WORK, phys as u32);
    // SAFETY: the host wrote the mailbox while the vCPU was stopped in the
    // OUT above; volatile reads because the compiler cannot know that.
    let len = unsafe { core::ptr::read_volatile(base as *const u32) } as usize;
    let len = len.min(MAILBOX_SIZE - 4);
    let mut text = String::with_capacity(boot.as_str().len() + 1 + len);
    text.push_str(boot.as_str());
    text.push(' ');
    for i in 0..len {
        // SAFETY: in bounds (len <= MAILBOX_SIZE - 4).
        let b = unsafe { core::ptr::read_volatile(base.add(4 + i)) };
        text.push(if b.is_ascii() && b != 0 { b as char } else { ' ' });
    }
    Cmdline::new(alloc::boxed::Box::leak(text.into_boxed_str()))
}
