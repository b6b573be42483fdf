//! x86-64 instruction wrappers (port I/O, CPUID, control registers).
//!
//! Every instruction here runs at CPL0 and is emulated on KVM-PVM hosts;
//! no SSE may appear (HOST.md: SSE at CPL0 kills the VM).

use core::arch::asm;

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes have no memory effects visible to Rust; the caller
    // decides which device it talks to.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`. Not `nomem`: the report port makes the host read
    // guest memory, so earlier stores must not be sunk past it.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

/// CPUID leaf/subleaf; returns (eax, ebx, ecx, edx).
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    // SAFETY: CPUID exists on every x86-64 CPU. (`__cpuid_count` became a
    // safe fn in newer Rust; older stable releases still need the block.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// CPUID.01H:ECX bit 30.
pub fn has_rdrand() -> bool {
    cpuid(1, 0).2 & (1 << 30) != 0
}

/// CPUID.80000001H:EDX bit 26.
pub fn has_1g_pages() -> bool {
    cpuid(0x8000_0000, 0).0 >= 0x8000_0001 && cpuid(0x8000_0001, 0).3 & (1 << 26) != 0
}

/// One RDRAND attempt (the CPU may transiently fail: CF=0).
pub fn rdrand64() -> Option<u64> {
    let value: u64;
    let ok: u8;
    // SAFETY: caller checked `has_rdrand`; RDRAND only writes registers.
    unsafe { asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack)) }
    if ok != 0 {
        Some(value)
    } else {
        None
    }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: RDTSC only writes EDX:EAX.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Flushes the TLB entry of one virtual address.
#[inline(always)]
pub fn invlpg(virt: u64) {
    // SAFETY: INVLPG only drops a cached translation.
    unsafe { asm!("invlpg [{}]", in(reg) virt, options(nostack, preserves_flags)) }
}

/// Disables interrupts and halts forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the CPU is always allowed at CPL0.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// The 10-byte operand of LGDT/LIDT.
#[repr(C, packed)]
pub struct DescriptorTablePointer {
    pub limit: u16,
    pub base: u64,
}

/// Loads IDTR.
///
/// # Safety
/// `ptr` must describe a valid IDT that outlives its use (or limit 0, which
/// turns every exception into a triple fault).
pub unsafe fn lidt(ptr: &DescriptorTablePointer) {
    asm!("lidt [{}]", in(reg) ptr, options(readonly, nostack, preserves_flags))
}

/// Loads GDTR.
///
/// # Safety
/// `ptr` must describe a valid GDT containing the current CS/SS selectors.
pub unsafe fn lgdt(ptr: &DescriptorTablePointer) {
    asm!("lgdt [{}]", in(reg) ptr, options(readonly, nostack, preserves_flags))
}

#[inline(always)]
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reloads CR3 with its current value (flushes non-global TLB entries).
#[inline(always)]
pub fn reload_cr3() {
    // SAFETY: writing back the active root changes no mapping.
    unsafe { asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack, preserves_flags)) }
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist (else #GP).
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    ((hi as u64) << 32) | lo as u64
}

pub const MSR_EFER: u32 = 0xC000_0080;
pub const EFER_NXE: u64 = 1 << 11;
pub const CR0_WP: u64 = 1 << 16;

/// `lfence; rdtsc; lfence`: a TSC read that does not move across the code
/// it brackets (costs ~4.5k cycles at CPL0 on KVM-PVM, ~40 at CPL3).
#[inline(always)]
pub fn rdtsc_fenced() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: LFENCE/RDTSC only order execution and write EDX:EAX.
    unsafe { asm!("lfence", "rdtsc", "lfence", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}
