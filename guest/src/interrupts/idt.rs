//! IDT for the 32 CPU exceptions, with assembly entry stubs.
//!
//! Each stub pushes a dummy error code where the CPU pushes none, then the
//! vector, and jumps to a common path that saves the 15 GPRs and calls
//! `exception_dispatch(&mut TrapFrame)`. Stubs are 16 bytes apart, so the
//! IDT is filled from one symbol without a relocated address table.

use super::gdt::{IST_DOUBLE_FAULT, IST_PAGE_FAULT, KERNEL_CS};
use crate::arch::x86_64::{lidt, DescriptorTablePointer};
use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::mem::size_of;

/// Saved state on exception entry, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub vector: u64,
    pub error: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(size_of::<TrapFrame>() == 22 * 8);

// Vectors for which the CPU pushes an error code (SDM Vol. 3, table 6-1):
// 8 #DF, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 14 #PF, 17 #AC, 21 #CP, 29 #VC, 30 #SX.
global_asm!(
    r#"
    .section .text.isr, "ax"
    .balign 16
    .global isr_stubs
isr_stubs:
    .macro isr_stub n, has_error
    .balign 16
    .if \has_error == 0
    push 0
    .endif
    push \n
    jmp isr_common
    .endm
    isr_stub 0, 0
    isr_stub 1, 0
    isr_stub 2, 0
    isr_stub 3, 0
    isr_stub 4, 0
    isr_stub 5, 0
    isr_stub 6, 0
    isr_stub 7, 0
    isr_stub 8, 1
    isr_stub 9, 0
    isr_stub 10, 1
    isr_stub 11, 1
    isr_stub 12, 1
    isr_stub 13, 1
    isr_stub 14, 1
    isr_stub 15, 0
    isr_stub 16, 0
    isr_stub 17, 1
    isr_stub 18, 0
    isr_stub 19, 0
    isr_stub 20, 0
    isr_stub 21, 1
    isr_stub 22, 0
    isr_stub 23, 0
    isr_stub 24, 0
    isr_stub 25, 0
    isr_stub 26, 0
    isr_stub 27, 0
    isr_stub 28, 0
    isr_stub 29, 1
    isr_stub 30, 1
    isr_stub 31, 0

    .balign 16
isr_common:
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rbp
    push rdi
    push rsi
    push rdx
    push rcx
    push rbx
    push rax
    mov rdi, rsp
    cld
    call exception_dispatch
    pop rax
    pop rbx
    pop rcx
    pop rdx
    pop rsi
    pop rdi
    pop rbp
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    add rsp, 16
    iretq
    .text
"#
);

extern "C" {
    static isr_stubs: u8;
}

const STUB_STRIDE: u64 = 16;

/// An interrupt gate (SDM Vol. 3, 6.14.1).
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    /// 0x8E: present, DPL0, 64-bit interrupt gate (IF cleared on entry).
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    _reserved: u32,
}

const _: () = assert!(size_of::<Gate>() == 16);

impl Gate {
    const MISSING: Gate = Gate { offset_lo: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_hi: 0, _reserved: 0 };

    fn new(handler: u64, ist: u8) -> Gate {
        Gate {
            offset_lo: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            _reserved: 0,
        }
    }
}

struct Idt(UnsafeCell<[Gate; 32]>);
// SAFETY: written once by `init`, then only read by the CPU.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([Gate::MISSING; 32]));

/// Fills and loads the IDT. Needs the kernel GDT/TSS (IST stacks).
pub fn init() {
    let base = core::ptr::addr_of!(isr_stubs) as u64;
    // SAFETY: runs once at boot, before any exception is expected.
    unsafe {
        let idt = &mut *IDT.0.get();
        for (v, gate) in idt.iter_mut().enumerate() {
            let ist = match v {
                14 => IST_PAGE_FAULT,
                8 => IST_DOUBLE_FAULT,
                _ => 0,
            };
            *gate = Gate::new(base + v as u64 * STUB_STRIDE, ist);
        }
        lidt(&DescriptorTablePointer { limit: (size_of::<[Gate; 32]>() - 1) as u16, base: idt.as_ptr() as u64 });
    }
}
