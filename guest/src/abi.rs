//! Guest side of the guest/host ABI (docs/ABI.md, version 1).
//!
//! Data only: every struct mirrors the host's `vmm/abi.py` byte for byte and
//! its size and key offsets are pinned at compile time below.

use core::mem::{offset_of, size_of};

/// `b"PYVMMBI1"` read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = 0x3149_424D_4D56_5950;
pub const BOOT_INFO_VERSION: u32 = 1;

/// Physical address the kernel image is loaded at (first PT_LOAD p_paddr).
pub const KERNEL_PHYS_BASE: u64 = 0x10_0000;
/// Link address of the kernel image (before the KASLR slide).
pub const KERNEL_LINK_BASE: u64 = 0xFFFF_FFFF_8000_0000;
/// Base of the direct map of guest RAM.
pub const PHYS_OFFSET: u64 = 0xFFFF_8000_0000_0000;

/// `BootInfo::flags` bit 0: the direct map uses 1 GiB pages.
pub const BOOT_FLAG_DIRECT_MAP_1G: u32 = 1 << 0;

/// Boot information written by the host at physical 0x2000; RDI at entry is
/// its direct-map address.
#[repr(C)]
#[derive(Debug)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    pub size: u32,
    pub phys_offset: u64,
    pub ram_size: u64,
    pub memmap_phys: u64,
    pub memmap_count: u32,
    pub memmap_desc_size: u32,
    pub kernel_phys_start: u64,
    pub kernel_phys_end: u64,
    pub kernel_link_base: u64,
    pub kaslr_slide: u64,
    pub boot_pt_phys: u64,
    pub boot_pt_end: u64,
    pub fb_phys: u64,
    pub fb_width: u32,
    pub fb_height: u32,
    pub fb_stride: u32,
    pub fb_format: u32,
    pub cmdline_phys: u64,
    pub cmdline_len: u32,
    pub flags: u32,
    pub rng_seed: u64,
    pub tsc_khz: u64,
    pub backend: u32,
    pub reserved: u32,
}

const _: () = assert!(size_of::<BootInfo>() == 160);
const _: () = assert!(offset_of!(BootInfo, version) == 8);
const _: () = assert!(offset_of!(BootInfo, size) == 12);
const _: () = assert!(offset_of!(BootInfo, phys_offset) == 16);
const _: () = assert!(offset_of!(BootInfo, ram_size) == 24);
const _: () = assert!(offset_of!(BootInfo, memmap_phys) == 32);
const _: () = assert!(offset_of!(BootInfo, memmap_count) == 40);
const _: () = assert!(offset_of!(BootInfo, memmap_desc_size) == 44);
const _: () = assert!(offset_of!(BootInfo, kernel_phys_start) == 48);
const _: () = assert!(offset_of!(BootInfo, kernel_phys_end) == 56);
const _: () = assert!(offset_of!(BootInfo, kernel_link_base) == 64);
const _: () = assert!(offset_of!(BootInfo, kaslr_slide) == 72);
const _: () = assert!(offset_of!(BootInfo, boot_pt_phys) == 80);
const _: () = assert!(offset_of!(BootInfo, boot_pt_end) == 88);
const _: () = assert!(offset_of!(BootInfo, fb_phys) == 96);
const _: () = assert!(offset_of!(BootInfo, fb_width) == 104);
const _: () = assert!(offset_of!(BootInfo, fb_stride) == 112);
const _: () = assert!(offset_of!(BootInfo, cmdline_phys) == 120);
const _: () = assert!(offset_of!(BootInfo, cmdline_len) == 128);
const _: () = assert!(offset_of!(BootInfo, flags) == 132);
const _: () = assert!(offset_of!(BootInfo, rng_seed) == 136);
const _: () = assert!(offset_of!(BootInfo, tsc_khz) == 144);
const _: () = assert!(offset_of!(BootInfo, backend) == 152);
const _: () = assert!(offset_of!(BootInfo, reserved) == 156);

/// Virtualization backend reported in `BootInfo::backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Backend {
    Unknown = 0,
    Vmx = 1,
    Svm = 2,
    /// KVM-PVM: CPL0 code is emulated, about 270 ns per instruction.
    Pvm = 3,
}

impl Backend {
    pub fn from_raw(raw: u32) -> Backend {
        match raw {
            1 => Backend::Vmx,
            2 => Backend::Svm,
            3 => Backend::Pvm,
            _ => Backend::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Unknown => "unknown",
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::Pvm => "pvm",
        }
    }
}

/// One memory-map entry, EFI_MEMORY_DESCRIPTOR layout (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemoryDescriptor {
    pub typ: u32,
    pub pad: u32,
    pub physical_start: u64,
    pub virtual_start: u64,
    /// Count of 4 KiB pages.
    pub number_of_pages: u64,
    pub attribute: u64,
}

const _: () = assert!(size_of::<MemoryDescriptor>() == 40);
const _: () = assert!(offset_of!(MemoryDescriptor, physical_start) == 8);
const _: () = assert!(offset_of!(MemoryDescriptor, virtual_start) == 16);
const _: () = assert!(offset_of!(MemoryDescriptor, number_of_pages) == 24);
const _: () = assert!(offset_of!(MemoryDescriptor, attribute) == 32);

