//! Running kernel code at CPL3 (the CPL3 benchmark mode).
//!
//! On KVM-PVM, CPL0 code is emulated (~270 ns per instruction) but CPL3
//! code runs natively, so hot paths without privileged instructions are
//! measured in ring 3. `run(f)`:
//!
//! 1. maps a 64 KiB user stack (U W NX) in the user half;
//! 2. makes the kernel image, the mapped heap and the current task's stack
//!    user-accessible (U/S on the leaves and the table entries above them:
//!    permissions are otherwise unchanged, so W^X holds); maps a
//!    user-accessible alias of all RAM (2 MiB pages, W NX) at `RAM_ALIAS`
//!    and points `phys_to_virt` and the frame bitmaps at it, because on
//!    KVM-PVM native CPL3 code cannot use the direct map's range
//!    (0xFFFF_8000_0000_0000: not-present / reserved-bit faults from CPL3
//!    although CPL0 sees it mapped), while the heap, stack and image
//!    ranges work; then reloads CR3;
//! 3. enters ring 3 with IRETQ (user code/data selectors of the kernel GDT,
//!    IF=0) at a trampoline that calls `f` and executes `ud2`;
//! 4. the #UD handler (entered on TSS.RSP0) sees the `ud2` at the known
//!    address from CPL3 and resumes the kernel where `run` entered ring 3
//!    (saved callee-saved registers and RSP), with `f`'s result in RAX;
//! 5. clears every U/S bit it set, unmaps the user stack, reloads CR3.
//!
//! SYSCALL is not used (it does not leave CPL3 on KVM-PVM). Any other
//! exception from CPL3 ends the run like a kernel fault. After a run, the
//! W^X / no-user-page audit must be clean: `audit_after` reports it.

use crate::arch::x86_64::{read_cr3, reload_cr3};
use crate::interrupts::gdt::{USER_CS, USER_DS};
use crate::memory::audit;
use crate::memory::paging::{self, PageFlags, PageSize};
use crate::memory::{frames, heap, PAGE_SIZE, SIZE_2M};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// User-accessible alias of guest RAM during a CPL3 run (the INSPECT
/// report names it: like the direct map it maps free frames too).
pub const RAM_ALIAS: u64 = 0xFFFF_E000_0000_0000;

/// User stack (user half, below the canonical hole; in the INSPECT report).
pub const USER_STACK: u64 = 0x0000_0000_4000_0000;
pub const USER_STACK_PAGES: u64 = 16;

/// Kernel RSP saved by `user_enter`, restored by `user_resume`.
#[no_mangle]
static USER_KERNEL_RSP: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .section .text.user, "ax"
    .global user_enter
user_enter:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    mov [rip + USER_KERNEL_RSP], rsp
    push {uds}
    push rsi
    push 0x2
    push {ucs}
    lea rax, [rip + user_trampoline]
    push rax
    iretq

user_trampoline:
    call user_job_entry
    .global user_exit_ud2
user_exit_ud2:
    ud2

    .global user_resume
user_resume:
    mov eax, {kds}
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov rsp, [rip + USER_KERNEL_RSP]
    mov rax, rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    .text
"#,
    uds = const USER_DS as u64,
    ucs = const USER_CS as u64,
    kds = const crate::interrupts::gdt::KERNEL_DS as u32,
);

extern "sysv64" {
    /// Enters ring 3 at the trampoline with RDI = `arg`, RSP = `user_rsp`;
    /// returns the value the job passed back through `ud2`.
    fn user_enter(arg: u64, user_rsp: u64) -> u64;
    static user_exit_ud2: u8;
    fn user_resume(value: u64) -> !;
}

type Job<'a> = &'a mut dyn FnMut() -> u64;

/// Ring-3 entry: runs the job the pointer designates.
#[no_mangle]
extern "sysv64" fn user_job_entry(arg: u64) -> u64 {
    // SAFETY: `run` passed a pointer to a live `Job` on its (user-accessible
    // for now) stack.
    let job = unsafe { &mut *(arg as *mut Job) };
    job()
}

