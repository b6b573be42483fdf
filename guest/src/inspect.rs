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
use core::mem::{offset_of, size_of};
use core::ptr::{addr_of, addr_of_mut};

/// `b"PYVMMIB1"` read as a little-endian u64.
pub const INSPECT_MAGIC: u64 = 0x3142_494D_4D56_5950;
pub const INSPECT_VERSION: u32 = 1;
/// Stack records in the block.
pub const MAX_STACKS: usize = 16;

/// `StackRecord::flags` bit 0: the record describes a live stack.
pub const STACK_IN_USE: u32 = 1 << 0;

/// One kernel stack: `[base, top)` is mapped; the guard pages at
/// `guard_low` (just below `base`) and `guard_high` (at `top`) are not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackRecord {
    pub base: u64,
    pub top: u64,
    pub guard_low: u64,
    pub guard_high: u64,
    pub task_id: u32,
    pub flags: u32,
}

const _: () = assert!(size_of::<StackRecord>() == 40);
const _: () = assert!(offset_of!(StackRecord, top) == 8);
const _: () = assert!(offset_of!(StackRecord, guard_low) == 16);
const _: () = assert!(offset_of!(StackRecord, guard_high) == 24);
const _: () = assert!(offset_of!(StackRecord, task_id) == 32);
const _: () = assert!(offset_of!(StackRecord, flags) == 36);

