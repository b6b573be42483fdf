//! Guest kernel: boots on the pyvmm ABI (docs/ABI.md), reports to the host
//! over I/O ports, runs in-guest tests and scenarios chosen on the command
//! line.
//!
//! Built for `x86_64-unknown-none` (soft-float, no SSE, no red zone): on
//! KVM-PVM hosts every CPL0 instruction is emulated and SSE at CPL0 kills the
//! VM.

#![no_std]
#![no_main]
// Warnings are errors: an unused function or a dubious cast fails the build, not a reviewer.
#![deny(warnings)]

extern crate alloc;

pub mod abi;
pub mod abi_table;
pub mod arch;
pub mod bench;
pub mod boot;
pub mod cmdline;
pub mod framebuffer;
pub mod image;
pub mod inspect;
pub mod interrupts;
pub mod ktest;
pub mod memory;
pub mod rand;
pub mod report;
pub mod serial;
pub mod sync;
pub mod task;
pub mod workload;
pub mod zygote;

use abi::{exit, memtype, port, Backend, BootInfo, ReportKind};
use arch::x86_64 as cpu;
use cmdline::Cmdline;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use report::Report;

/// Kernel entry. The host enters here in long mode with RDI = direct-map
/// address of the `BootInfo` and RSP on the 64 KiB boot stack (docs/ABI.md,
/// "Entry state"). Interrupts are off and IDTR has limit 0.
#[no_mangle]
pub extern "sysv64" fn _start(boot_info: &'static BootInfo) -> ! {
    serial::Serial::init();
    if let Err(e) = boot::validate(boot_info) {
        // Without a valid BootInfo the physical load address is unknown, so
        // reports (which carry physical addresses) are not sent.
        println!("kernel: invalid BootInfo: {:?}", e);
        exit_with(exit::FAULT);
    }
    image::init(boot_info.kernel_phys_start);
    let cmdline = match boot::cmdline(boot_info) {
        Ok(c) => c,
        Err(e) => {
            println!("kernel: bad command line ({:?}), ignoring it", e);
            Cmdline::EMPTY
        }
    };

    print_banner(boot_info, cmdline);
    if cmdline.get("fb") == Some("1") {
        framebuffer::draw_memory_map(boot_info);
    }
    let trace = cmdline.get("trace") == Some("1");
    let mut phases = BootPhases::start(trace);
    ALLOCATOR_WORD.store(
        match cmdline.get("allocator") {
            Some("list") => 1,
            Some("tlsf") | Some("fast") => 2,
            Some(other) => {
                println!("kernel: unknown allocator={:?}, using tlsf", other);
                0
            }
            None => 0,
        },
        Ordering::Relaxed,
    );
    interrupts::init();
    phases.mark("interrupts");
    rand::init(boot_info.rng_seed, cmdline.get("rng") == Some("seed"));
    phases.mark("rand");
    init_memory(boot_info, &mut phases);

    // Continue as task 0 on a 64 KiB kernel stack at a random address with
    // guard pages below and above (the boot stack has page tables right
    // under it).
    let top = task::init_boot_task().unwrap_or_else(|e| panic!("kernel stack: {:?}", e));
    phases.mark("boot task stack");
    phases.print();
    BOOT.store(boot_info as *const BootInfo as u64, Ordering::Relaxed);
    let cmdline_copy = CmdlineCell(cmdline);
    // SAFETY: the stack was just mapped and nothing else uses it.
    unsafe { memory::stack::switch_to(top, kernel_main, &cmdline_copy as *const CmdlineCell as u64) }
}

/// `allocator=tlsf|list` from the command line: the heap's backing
/// allocator (`fast`, the old name of the default, means `tlsf`).
static ALLOCATOR_WORD: AtomicU64 = AtomicU64::new(0);

fn cmdline_backing() -> memory::heap::Backing {
    match ALLOCATOR_WORD.load(Ordering::Relaxed) {
        1 => memory::heap::Backing::List,
        _ => memory::heap::Backing::Tlsf,
    }
}

static BOOT: AtomicU64 = AtomicU64::new(0);

struct CmdlineCell(Cmdline);

/// The validated BootInfo (after `_start` has run).
pub fn boot_info() -> &'static BootInfo {
    // SAFETY: set in `_start` to the host's BootInfo, which is never freed.
    unsafe { &*(BOOT.load(Ordering::Relaxed) as *const BootInfo) }
}

