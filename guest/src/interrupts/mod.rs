//! CPU exceptions: GDT/TSS/IDT setup, the common handler, fault reports,
//! and fault-tolerant memory probes for tests.
//!
//! Policy: an exception the kernel did not ask for ends the run. It is
//! printed, sent as a FAULT report, and the guest exits with 4 (page fault
//! in a stack guard page) or 5 (anything else). The only exceptions that
//! return are those raised by the probe instructions below, which resume at
//! a fixup address (Linux's exception-table idea, with one entry per probe).

pub mod gdt;
pub mod idt;

use crate::abi::{exit, ReportKind};
use crate::arch::x86_64::read_cr2;
use crate::report::Report;
use crate::{exit_with, println};
use core::arch::global_asm;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use idt::TrapFrame;

pub const VEC_PAGE_FAULT: u64 = 14;
pub const VEC_DOUBLE_FAULT: u64 = 8;

pub fn init() {
    gdt::init();
    idt::init();
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

pub fn exception_name(vector: u64) -> &'static str {
    NAMES.get(vector as usize).copied().unwrap_or("unknown")
}

/// Page-fault error code bits (SDM Vol. 3, 4.7).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PageFaultError(pub u64);

impl PageFaultError {
    /// Bit 0: 0 = page not present, 1 = protection violation.
    pub fn protection(self) -> bool {
        self.0 & 1 != 0
    }
    /// Bit 1: the access was a write.
    pub fn write(self) -> bool {
        self.0 & 2 != 0
    }
    /// Bit 2: the access came from CPL3.
    pub fn user(self) -> bool {
        self.0 & 4 != 0
    }
    /// Bit 3: a reserved bit was set in a paging entry.
    pub fn reserved_bit(self) -> bool {
        self.0 & 8 != 0
    }
    /// Bit 4: instruction fetch.
    pub fn instruction_fetch(self) -> bool {
        self.0 & 16 != 0
    }
}

impl fmt::Display for PageFaultError {
    /// Comma-separated, e.g. `not-present,write,supervisor`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.protection() { "protection" } else { "not-present" })?;
        f.write_str(if self.instruction_fetch() {
            ",fetch"
        } else if self.write() {
            ",write"
        } else {
            ",read"
        })?;
        f.write_str(if self.user() { ",user" } else { ",supervisor" })?;
        if self.reserved_bit() {
            f.write_str(",reserved-bit")?;
        }
        if self.0 & 32 != 0 {
            f.write_str(",protection-key")?;
        }
        if self.0 & 64 != 0 {
            f.write_str(",shadow-stack")?;
        }
        Ok(())
    }
}

/// True if `addr` is in a guard page of a live kernel stack.
pub fn is_stack_guard(addr: u64) -> bool {
    crate::memory::stack::guard_owner(addr).is_some()
}

// ---------------------------------------------------------------------------
// Probes: loads/stores that report a fault instead of ending the run.

global_asm!(
    r#"
    .section .text.probe, "ax"
    .global probe_read_u64_asm
probe_read_u64_asm:
    xor edx, edx
    .global probe_read_insn
probe_read_insn:
    mov rax, [rdi]
    .global probe_read_done
probe_read_done:
    ret

    .global probe_exec_asm
probe_exec_asm:
    xor edx, edx
    call rdi
    .global probe_exec_done
probe_exec_done:
    ret

    .global probe_write_u64_asm
probe_write_u64_asm:
    xor edx, edx
    xor eax, eax
    .global probe_write_insn
probe_write_insn:
    mov [rdi], rsi
    .global probe_write_done
probe_write_done:
    ret
    .text
"#
);

/// Two-register return (RAX, RDX) of the probe routines: `faulted` = 0 or 1.
#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

extern "sysv64" {
    fn probe_read_u64_asm(addr: u64) -> ProbeResult;
    fn probe_write_u64_asm(addr: u64, value: u64) -> ProbeResult;
    fn probe_exec_asm(addr: u64) -> ProbeResult;
    static probe_exec_done: u8;
    static probe_read_insn: u8;
    static probe_read_done: u8;
    static probe_write_insn: u8;
    static probe_write_done: u8;
}

/// What a probe ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub vector: u64,
    pub error: u64,
    /// CR2 for page faults, else 0.
    pub addr: u64,
}

static LAST_FAULT_VECTOR: AtomicU64 = AtomicU64::new(0);
static LAST_FAULT_ERROR: AtomicU64 = AtomicU64::new(0);
static LAST_FAULT_ADDR: AtomicU64 = AtomicU64::new(0);
/// Address of the trap frame of the last probe fault (tests check the stack).
pub static LAST_FAULT_FRAME: AtomicU64 = AtomicU64::new(0);
/// Exceptions taken by probes so far (tests use it to see a fault happened).
pub static PROBE_FAULTS: AtomicU64 = AtomicU64::new(0);

fn last_fault() -> Fault {
    Fault {
        vector: LAST_FAULT_VECTOR.load(Ordering::Relaxed),
        error: LAST_FAULT_ERROR.load(Ordering::Relaxed),
        addr: LAST_FAULT_ADDR.load(Ordering::Relaxed),
    }
}

/// Reads a u64 at `addr`; an exception becomes `Err`.
pub fn probe_read_u64(addr: u64) -> Result<u64, Fault> {
    // SAFETY: the routine only reads `addr`; a fault is caught by the
    // fixup in `exception_dispatch`.
    let r = unsafe { probe_read_u64_asm(addr) };
    if r.faulted != 0 {
        Err(last_fault())
    } else {
        Ok(r.value)
    }
}

