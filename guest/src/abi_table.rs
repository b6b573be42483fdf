//! The guest/host ABI as the compiler sees it, in the kernel image.
//!
//! `PYVMM_ABI` lists, by name, the size and every field offset of each
//! record the host and the guest share (BootInfo, MemoryDescriptor,
//! ReportHeader, InspectBlock, StackRecord) and the value of every shared
//! constant (magics, layout addresses, memory types, ports, exit codes,
//! report kinds, backends). The numbers come from `size_of`, `offset_of!`
//! and the constants themselves, so they are what this build really uses.
//! The host reads the table from the ELF (the symbol's bytes in `.rodata`)
//! and compares it, entry by entry and both ways, with its own definitions
//! (vmm/abi.py and the modules it names): tests/guest/test_abi_table.py.
//!
//! The table holds only integers (no pointers), so a slid kernel needs no
//! relocation for it, and the file's bytes are the loaded bytes.

use crate::abi::*;
use core::mem::{offset_of, size_of};

/// Bytes of an entry's name (NUL-padded ASCII).
const NAME: usize = 48;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct AbiEntry {
    pub name: [u8; NAME],
    pub value: u64,
}

/// An entry; spaces are dropped from the name (`stringify!` of a path
/// gives `port :: EXIT`).
const fn entry(name: &str, value: u64) -> AbiEntry {
    let bytes = name.as_bytes();
    let mut out = [0u8; NAME];
    let (mut i, mut n) = (0, 0);
    while i < bytes.len() {
        if bytes[i] != b' ' {
            assert!(n < NAME - 1, "ABI entry name too long");
            out[n] = bytes[i];
            n += 1;
        }
        i += 1;
    }
    AbiEntry { name: out, value }
}

/// `sizeof(Type)`.
macro_rules! size {
    ($t:ident) => {
        entry(concat!("sizeof(", stringify!($t), ")"), size_of::<$t>() as u64)
    };
}

/// `Type.field` = the field's offset.
macro_rules! field {
    ($t:ident, $f:ident) => {
        entry(concat!(stringify!($t), ".", stringify!($f)), offset_of!($t, $f) as u64)
    };
}

/// A constant by its Rust path.
macro_rules! konst {
    ($($p:ident)::+) => {
        entry(stringify!($($p)::+), $($p)::+ as u64)
    };
}