/// Called by the exception dispatcher for exceptions from CPL3. Returns
/// (never) into `run` if this is the job's `ud2`; otherwise false.
pub fn on_user_exception(vector: u64, rip: u64, rax: u64) -> bool {
    if vector == 6 && rip == core::ptr::addr_of!(user_exit_ud2) as u64 {
        // SAFETY: `user_enter` saved the kernel context this resumes.
        unsafe { user_resume(rax) }
    }
    false
}

/// Ranges made user-accessible for a run: (start, end).
fn ranges() -> [(u64, u64); 3] {
    let h = heap::stats_raw();
    let task = crate::task::stack_of(crate::task::current_id()).expect("current task stack");
    [(crate::image::virt_start(), crate::image::virt_end()), (h.start, h.end), (task.base, task.top)]
}

/// Maps (or unmaps) the RAM alias: 2 MiB pages, 4 KiB for a tail.
fn alias(map: bool) {
    let ram = crate::boot_info().ram_size;
    let flags = PageFlags::USER | PageFlags::WRITABLE | PageFlags::NO_EXECUTE;
    let mut p = 0;
    while p < ram {
        let size = if p % SIZE_2M == 0 && p + SIZE_2M <= ram { PageSize::Size2M } else { PageSize::Size4K };
        if map {
            paging::map_page(RAM_ALIAS + p, p, size, flags).expect("map RAM alias");
        } else {
            paging::unmap_page(RAM_ALIAS + p).expect("unmap RAM alias");
        }
        p += size.bytes();
    }
}

fn switch_direct_map(from: u64, to: u64) {
    frames::with(|fa| fa.rebase(from, to));
    crate::memory::set_phys_offset(to);
}

static RUNS: AtomicU64 = AtomicU64::new(0);

/// Runs `f` at CPL3 (see the module comment); returns its result.
pub fn run(f: &mut dyn FnMut() -> u64) -> u64 {
    let flags = PageFlags::USER | PageFlags::WRITABLE | PageFlags::NO_EXECUTE;
    let mut frames_used = [0u64; USER_STACK_PAGES as usize];
    for (i, fr) in frames_used.iter_mut().enumerate() {
        *fr = frames::alloc_frame().expect("user stack frame");
        paging::map_page(USER_STACK + i as u64 * PAGE_SIZE, *fr, PageSize::Size4K, flags).expect("map user stack");
    }
    let r = ranges();
    for &(s, e) in &r {
        paging::set_user_range(s, e, true);
    }
    alias(true);
    let direct = crate::memory::phys_offset();
    switch_direct_map(direct, RAM_ALIAS);
    reload_cr3();
    let mut job: Job = f;
    // SAFETY: the stack and the code/data the job touches are mapped for
    // CPL3 now; `user_enter` returns through `user_resume`.
    let v = unsafe { user_enter(&mut job as *mut Job as u64, USER_STACK + USER_STACK_PAGES * PAGE_SIZE) };
    switch_direct_map(RAM_ALIAS, direct);
    alias(false);
    for &(s, e) in &r {
        paging::set_user_range(s, e, false);
    }
    for (i, fr) in frames_used.iter().enumerate() {
        paging::unmap_page(USER_STACK + i as u64 * PAGE_SIZE).expect("unmap user stack");
        frames::free_frame(*fr).expect("free user stack frame");
    }
    reload_cr3();
    RUNS.fetch_add(1, Ordering::Relaxed);
    v
}

/// Ring-3 runs so far.
pub fn runs() -> u64 {
    RUNS.load(Ordering::Relaxed)
}

/// The audit after the CPL3 runs: (clean, audit).
pub fn audit_after() -> (bool, audit::Audit) {
    let a = audit::audit(read_cr3());
    (a.clean() && a.user_entries == 0, a)
}
