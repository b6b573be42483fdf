//! The live-inspection block: one `#[repr(C)]` static the kernel keeps
//! current, so the host can read allocator and stack state from guest
//! memory while the guest runs (docs/ABI.md, "Inspect block").
//!
//! Its virtual and physical addresses are sent in the INSPECT report
//! (`inspect_block_virt`, `inspect_block_phys`). Writers bracket every update
//! with `seq` increments (odd = update in progress), so a host that reads
//! `seq`, the fields, then `seq` again and sees the same even value has a
//! consistent snapshot. Single CPU, so the counter is a plain store pair.
//!
//! The block lives in `.bss`: the CPL3 benchmark mode makes the kernel image
//! user-accessible for its runs, so the allocators can update the block from
//! ring 3 as well.

use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut};

// The block's layout and constants are ABI: defined in `crate::abi` (and
// once on the host, vmm/abi.py), used here.
pub use crate::abi::{InspectBlock, StackRecord, INSPECT_MAGIC, INSPECT_SIZE, INSPECT_VERSION, MAX_STACKS, STACK_IN_USE};

struct Global(UnsafeCell<InspectBlock>);
// SAFETY: one CPU; every writer goes through `update`, which is not
// re-entered (exception handlers only update after the interrupted update
// finished or never started: the demand-paging handler updates counters
// only, see `update`).
unsafe impl Sync for Global {}

static BLOCK: Global = Global(UnsafeCell::new(InspectBlock {
    magic: INSPECT_MAGIC,
    version: INSPECT_VERSION,
    size: INSPECT_SIZE as u32,
    seq: 0,
    heap_free_head: 0,
    heap_start: 0,
    heap_end: 0,
    heap_free_bytes: 0,
    heap_large_bytes: 0,
    frames_free: 0,
    bitmap_phys: 0,
    bitmap_bits: 0,
    stack_count: 0,
    current_task: 0,
    demand_start: 0,
    demand_end: 0,
    demand_faults: 0,
    heap_allocs: 0,
    heap_frees: 0,
    heap_cached_bytes: 0,
    workload_iters: 0,
    heap_index: 0,
    stacks: [StackRecord::EMPTY; MAX_STACKS],
}));

/// An open critical section, from [`begin`] to [`end`]: the odd `seq` this
/// `begin` wrote if it opened the outermost section, 0 if a section was
/// already open (then `end` writes nothing: the outer one closes it).
///
/// Nesting is read off `seq` itself (odd = a section is open) rather than a
/// depth counter: the heap's slow path opens one section per operation, and
/// a counter was two more dependent read-modify-writes of memory each time.
/// One CPU: an exception handler that nests a section closes it before
/// returning to the code it interrupted, so `seq` is as that code left it.
#[must_use = "a critical section must be closed with inspect::end"]
pub struct Section(u64);

/// Opens a critical section: `seq` turns odd until the matching [`end`].
///
/// The allocators bracket whole operations with it (not just the copy into
/// the block), so a host that parks the vCPU and finds `seq` odd knows the
/// heap, the frame bitmap or the page tables are mid-update and retries
/// instead of reporting a torn state as corruption. Sections nest.
#[inline(always)]
pub fn begin() -> Section {
    // SAFETY: single CPU, see `Global`.
    let s = unsafe {
        let seq = addr_of_mut!((*BLOCK.0.get()).seq);
        let s = seq.read_volatile();
        if s & 1 == 0 {
            seq.write_volatile(s | 1);
            Section(s | 1)
        } else {
            Section(0)
        }
    };
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    s
}

/// Closes the section opened by [`begin`]; if it was the outermost, `seq`
/// becomes even (and larger) and the quiet hook runs.
#[inline(always)]
pub fn end(s: Section) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    if s.0 != 0 {
        // SAFETY: `seq` as in `begin`. `inspect_quiet` is a lone `ret`: it
        // touches no register and no memory beyond the return address the
        // call pushes (no red zone on this target). A direct call, not one
        // through the GOT as an extern fn would be in this PIE image.
        unsafe {
            addr_of_mut!((*BLOCK.0.get()).seq).write_volatile(s.0.wrapping_add(1));
            core::arch::asm!("call inspect_quiet");
        }
    }
}

// `inspect_quiet`: called each time the outermost critical section closes,
// right after `seq` turned even: the first quiet moment. It does nothing.
// Its address (INSPECT report `quiet_hook`) is where a host that parked the
// vCPU inside a section puts an instruction breakpoint: the guest then runs
// at full speed to the end of the section and stops there, instead of being
// parked again and again until it happens to be quiet. A lone `ret` in
// assembly: a Rust function would also push and pop the frame pointer
// (force-frame-pointers), three more instructions on every heap slow path.
core::arch::global_asm!(
    ".pushsection .text.inspect_quiet,\"ax\",@progbits",
    ".globl inspect_quiet",
    ".type inspect_quiet,@function",
    "inspect_quiet:",
    "    ret",
    ".size inspect_quiet, . - inspect_quiet",
    ".popsection",
);

extern "C" {
    fn inspect_quiet();
}

/// Address of [`inspect_quiet`] (INSPECT report).
pub fn quiet_hook() -> u64 {
    inspect_quiet as unsafe extern "C" fn() as usize as u64
}

/// True inside a critical section (debug assertions of the mutators).
#[inline(always)]
pub fn in_critical() -> bool {
    // SAFETY: single CPU, see `Global`.
    unsafe { addr_of!((*BLOCK.0.get()).seq).read_volatile() & 1 != 0 }
}

/// Runs `f` inside a critical section.
#[inline(always)]
pub fn critical<R>(f: impl FnOnce() -> R) -> R {
    let s = begin();
    let r = f();
    end(s);
    r
}

/// Runs `f` on the block between two `seq` increments (volatile stores, so
/// the host sees every update in order).
#[inline]
pub fn update(f: impl FnOnce(&mut InspectBlock)) {
    let s = begin();
    // SAFETY: single CPU, see `Global`; `begin`/`end` fence the field stores.
    unsafe { f(&mut *BLOCK.0.get()) };
    end(s);
}

/// Runs `f` on the block inside a critical section the caller already
/// holds: `seq` is odd already and `end` fences the stores, so no second
/// bracket (on the heap's slow path a nested `begin`/`end` would be one more
/// read of `seq` and a branch per operation).
#[inline(always)]
pub fn update_in_critical(f: impl FnOnce(&mut InspectBlock)) {
    debug_assert!(in_critical(), "inspect: update_in_critical outside a critical section");
    // SAFETY: single CPU, see `Global`; the open section's `end` fences the
    // field stores before `seq` turns even.
    unsafe { f(&mut *BLOCK.0.get()) };
}

/// A copy of the block (tests, reports).
pub fn snapshot() -> InspectBlock {
    // SAFETY: plain read of a static; one CPU.
    unsafe { addr_of!(*BLOCK.0.get()).read_volatile() }
}

/// Stack records, read without the seq protocol (fault handler: it must not
/// wait, and a torn record only affects the fault's classification).
pub fn stack_records() -> [StackRecord; MAX_STACKS] {
    // SAFETY: as `snapshot`.
    unsafe { addr_of!((*BLOCK.0.get()).stacks).read_volatile() }
}

pub fn virt() -> u64 {
    BLOCK.0.get() as u64
}

pub fn phys() -> u64 {
    crate::image::virt_to_phys(virt())
}
