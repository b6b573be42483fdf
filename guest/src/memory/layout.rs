//! The kernel's virtual address space. Every fixed virtual address lives here.
//!
//! ```text
//! 0x0000_0000_0000_0000 +--------------------------------+
//!                       | user half (unmapped)           |
//! 0x0000_8000_0000_0000 +--------------------------------+ (non-canonical hole)
//! 0xFFFF_8000_0000_0000 | direct map of guest RAM        | host-built, P W NX
//!                       |   (PHYS_OFFSET + phys)         |
//! 0xFFFF_C000_0000_0000 | kernel heap region: the heap   | mapped as it grows, P W NX
//!                       |   (HEAP_MAX bytes) starts at a |
//!                       |   random 2 MiB multiple        |
//! 0xFFFF_C800_0000_0000 | kernel stacks: random 128 KiB  | P W NX
//!                       |   slots, 64 KiB stack between  |
//!                       |   two unmapped guard pages     |
//! 0xFFFF_D000_0000_0000 | scratch area for paging tests  |
//! 0xFFFF_D800_0000_0000 | demand-paged region            | mapped on first touch
//! 0xFFFF_FFFF_8000_0000 | kernel image (+ KASLR slide)   | host-built, per segment
//! 0xFFFF_FFFF_FFFF_FFFF +--------------------------------+
//! ```

/// Start of the region the heap is placed in (at a random 2 MiB multiple
/// below `HEAP_RANDOM_SPAN`).
pub const HEAP_REGION: u64 = 0xFFFF_C000_0000_0000;
pub const HEAP_RANDOM_SPAN: u64 = 64 << 30;
/// Largest the heap may grow to.
pub const HEAP_MAX: u64 = 64 << 20;
/// Bytes mapped when the heap is created.
pub const HEAP_INITIAL: u64 = 64 << 10;
/// Minimum growth step (bytes mapped at once when the heap runs out).
pub const HEAP_GROW_STEP: u64 = 64 << 10;

/// Kernel stacks: slot i spans `STACKS_START + i * STACK_SLOT`; a stack
/// takes a random slot, its lowest page (guard) and the page above the
/// stack (guard) are never mapped.
pub const STACKS_START: u64 = 0xFFFF_C800_0000_0000;
pub const STACK_SLOT: u64 = 128 << 10;
pub const STACK_SLOTS: u64 = 8192;

/// Scratch virtual range the paging tests, benchmarks and `workload=mm`
/// map and unmap in: everything up to the demand-paged region (they use
/// offsets up to 0xA0_0000_0000, so the INSPECT report's `scratch_size`
/// must cover the whole gap for the host to label their pages).
pub const SCRATCH_START: u64 = 0xFFFF_D000_0000_0000;
pub const SCRATCH_SIZE: u64 = DEMAND_START - SCRATCH_START;

/// Demand-paged region: the #PF handler maps a zeroed frame on first touch.
pub const DEMAND_START: u64 = 0xFFFF_D800_0000_0000;
pub const DEMAND_SIZE: u64 = 1 << 30;