/// `trace=1`: TSC cycles per boot phase, printed once the phases are done.
/// Boot time matters (test suites boot thousands of guests, and CPL0 code is
/// emulated on PVM hosts); this says where it goes.
struct BootPhases {
    on: bool,
    last: u64,
    names: [&'static str; 12],
    cycles: [u64; 12],
    n: usize,
}

impl BootPhases {
    fn start(on: bool) -> Self {
        BootPhases { on, last: if on { cpu::rdtsc() } else { 0 }, names: [""; 12], cycles: [0; 12], n: 0 }
    }

    fn mark(&mut self, name: &'static str) {
        if self.on && self.n < self.names.len() {
            let now = cpu::rdtsc();
            self.names[self.n] = name;
            self.cycles[self.n] = now - self.last;
            self.n += 1;
            self.last = now;
        }
    }

    fn print(&self) {
        if self.on {
            print!("kernel: boot phases (cycles):");
            for i in 0..self.n {
                print!(" {} {}", self.names[i], self.cycles[i]);
            }
            println!();
        }
    }
}

fn init_memory(bi: &'static BootInfo, phases: &mut BootPhases) {
    memory::set_phys_offset(bi.phys_offset);
    let reserved = [(bi.kernel_phys_start, bi.kernel_phys_end), (bi.boot_pt_phys, bi.boot_pt_end)];
    match memory::frames::FrameAllocator::new(boot::memory_map(bi), bi.ram_size, &reserved) {
        Ok(fa) => memory::frames::init(fa),
        Err(e) => panic!("frame allocator: {:?}", e),
    }
    phases.mark("frame bitmap");
    if let Err(e) = memory::heap::init(cmdline_backing()) {
        panic!("heap: {:?}", e);
    }
    phases.mark("heap");
    memory::demand::init();
    phases.mark("demand region");
}

/// Runs on the guarded kernel stack. `arg` points at the command line,
/// which lives on the boot stack and is copied before anything else.
extern "sysv64" fn kernel_main(arg: u64) -> ! {
    // SAFETY: `_start` passed a pointer to a live CmdlineCell on the boot
    // stack, which is never reused.
    let cmdline = unsafe { (*(arg as *const CmdlineCell)).0 };
    let boot_info = boot_info();
    let rdrand = cpu::has_rdrand();
    let t_check = cpu::rdtsc();
    let (wx_ok, audit, wp, nxe) = memory::audit::self_check();
    if cmdline.get("trace") == Some("1") {
        println!("kernel: boot phases (cycles): W^X self-check {}", cpu::rdtsc() - t_check);
    }
    println!(
        "kernel: W^X self-check {}: {} leaves, {} W+X, {} user, CR0.WP={} EFER.NXE={}",
        if wx_ok { "ok" } else { "FAILED" },
        audit.leaves,
        audit.wx,
        audit.user,
        wp as u8,
        nxe as u8
    );
    report::send(ReportKind::Info, |r| {
        r.kv_hex("kaslr_slide", boot_info.kaslr_slide)
            .kv("rdrand", rdrand as u8)
            .kv("entropy", rand::source().name())
            .kv("wx_ok", wx_ok as u8)
            .kv("wx_leaves", audit.leaves)
            .kv("wx_violations", audit.wx)
            .kv("user_leaves", audit.user)
            .kv("cr0_wp", wp as u8)
            .kv("efer_nxe", nxe as u8)
            .kv_hex("stack_base", task::stack_of(0).map_or(0, |s| s.base))
            .kv_hex("heap_start", memory::heap::stats().start)
            .kv_hex("kernel_virt", image::virt_start())
            .kv_hex("kernel_phys", image::phys_start())
            .kv("backend", Backend::from_raw(boot_info.backend).name())
            .kv("tsc_khz", boot_info.tsc_khz)
            .kv("ram_size", boot_info.ram_size)
            .kv("free_frames", memory::frames::free_count());
    });
    send_inspect();

    println!("kernel: READY");
    report::send(ReportKind::Ready, |_| {});
    // A zygote waits here for the host to say what to run (see zygote.rs).
    let cmdline = if cmdline.get("zygote") == Some("1") { zygote::wait_for_work(cmdline) } else { cmdline };

    // Scenarios act after READY (and after a zygote's wait for work): they
    // are work like `tests=`, so a test VM forked from a zygote runs them
    // too, and a cold boot and a fork stop in the same place.
    match cmdline.get("scenario") {
        Some("panic") => panic!("scenario panic"),
        Some("triplefault") => scenario_triple_fault(),
        Some("loop") => loop {
            core::hint::spin_loop();
        },
        Some("hlt") => cpu::halt_forever(),
        Some("pagefault") => scenario_page_fault(),
        Some("stackoverflow") => scenario_stack_overflow(),
        Some(other) if !other.is_empty() => println!("kernel: unknown scenario '{}', ignored", other),
        _ => {}
    }

    if let Some(words) = cmdline.get("bench") {
        bench::run(words);
    }
    match cmdline.get("workload") {
        Some("mm") => workload::run(
            cmdline.get("workload_ms").and_then(|v| v.parse().ok()),
            cmdline.get("workload_iters").and_then(|v| v.parse().ok()),
        ),
        Some("compute") => workload::compute(
            cmdline.get("workload_ms").and_then(|v| v.parse().ok()),
            cmdline.get("frag_blocks").and_then(|v| v.parse().ok()).unwrap_or(0),
        ),
        Some("touch") => workload::touch(
            cmdline.get("touch_pages").and_then(|v| v.parse().ok()).unwrap_or(1),
            cmdline.get("touch_stride").and_then(|v| v.parse().ok()).unwrap_or(1),
        ),
        Some(other) => println!("kernel: unknown workload '{}', ignored", other),
        None => {}
    }

    let (mut tests, mut failures) = (0u32, 0u32);
    if let Some(selection) = cmdline.get("tests") {
        if selection.split(',').any(|w| w == "list") {
            ktest::send_list();
        }
        (tests, failures) = ktest::run(selection);
    }
    report::send(ReportKind::Summary, |r| {
        r.kv("tests", tests).kv("failures", failures);
    });
    println!("SUMMARY: {} tests, {} failures", tests, failures);
    exit_with(if failures == 0 { exit::SUCCESS } else { exit::TEST_FAILURE })
}

/// Addresses the host needs to inspect the allocators (INSPECT report).
pub fn send_inspect() {
    let (bitmap_phys, bitmap_frames, frames, free) =
        memory::frames::with(|fa| (fa.bitmap().0, fa.bitmap().1, fa.frames(), fa.free_count()));
    let heap = memory::heap::stats();
    report::send(ReportKind::Inspect, |r| {
        r.kv_hex("bitmap_phys", bitmap_phys)
            .kv("bitmap_frames", bitmap_frames)
            .kv("bitmap_bits", frames)
            .kv("bitmap_layout", "used_then_managed")
            .kv("free_frames", free)
            .kv_hex("heap_start", heap.start)
            .kv_hex("heap_end", heap.end)
            .kv_hex("heap_free_head", heap.free_head)
            .kv("heap_allocator", memory::heap::backing().name())
            .kv_hex("heap_index", memory::heap::index_addr())
            .kv_hex("demand_start", memory::layout::DEMAND_START)
            .kv_hex("demand_size", memory::layout::DEMAND_SIZE)
            .kv_hex("scratch_start", memory::layout::SCRATCH_START)
            .kv_hex("scratch_size", memory::layout::SCRATCH_SIZE)
            .kv_hex("cpl3_ram_alias", bench::user::RAM_ALIAS)
            .kv_hex("cpl3_stack_start", bench::user::USER_STACK)
            .kv_hex("cpl3_stack_size", bench::user::USER_STACK_PAGES * memory::PAGE_SIZE)
            .kv_hex("stacks", memory::layout::STACKS_START)
            .kv_hex("stack_slot", memory::layout::STACK_SLOT)
            .kv("stack_slots", memory::layout::STACK_SLOTS)
            .kv_hex("stack_size", memory::stack::STACK_SIZE)
            .kv_hex("cr3", cpu::read_cr3())
            .kv_hex("inspect_block_virt", inspect::virt())
            .kv_hex("inspect_block_phys", inspect::phys())
            .kv("inspect_block_size", inspect::INSPECT_SIZE)
            .kv_hex("quiet_hook", inspect::quiet_hook())
            .kv_hex("kernel_phys_start", boot_info().kernel_phys_start)
            .kv_hex("kernel_phys_end", boot_info().kernel_phys_end);
    });
}

fn print_banner(bi: &'static BootInfo, cmdline: Cmdline) {
    println!("kernel: pyvmm guest kernel {}", env!("CARGO_PKG_VERSION"));
    println!(
        "kernel: image virt {:#x}..{:#x} phys {:#x}..{:#x} slide {:#x}",
        image::virt_start(),
        image::virt_end(),
        bi.kernel_phys_start,
        bi.kernel_phys_end,
        bi.kaslr_slide
    );
    println!(
        "kernel: ram {} MiB, backend {}, tsc {} kHz, cmdline '{}'",
        bi.ram_size >> 20,
        Backend::from_raw(bi.backend).name(),
        bi.tsc_khz,
        cmdline.as_str()
    );

    // Pages per descriptor type, in order of first appearance.
    const MAX_TYPES: usize = 16;
    let mut types = [(0u32, 0u64, 0u32); MAX_TYPES];
    let mut n = 0;
    for d in boot::memory_map(bi) {
        match types[..n].iter_mut().find(|t| t.0 == d.typ) {
            Some(t) => {
                t.1 += d.number_of_pages;
                t.2 += 1;
            }
            None if n < MAX_TYPES => {
                types[n] = (d.typ, d.number_of_pages, 1);
                n += 1;
            }
            None => {}
        }
    }
    // One line: every console byte is a port exit (~12 us on PVM hosts).
    print!("kernel: memory map, {} descriptors:", bi.memmap_count);
    for &(typ, pages, count) in &types[..n] {
        print!(" {} {} KiB/{}", memtype::name(typ), pages * 4, count);
    }
    println!();
}

/// Loads an IDT with limit 0 and raises #UD: the CPU cannot deliver the
/// exception, then not the #DF, so KVM reports SHUTDOWN.
fn scenario_triple_fault() -> ! {
    println!("kernel: scenario triplefault");
    let idtr = cpu::DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: deliberately breaks exception delivery; the VM ends here.
    unsafe {
        cpu::lidt(&idtr);
        core::arch::asm!("ud2", options(noreturn));
    }
}

/// A task recurses until its stack's low guard page is hit (exit 4).
fn scenario_stack_overflow() -> ! {
    println!("kernel: scenario stackoverflow");
    #[inline(never)]
    #[allow(unconditional_recursion)]
    fn recurse(depth: u64) -> u64 {
        let mut pad = [0u8; 256];
        pad[0] = depth as u8;
        core::hint::black_box(&mut pad);
        recurse(depth + 1) + pad[0] as u64
    }
    extern "sysv64" fn overflow(_: u64) {
        let n = recurse(0);
        panic!("recursion returned {}", n);
    }
    let id = task::spawn("overflow", overflow, 0).unwrap_or_else(|e| panic!("spawn: {:?}", e));
    println!("kernel: task {} recursing on stack {:#x}..{:#x}", id, task::stack_of(id).unwrap().base, task::stack_of(id).unwrap().top);
    task::join(id);
    panic!("overflow task finished");
}

/// Reads an address in the unmapped user half.
fn scenario_page_fault() -> ! {
    println!("kernel: scenario pagefault");
    const UNMAPPED: u64 = 0x0000_0000_dead_b000;
    // SAFETY: deliberately faults; nothing after it runs unless a handler
    // resumes, which the page-fault handler never does for this address.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    panic!("read of unmapped {:#x} returned {:#x}", UNMAPPED, v);
}

/// Ends the run with `code` (exit device), never returns.
pub fn exit_with(code: u32) -> ! {
    cpu::outl(port::EXIT, code);
    cpu::halt_forever()
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        // A panic while panicking: report nothing more, just stop.
        serial::Serial::write_bytes(b"PANIC (nested)\n");
        exit_with(exit::PANIC);
    }
    let (file, line, col) = info.location().map_or(("?", 0, 0), |l| (l.file(), l.line(), l.column()));
    println!("PANIC at {}:{}:{}: {}", file, line, col, info.message());
    if let Some(mut r) = Report::emergency(ReportKind::Panic) {
        r.kv("msg", info.message()).kv("file", file).kv("line", line).kv("col", col);
        r.send();
    }
    exit_with(exit::PANIC)
}
