//! Exception handling tests (through the fault-tolerant probes).

use super::TestResult;
use crate::interrupts::{self, gdt, probe_read_u64, probe_write_u64, PageFaultError, VEC_PAGE_FAULT};
use crate::{check, check_eq, image};

pub fn probe_unmapped_read() -> TestResult {
    const ADDR: u64 = 0x0000_0000_dead_b000;
    let before = interrupts::PROBE_FAULTS.load(core::sync::atomic::Ordering::Relaxed);
    let f = match probe_read_u64(ADDR) {
        Ok(v) => crate::skip!("{:#x} is mapped (read {:#x})", ADDR, v),
        Err(f) => f,
    };
    check_eq!(f.vector, VEC_PAGE_FAULT);
    check_eq!(f.addr, ADDR);
    let e = PageFaultError(f.error);
    check!(!e.protection() && !e.write() && !e.user(), "error {:#x} ({})", f.error, e);
    check_eq!(interrupts::PROBE_FAULTS.load(core::sync::atomic::Ordering::Relaxed), before + 1);
    // The probe works when nothing faults.
    let here = image::sections().rodata;
    check!(probe_read_u64(here).is_ok());
    Ok(())
}

pub fn probe_readonly_write() -> TestResult {
    let ro = image::sections().rodata;
    let old = match probe_read_u64(ro) {
        Ok(v) => v,
        Err(f) => crate::skip!("rodata unreadable: {:?}", f),
    };
    // SAFETY: writes back the same value if (wrongly) writable.
    let r = unsafe { probe_write_u64(ro, old) };
    let f = match r {
        Ok(()) => crate::fail!("write to .rodata at {:#x} succeeded", ro),
        Err(f) => f,
    };
    check_eq!(f.vector, VEC_PAGE_FAULT);
    let e = PageFaultError(f.error);
    check!(e.protection() && e.write() && !e.user(), "error {:#x} ({})", f.error, e);
    Ok(())
}

pub fn probe_non_canonical() -> TestResult {
    match probe_read_u64(0x8000_0000_0000_0000) {
        Ok(_) => crate::fail!("non-canonical read succeeded"),
        Err(f) => check_eq!(f.vector, 13),
    }
    Ok(())
}

pub fn ist_configured() -> TestResult {
    let tr: u16;
    // SAFETY: STR only reads the task register.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    check_eq!(tr, gdt::TSS_SEL);
    // The last probe fault ran on the page-fault IST stack.
    let _ = probe_read_u64(0x1000_0000);
    let frame = interrupts::LAST_FAULT_FRAME.load(core::sync::atomic::Ordering::Relaxed);
    let (lo, hi) = gdt::ist_stack_range(gdt::IST_PAGE_FAULT);
    check!(lo <= frame && frame < hi, "#PF frame at {:#x}, IST1 is {:#x}..{:#x}", frame, lo, hi);
    Ok(())
}
