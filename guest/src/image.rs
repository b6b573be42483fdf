//! Where the kernel image is, virtually and physically.
//!
//! The host loads the PT_LOAD segments contiguously from
//! `BootInfo::kernel_phys_start` and maps them at link address + KASLR slide,
//! so `phys = kernel_phys_start + (virt - runtime address of __kernel_start)`.

use crate::abi::KERNEL_PHYS_BASE;
use core::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __data_start: u8;
    static __bss_start: u8;
    static __bss_end: u8;
}

static PHYS_START: AtomicU64 = AtomicU64::new(KERNEL_PHYS_BASE);

/// Records the physical load address (from a validated `BootInfo`).
pub fn init(kernel_phys_start: u64) {
    PHYS_START.store(kernel_phys_start, Ordering::Relaxed);
}

macro_rules! sym_addr {
    ($s:ident) => {
        // Only the address of the linker-script symbol is taken, never its value.
        core::ptr::addr_of!($s) as u64
    };
}

/// Runtime (slid) virtual address of the first byte of the image.
pub fn virt_start() -> u64 {
    sym_addr!(__kernel_start)
}

/// Runtime virtual end of the image (page aligned, exclusive).
pub fn virt_end() -> u64 {
    sym_addr!(__kernel_end)
}

pub fn phys_start() -> u64 {
    PHYS_START.load(Ordering::Relaxed)
}

/// Physical address of a byte inside the kernel image.
pub fn virt_to_phys(virt: u64) -> u64 {
    debug_assert!(virt >= virt_start() && virt < virt_end());
    phys_start() + (virt - virt_start())
}

/// Physical address of a static inside the kernel image.
pub fn phys_of<T: ?Sized>(r: &T) -> u64 {
    virt_to_phys(r as *const T as *const u8 as u64)
}

/// Section boundaries (runtime virtual addresses), for the banner and tests.
pub struct Sections {
    pub text: (u64, u64),
    pub rodata: u64,
    pub data: u64,
    pub bss: (u64, u64),
}

pub fn sections() -> Sections {
    Sections {
        text: (sym_addr!(__text_start), sym_addr!(__text_end)),
        rodata: sym_addr!(__rodata_start),
        data: sym_addr!(__data_start),
        bss: (sym_addr!(__bss_start), sym_addr!(__bss_end)),
    }
}