/// Memory-map descriptor types (EFI numbering plus one OS-defined type).
pub mod memtype {
    pub const RESERVED: u32 = 0;
    pub const LOADER_CODE: u32 = 1;
    pub const LOADER_DATA: u32 = 2;
    pub const BOOT_SERVICES_CODE: u32 = 3;
    pub const BOOT_SERVICES_DATA: u32 = 4;
    pub const RUNTIME_SERVICES_CODE: u32 = 5;
    pub const RUNTIME_SERVICES_DATA: u32 = 6;
    /// The only type the guest ever hands out.
    pub const CONVENTIONAL: u32 = 7;
    pub const UNUSABLE: u32 = 8;
    pub const ACPI_RECLAIM: u32 = 9;
    pub const ACPI_NVS: u32 = 10;
    pub const MMIO: u32 = 11;
    pub const MMIO_PORT_SPACE: u32 = 12;
    pub const PAL_CODE: u32 = 13;
    pub const PERSISTENT: u32 = 14;
    pub const FRAMEBUFFER: u32 = 0x8000_0001;

    pub fn name(typ: u32) -> &'static str {
        match typ {
            RESERVED => "Reserved",
            LOADER_CODE => "LoaderCode",
            LOADER_DATA => "LoaderData",
            BOOT_SERVICES_CODE => "BootServicesCode",
            BOOT_SERVICES_DATA => "BootServicesData",
            RUNTIME_SERVICES_CODE => "RuntimeServicesCode",
            RUNTIME_SERVICES_DATA => "RuntimeServicesData",
            CONVENTIONAL => "Conventional",
            UNUSABLE => "Unusable",
            ACPI_RECLAIM => "ACPIReclaim",
            ACPI_NVS => "ACPINVS",
            MMIO => "MMIO",
            MMIO_PORT_SPACE => "MMIOPortSpace",
            PAL_CODE => "PalCode",
            PERSISTENT => "Persistent",
            FRAMEBUFFER => "Framebuffer",
            _ => "Other",
        }
    }
}

/// `MemoryDescriptor::attribute` bits.
pub const EFI_MEMORY_WB: u64 = 0x8;
pub const EFI_MEMORY_RUNTIME: u64 = 1 << 63;

/// I/O ports the host emulates.
pub mod port {
    /// COM1 transmit holding register (write a console byte).
    pub const COM1_THR: u16 = 0x3F8;
    /// COM1 line status register; bit 5 = THR empty.
    pub const COM1_LSR: u16 = 0x3FD;
    /// Exit device: a 32-bit OUT ends the run with that exit code.
    pub const EXIT: u16 = 0xF4;
    /// Report channel: a 32-bit OUT of a report record's physical address.
    pub const REPORT: u16 = 0x500;
    /// Instruction counter: a 32-bit OUT of an id starts single-stepping
    /// (the host counts every instruction), one to `ICOUNT_STOP` ends it.
    pub const ICOUNT_START: u16 = 0x510;
    pub const ICOUNT_STOP: u16 = 0x514;
    /// Work mailbox (`zygote=1`): a 32-bit OUT of the mailbox's physical
    /// address says "waiting for work"; when the run resumes the host has
    /// written the work (u32 length, then command-line words) there.
    pub const WORK: u16 = 0x520;
    /// End-of-work doorbell: a 32-bit OUT of a u32 flag's physical address
    /// (any guest, `zygote=1` or not). When the host wants the current work
    /// to end it writes non-zero there; `workload=` loops read the flag once
    /// per iteration: a memory read, not an exit.
    pub const WORK_END: u16 = 0x524;
}

/// Line status register bit 5: transmit holding register empty.
pub const LSR_THR_EMPTY: u8 = 1 << 5;

/// Exit codes the guest chooses (via `port::EXIT`).
pub mod exit {
    pub const SUCCESS: u32 = 0;
    pub const TEST_FAILURE: u32 = 1;
    pub const PANIC: u32 = 3;
    pub const STACK_OVERFLOW: u32 = 4;
    pub const FAULT: u32 = 5;
}

/// `b"RRPT"` read as a little-endian u32.
pub const REPORT_MAGIC: u32 = 0x5450_5252;
/// Largest payload the host accepts.
pub const REPORT_MAX_PAYLOAD: usize = 65536;

/// Header of a report record; the payload (`key=value\n` lines) follows.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReportHeader {
    pub magic: u32,
    pub kind: u32,
    /// Payload bytes following the header.
    pub len: u32,
    pub reserved: u32,
}

const _: () = assert!(size_of::<ReportHeader>() == 16);
const _: () = assert!(offset_of!(ReportHeader, kind) == 4);
const _: () = assert!(offset_of!(ReportHeader, len) == 8);

/// Report kinds (`ReportHeader::kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ReportKind {
    Ready = 1,
    TestResult = 2,
    Panic = 3,
    Bench = 4,
    Inspect = 5,
    Fault = 6,
    Info = 7,
    TestList = 8,
    Summary = 9,
}

// --- The live-inspection block (docs/ABI.md, "Inspect block"; kept current by
// crate::inspect) -----------------------------------------------------------

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
