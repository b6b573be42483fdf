//! The kernel's virtual address space. Every fixed virtual address lives here.
//!
//! ```text
//! 0x0000_0000_0000_0000 +--------------------------------+
//!                       | user half (unmapped)           |
//! 0x0000_8000_0000_0000 +--------------------------------+ (non-canonical hole)
//! 0xFFFF_8000_0000_0000 | direct map of guest RAM        | host-built, P W NX
//!                       |   (PHYS_OFFSET + phys)         |
//! 0xFFFF_C000_0000_0000 | kernel heap (HEAP_MAX bytes)   | mapped on demand, P W NX
//! 0xFFFF_C800_0000_0000 | kernel stacks, each below an   | P W NX
//!                       |   unmapped guard page          |
//! 0xFFFF_D000_0000_0000 | scratch area for paging tests  |
//! 0xFFFF_FFFF_8000_0000 | kernel image (+ KASLR slide)   | host-built, per segment
//! 0xFFFF_FFFF_FFFF_FFFF +--------------------------------+
//! ```

/// Start of the kernel heap's virtual range.
pub const HEAP_START: u64 = 0xFFFF_C000_0000_0000;
/// Largest the heap may grow to.
pub const HEAP_MAX: u64 = 64 << 20;
/// Bytes mapped when the heap is created.
pub const HEAP_INITIAL: u64 = 64 << 10;
/// Minimum growth step (bytes mapped at once when the heap runs out).
pub const HEAP_GROW_STEP: u64 = 64 << 10;

/// Kernel stacks: slot i spans `STACKS_START + i * STACK_SLOT`; its lowest
/// page is the guard page and is never mapped.
pub const STACKS_START: u64 = 0xFFFF_C800_0000_0000;
pub const STACK_SLOT: u64 = 1 << 20;

/// Scratch virtual range the paging tests map and unmap in.
pub const SCRATCH_START: u64 = 0xFFFF_D000_0000_0000;
pub const SCRATCH_SIZE: u64 = 1 << 39;