impl StackRecord {
    pub const EMPTY: StackRecord = StackRecord { base: 0, top: 0, guard_low: 0, guard_high: 0, task_id: 0, flags: 0 };
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InspectBlock {
    pub magic: u64,
    pub version: u32,
    pub size: u32,
    /// Update counter: odd while an update is in progress.
    pub seq: u64,
    /// Virtual address of the first free-list node (0 if empty).
    pub heap_free_head: u64,
    pub heap_start: u64,
    /// End of the mapped heap (current).
    pub heap_end: u64,
    /// Bytes on the free list.
    pub heap_free_bytes: u64,
    /// Bytes in large (frame-backed, direct-map) allocations.
    pub heap_large_bytes: u64,
    pub frames_free: u64,
    pub bitmap_phys: u64,
    /// Frames covered by the bitmaps (bits per bitmap).
    pub bitmap_bits: u64,
    /// Records in `stacks` with STACK_IN_USE set.
    pub stack_count: u32,
    /// Task id currently running.
    pub current_task: u32,
    /// Demand-paged region `[demand_start, demand_end)`.
    pub demand_start: u64,
    pub demand_end: u64,
    /// Pages mapped by the demand-paging fault handler so far.
    pub demand_faults: u64,
    pub heap_allocs: u64,
    pub heap_frees: u64,
    /// Bytes held in the fast allocator's size-class caches.
    pub heap_cached_bytes: u64,
    /// Iterations of the `workload=` loop so far.
    pub workload_iters: u64,
    /// Virtual address of the heap index (`heap::HeapIndex`: backing
    /// allocator, findings, TLSF lists); 0 before the heap exists.
    pub heap_index: u64,
    pub stacks: [StackRecord; MAX_STACKS],
}

pub const INSPECT_SIZE: usize = 800;
const _: () = assert!(size_of::<InspectBlock>() == INSPECT_SIZE);
const _: () = assert!(offset_of!(InspectBlock, version) == 8);
const _: () = assert!(offset_of!(InspectBlock, size) == 12);
const _: () = assert!(offset_of!(InspectBlock, seq) == 16);
const _: () = assert!(offset_of!(InspectBlock, heap_free_head) == 24);
const _: () = assert!(offset_of!(InspectBlock, heap_start) == 32);
const _: () = assert!(offset_of!(InspectBlock, heap_end) == 40);
const _: () = assert!(offset_of!(InspectBlock, heap_free_bytes) == 48);
const _: () = assert!(offset_of!(InspectBlock, heap_large_bytes) == 56);
const _: () = assert!(offset_of!(InspectBlock, frames_free) == 64);
const _: () = assert!(offset_of!(InspectBlock, bitmap_phys) == 72);
const _: () = assert!(offset_of!(InspectBlock, bitmap_bits) == 80);
const _: () = assert!(offset_of!(InspectBlock, stack_count) == 88);
const _: () = assert!(offset_of!(InspectBlock, current_task) == 92);
const _: () = assert!(offset_of!(InspectBlock, demand_start) == 96);
const _: () = assert!(offset_of!(InspectBlock, demand_end) == 104);
const _: () = assert!(offset_of!(InspectBlock, demand_faults) == 112);
const _: () = assert!(offset_of!(InspectBlock, heap_allocs) == 120);
const _: () = assert!(offset_of!(InspectBlock, heap_frees) == 128);
const _: () = assert!(offset_of!(InspectBlock, heap_cached_bytes) == 136);
const _: () = assert!(offset_of!(InspectBlock, workload_iters) == 144);
const _: () = assert!(offset_of!(InspectBlock, heap_index) == 152);
const _: () = assert!(offset_of!(InspectBlock, stacks) == 160);

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

/// Nesting depth of open critical sections (one CPU: a plain cell).
struct Depth(UnsafeCell<u32>);
// SAFETY: one CPU; an exception handler that nests a section closes it
// before returning to the code it interrupted.
unsafe impl Sync for Depth {}
static DEPTH: Depth = Depth(UnsafeCell::new(0));

/// Opens a critical section: `seq` turns odd until the matching [`end`].
///
/// The allocators bracket whole operations with it (not just the copy into
/// the block), so a host that parks the vCPU and finds `seq` odd knows the
/// heap, the frame bitmap or the page tables are mid-update and retries
/// instead of reporting a torn state as corruption. Sections nest.
#[inline(always)]
pub fn begin() {
    // SAFETY: single CPU, see `Depth` and `Global`.
    unsafe {
        let d = DEPTH.0.get();
        if *d == 0 {
            let seq = addr_of_mut!((*BLOCK.0.get()).seq);
            seq.write_volatile(seq.read_volatile() | 1);
        }
        *d += 1;
    }
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

/// Closes the section opened by [`begin`]; `seq` becomes even (and larger).
#[inline(always)]
pub fn end() {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // SAFETY: as in `begin`.
    unsafe {
        let d = DEPTH.0.get();
        *d -= 1;
        if *d == 0 {
            let seq = addr_of_mut!((*BLOCK.0.get()).seq);
            seq.write_volatile(seq.read_volatile().wrapping_add(1));
            inspect_quiet();
        }
    }
}

/// Called each time the outermost critical section closes, right after
/// `seq` turned even: the first quiet moment. It does nothing. Its address
/// (INSPECT report `quiet_hook`) is where a host that parked the vCPU inside
/// a section puts an instruction breakpoint: the guest then runs at full
/// speed to the end of the section and stops there, instead of being parked
/// again and again until it happens to be quiet. A call and a return per
/// outermost section otherwise.
#[inline(never)]
#[no_mangle]
pub extern "C" fn inspect_quiet() {
    // SAFETY: an empty asm statement; it only keeps the call (and so the
    // breakpoint address) from being optimised away.
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
}

/// Address of [`inspect_quiet`] (INSPECT report).
pub fn quiet_hook() -> u64 {
    inspect_quiet as extern "C" fn() as usize as u64
}

/// True inside a critical section (debug assertions of the mutators).
#[inline(always)]
pub fn in_critical() -> bool {
    // SAFETY: single CPU, see `Depth`.
    unsafe { *DEPTH.0.get() > 0 }
}

/// Runs `f` inside a critical section.
#[inline(always)]
pub fn critical<R>(f: impl FnOnce() -> R) -> R {
    begin();
    let r = f();
    end();
    r
}

/// Runs `f` on the block between two `seq` increments (volatile stores, so
/// the host sees every update in order).
#[inline]
pub fn update(f: impl FnOnce(&mut InspectBlock)) {
    begin();
    // SAFETY: single CPU, see `Global`; `begin`/`end` fence the field stores.
    unsafe { f(&mut *BLOCK.0.get()) };
    end();
}

/// Runs `f` on the block inside a critical section the caller already
/// holds: `seq` is odd already and `end` fences the stores, so no second
/// bracket (on the heap's slow path the nested `begin`/`end` were four
/// dependent read-modify-writes of the depth counter per operation).
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
