//! The kernel's own GDT and TSS (the host's GDT has no TSS, so no IST).
//!
//! Selectors keep the host's values for kernel code/data (docs/ABI.md:
//! 0x08/0x10), so nothing that already holds them becomes stale.

use crate::arch::x86_64::{lgdt, DescriptorTablePointer};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::mem::size_of;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;

/// IST slots (1-based in the IDT gate, index+1 here).
pub const IST_PAGE_FAULT: u8 = 1;
pub const IST_DOUBLE_FAULT: u8 = 2;
const IST_STACK_SIZE: usize = 16 * 1024;

// Segment descriptors (SDM Vol. 3, 3.4.5): limit 0xFFFFF, G=1; access byte
// 0x9A/0x92 = present, DPL0, code exec/read or data read/write; L=1 (bit 53)
// for 64-bit code, D/B=1 (bit 54) for data.
const GDT_KERNEL_CODE: u64 = 0x00AF_9A00_0000_FFFF;
const GDT_KERNEL_DATA: u64 = 0x00CF_9200_0000_FFFF;
const GDT_USER_DATA: u64 = 0x00CF_F200_0000_FFFF;
const GDT_USER_CODE: u64 = 0x00AF_FA00_0000_FFFF;

/// 64-bit TSS (SDM Vol. 3, 8.7).
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    pub rsp: [u64; 3],
    _reserved1: u64,
    /// IST1..IST7 (index 0 is IST1).
    pub ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    pub iomap_base: u16,
}

const _: () = assert!(size_of::<Tss>() == 104);

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

struct State {
    gdt: [u64; 7],
    tss: Tss,
}

struct Global(UnsafeCell<State>);
// SAFETY: written once by `init` before anything can read it.
unsafe impl Sync for Global {}

static STATE: Global = Global(UnsafeCell::new(State {
    gdt: [0; 7],
    tss: Tss { _reserved0: 0, rsp: [0; 3], _reserved1: 0, ist: [0; 7], _reserved2: 0, _reserved3: 0, iomap_base: 104 },
}));

struct Stacks(UnsafeCell<[IstStack; 3]>);
// SAFETY: only the CPU uses these, as exception stacks.
unsafe impl Sync for Stacks {}
/// IST1 (#PF), IST2 (#DF), and the RSP0 stack for exceptions from CPL3.
static IST_STACKS: Stacks =
    Stacks(UnsafeCell::new([IstStack([0; IST_STACK_SIZE]), IstStack([0; IST_STACK_SIZE]), IstStack([0; IST_STACK_SIZE])]));

/// Top (exclusive) of the IST stack for `ist` (1-based), for tests.
pub fn ist_stack_range(ist: u8) -> (u64, u64) {
    let base = IST_STACKS.0.get() as u64 + (ist as u64 - 1) * IST_STACK_SIZE as u64;
    (base, base + IST_STACK_SIZE as u64)
}

/// 16-byte system descriptor for an available 64-bit TSS (type 0x9, P=1).
fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    (low, base >> 32)
}

/// Installs the GDT, reloads every segment register and loads TR.
pub fn init() {
    // SAFETY: single CPU, runs once at boot before any exception can use
    // the TSS; the far return reloads CS with an equivalent descriptor.
    unsafe {
        let s = &mut *STATE.0.get();
        s.tss.ist[IST_PAGE_FAULT as usize - 1] = ist_stack_range(IST_PAGE_FAULT).1;
        s.tss.ist[IST_DOUBLE_FAULT as usize - 1] = ist_stack_range(IST_DOUBLE_FAULT).1;
        // Exceptions from CPL3 (the CPL3 benchmark mode) switch to RSP0.
        s.tss.rsp[0] = ist_stack_range(3).1;
        let (lo, hi) = tss_descriptor(&s.tss as *const Tss as u64, size_of::<Tss>() as u64 - 1);
        s.gdt = [0, GDT_KERNEL_CODE, GDT_KERNEL_DATA, GDT_USER_DATA, GDT_USER_CODE, lo, hi];
        let ptr = DescriptorTablePointer { limit: (size_of::<[u64; 7]>() - 1) as u16, base: s.gdt.as_ptr() as u64 };
        lgdt(&ptr);
        asm!(
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "mov fs, {ds:e}",
            "mov gs, {ds:e}",
            "ltr {tss:x}",
            cs = in(reg) KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u32,
            tss = in(reg) TSS_SEL,
            tmp = out(reg) _,
        );
    }
}