const ENTRIES: &[AbiEntry] = &[
    size!(BootInfo),
    field!(BootInfo, magic),
    field!(BootInfo, version),
    field!(BootInfo, size),
    field!(BootInfo, phys_offset),
    field!(BootInfo, ram_size),
    field!(BootInfo, memmap_phys),
    field!(BootInfo, memmap_count),
    field!(BootInfo, memmap_desc_size),
    field!(BootInfo, kernel_phys_start),
    field!(BootInfo, kernel_phys_end),
    field!(BootInfo, kernel_link_base),
    field!(BootInfo, kaslr_slide),
    field!(BootInfo, boot_pt_phys),
    field!(BootInfo, boot_pt_end),
    field!(BootInfo, fb_phys),
    field!(BootInfo, fb_width),
    field!(BootInfo, fb_height),
    field!(BootInfo, fb_stride),
    field!(BootInfo, fb_format),
    field!(BootInfo, cmdline_phys),
    field!(BootInfo, cmdline_len),
    field!(BootInfo, flags),
    field!(BootInfo, rng_seed),
    field!(BootInfo, tsc_khz),
    field!(BootInfo, backend),
    field!(BootInfo, reserved),
    size!(MemoryDescriptor),
    field!(MemoryDescriptor, typ),
    field!(MemoryDescriptor, pad),
    field!(MemoryDescriptor, physical_start),
    field!(MemoryDescriptor, virtual_start),
    field!(MemoryDescriptor, number_of_pages),
    field!(MemoryDescriptor, attribute),
    size!(ReportHeader),
    field!(ReportHeader, magic),
    field!(ReportHeader, kind),
    field!(ReportHeader, len),
    field!(ReportHeader, reserved),
    size!(StackRecord),
    field!(StackRecord, base),
    field!(StackRecord, top),
    field!(StackRecord, guard_low),
    field!(StackRecord, guard_high),
    field!(StackRecord, task_id),
    field!(StackRecord, flags),
    size!(InspectBlock),
    field!(InspectBlock, magic),
    field!(InspectBlock, version),
    field!(InspectBlock, size),
    field!(InspectBlock, seq),
    field!(InspectBlock, heap_free_head),
    field!(InspectBlock, heap_start),
    field!(InspectBlock, heap_end),
    field!(InspectBlock, heap_free_bytes),
    field!(InspectBlock, heap_large_bytes),
    field!(InspectBlock, frames_free),
    field!(InspectBlock, bitmap_phys),
    field!(InspectBlock, bitmap_bits),
    field!(InspectBlock, stack_count),
    field!(InspectBlock, current_task),
    field!(InspectBlock, demand_start),
    field!(InspectBlock, demand_end),
    field!(InspectBlock, demand_faults),
    field!(InspectBlock, heap_allocs),
    field!(InspectBlock, heap_frees),
    field!(InspectBlock, heap_cached_bytes),
    field!(InspectBlock, workload_iters),
    field!(InspectBlock, heap_index),
    field!(InspectBlock, stacks),
    konst!(BOOT_INFO_MAGIC),
    konst!(BOOT_INFO_VERSION),
    konst!(BOOT_FLAG_DIRECT_MAP_1G),
    konst!(KERNEL_PHYS_BASE),
    konst!(KERNEL_LINK_BASE),
    konst!(PHYS_OFFSET),
    konst!(EFI_MEMORY_WB),
    konst!(EFI_MEMORY_RUNTIME),
    konst!(memtype::RESERVED),
    konst!(memtype::LOADER_CODE),
    konst!(memtype::LOADER_DATA),
    konst!(memtype::BOOT_SERVICES_CODE),
    konst!(memtype::BOOT_SERVICES_DATA),
    konst!(memtype::RUNTIME_SERVICES_CODE),
    konst!(memtype::RUNTIME_SERVICES_DATA),
    konst!(memtype::CONVENTIONAL),
    konst!(memtype::UNUSABLE),
    konst!(memtype::ACPI_RECLAIM),
    konst!(memtype::ACPI_NVS),
    konst!(memtype::MMIO),
    konst!(memtype::MMIO_PORT_SPACE),
    konst!(memtype::PAL_CODE),
    konst!(memtype::PERSISTENT),
    konst!(memtype::FRAMEBUFFER),
    konst!(port::COM1_THR),
    konst!(port::COM1_LSR),
    konst!(port::EXIT),
    konst!(port::REPORT),
    konst!(port::ICOUNT_START),
    konst!(port::ICOUNT_STOP),
    konst!(port::WORK),
    konst!(port::WORK_END),
    konst!(LSR_THR_EMPTY),
    konst!(exit::SUCCESS),
    konst!(exit::TEST_FAILURE),
    konst!(exit::PANIC),
    konst!(exit::STACK_OVERFLOW),
    konst!(exit::FAULT),
    konst!(REPORT_MAGIC),
    konst!(REPORT_MAX_PAYLOAD),
    konst!(ReportKind::Ready),
    konst!(ReportKind::TestResult),
    konst!(ReportKind::Panic),
    konst!(ReportKind::Bench),
    konst!(ReportKind::Inspect),
    konst!(ReportKind::Fault),
    konst!(ReportKind::Info),
    konst!(ReportKind::TestList),
    konst!(ReportKind::Summary),
    konst!(Backend::Unknown),
    konst!(Backend::Vmx),
    konst!(Backend::Svm),
    konst!(Backend::Pvm),
    konst!(INSPECT_MAGIC),
    konst!(INSPECT_VERSION),
    konst!(INSPECT_SIZE),
    konst!(MAX_STACKS),
    konst!(STACK_IN_USE),
];

const COUNT: usize = ENTRIES.len();

/// The table (see the module comment); `#[used]` keeps it in the image
/// although no kernel code reads it.
#[used]
#[no_mangle]
pub static PYVMM_ABI: [AbiEntry; COUNT] = {
    let mut out = [entry("", 0); COUNT];
    let mut i = 0;
    while i < COUNT {
        out[i] = ENTRIES[i];
        i += 1;
    }
    out
};