/// Writes a u64 at `addr`; an exception becomes `Err`.
///
/// # Safety
/// If the write succeeds it modifies memory: `addr` must not hold anything
/// the rest of the kernel relies on.
pub unsafe fn probe_write_u64(addr: u64, value: u64) -> Result<(), Fault> {
    let r = probe_write_u64_asm(addr, value);
    if r.faulted != 0 {
        Err(last_fault())
    } else {
        Ok(())
    }
}

/// Target of the execute probe in progress (0 if none).
static EXEC_PROBE_TARGET: AtomicU64 = AtomicU64::new(0);

/// Calls `addr` (which should hold a `ret`); a fault on the instruction
/// fetch becomes `Err` instead of ending the run.
///
/// # Safety
/// If the fetch succeeds, whatever code is at `addr` runs: it must be a
/// lone `ret` (0xC3) the caller put there.
pub unsafe fn probe_exec(addr: u64) -> Result<(), Fault> {
    EXEC_PROBE_TARGET.store(addr, Ordering::Relaxed);
    let r = probe_exec_asm(addr);
    EXEC_PROBE_TARGET.store(0, Ordering::Relaxed);
    if r.faulted != 0 {
        Err(last_fault())
    } else {
        Ok(())
    }
}

/// The fixup address for a faulting RIP, if it is a probe instruction.
fn fixup_for(rip: u64) -> Option<u64> {
    let read = core::ptr::addr_of!(probe_read_insn) as u64;
    let write = core::ptr::addr_of!(probe_write_insn) as u64;
    if rip == read {
        Some(core::ptr::addr_of!(probe_read_done) as u64)
    } else if rip == write {
        Some(core::ptr::addr_of!(probe_write_done) as u64)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------

/// Called by the assembly stubs with the saved state.
#[no_mangle]
extern "sysv64" fn exception_dispatch(frame: &mut TrapFrame) {
    let addr = if frame.vector == VEC_PAGE_FAULT { read_cr2() } else { 0 };
    if frame.cs & 3 == 3 {
        crate::bench::user::on_user_exception(frame.vector, frame.rip, frame.rax);
        fatal(frame, addr)
    }
    if frame.vector == VEC_PAGE_FAULT && crate::memory::demand::handle_fault(addr, frame.error) {
        return;
    }
    let exec_target = EXEC_PROBE_TARGET.load(Ordering::Relaxed);
    if exec_target != 0 && frame.rip == exec_target {
        // The fetch at the probe's target faulted: the `call` pushed the
        // return address, so resume there with the stack popped.
        LAST_FAULT_VECTOR.store(frame.vector, Ordering::Relaxed);
        LAST_FAULT_ERROR.store(frame.error, Ordering::Relaxed);
        LAST_FAULT_ADDR.store(addr, Ordering::Relaxed);
        PROBE_FAULTS.fetch_add(1, Ordering::Relaxed);
        frame.rip = core::ptr::addr_of!(probe_exec_done) as u64;
        frame.rsp += 8;
        frame.rdx = 1;
        return;
    }
    if let Some(fixup) = fixup_for(frame.rip) {
        LAST_FAULT_VECTOR.store(frame.vector, Ordering::Relaxed);
        LAST_FAULT_ERROR.store(frame.error, Ordering::Relaxed);
        LAST_FAULT_ADDR.store(addr, Ordering::Relaxed);
        LAST_FAULT_FRAME.store(frame as *const TrapFrame as u64, Ordering::Relaxed);
        PROBE_FAULTS.fetch_add(1, Ordering::Relaxed);
        frame.rip = fixup;
        frame.rdx = 1;
        return;
    }
    fatal(frame, addr)
}

fn fatal(frame: &TrapFrame, addr: u64) -> ! {
    let owner = if frame.vector == VEC_PAGE_FAULT { crate::memory::stack::guard_owner(addr) } else { None };
    let stack_overflow = owner.is_some();
    let task = owner.map_or_else(crate::task::current_id, |r| r.task_id);
    let kind = if stack_overflow {
        "stack_overflow"
    } else if frame.vector == VEC_PAGE_FAULT {
        "page_fault"
    } else {
        "exception"
    };
    let pf = PageFaultError(frame.error);
    if frame.vector == VEC_PAGE_FAULT {
        println!(
            "FAULT: {} ({}) at rip={:#x} addr={:#x} error={:#x} ({})",
            exception_name(frame.vector),
            kind,
            frame.rip,
            addr,
            frame.error,
            pf
        );
    } else {
        println!(
            "FAULT: {} at rip={:#x} error={:#x} rsp={:#x}",
            exception_name(frame.vector),
            frame.rip,
            frame.error,
            frame.rsp
        );
    }
    if let Some(mut r) = Report::emergency(ReportKind::Fault) {
        r.kv("kind", kind)
            .kv("vector", frame.vector)
            .kv("name", exception_name(frame.vector))
            .kv_hex("addr", addr)
            .kv_hex("error", frame.error)
            .kv_hex("rip", frame.rip)
            .kv_hex("rsp", frame.rsp)
            .kv_hex("rbp", frame.rbp)
            .kv("task", task)
            .kv("task_name", crate::task::name_of(task));
        if frame.vector == VEC_PAGE_FAULT {
            r.kv("error_bits", pf);
            let w = crate::memory::paging::walk_entries(addr);
            r.kv_fmt("walk", format_args!("{:#x},{:#x},{:#x},{:#x}", w[0], w[1], w[2], w[3]));
        }
        r.send();
    }
    exit_with(if stack_overflow { exit::STACK_OVERFLOW } else { exit::FAULT })
}
