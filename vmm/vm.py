"""A booted guest: KVM objects, guest RAM, devices and the run loop.

``Vm`` owns everything for one guest and closes it deterministically.
``Vm.run()`` drives KVM_RUN until the guest stops and returns a
``RunResult``. Every exit comes back from ``VcpuFd.run`` decoded
(``vmm.exits``) and goes to ``handle_exit`` (``vmm.exit_handling``), a free
function tests feed synthetic exits; the run loop keeps only the pause
protocol and the order of buffered serial output.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import exits as X
from .abi import (
    COM1_BASE,
    COM1_SIZE,
    EXIT_PORT,
    EXIT_PORT_SIZE,
    ICOUNT_PORT,
    ICOUNT_PORT_SIZE,
    REPORT_PORT,
    REPORT_PORT_SIZE,
    WORK_MAILBOX_SIZE,
    WORK_PORT,
    WORK_PORT_SIZE,
    ExitCode,
)
from .abi import Backend, BootInfo, ReportKind
from .layout import BOOT_INFO_PHYS
from .backend import BackendInfo, detect_backend
from .boot import BootLayout, choose_slide, memory_map_bytes, prepare_guest
from .cpu import CpuFeatures, cpu_features, cpuid_leaves, entry_regs, long_mode_sregs
from .diagnostics import QUIET_STOPS, diagnose, guest_reader
from .registers import capture, format_registers
from .devices import ExitDevice, InstructionCounter, PortBus, ReportDevice, Stop, Uart16550, WorkMailbox
from .elf import KernelImage, Symbolizer
from .exit_handling import PARK, ExitPolicy, handle_exit
from .kvm import Kvm, KvmError
from . import kvm_abi as K
from .kvm_abi import KVM_CAP_READONLY_MEM, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from .memory import GuestMemory
from .reports import Report
from .watchdog import Watchdog

STOP_SIGNAL = signal.SIGUSR1
# COM1's registers other than THR (the exit storm's scratch): writes to them
# need no ordering against serial output buffered in the coalesced ring.
_UNORDERED_PORTS = frozenset(range(COM1_BASE, COM1_BASE + COM1_SIZE)) - {COM1_BASE + Uart16550.THR}


def _install_stop_signal() -> None:
    """KVM_RUN only returns EINTR for a signal that has a handler."""
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(STOP_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(STOP_SIGNAL, lambda *_: None)


_CPUID_CACHE = None


def _supported_cpuid(kvm: Kvm):
    """KVM_GET_SUPPORTED_CPUID does not change while the process runs: ask once."""
    global _CPUID_CACHE
    if _CPUID_CACHE is None:
        _CPUID_CACHE = kvm.get_supported_cpuid()
    return _CPUID_CACHE


@dataclass
class RunResult:
    exit_code: int
    stop_reason: str
    message: str
    backend: str
    memory_bytes: int
    kaslr_slide: int
    serial: bytes
    reports: list[Report]
    report_errors: list[str]
    timings_ms: dict[str, float]
    exits: int
    registers: dict[str, int] | None = None
    rip_symbol: str | None = None
    fault_rip_symbol: str | None = None
    instruction_counts: dict[int, int] = field(default_factory=dict)
    # Disassembly around the faulting RIP and a backtrace (vmm.diagnostics):
    # for an abnormal stop, from the vCPU; for a guest FAULT report, from it.
    diagnosis: object | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def reports_of(self, kind: ReportKind) -> list[Report]:
        return [r for r in self.reports if r.kind == kind]

    @property
    def fault(self) -> dict | None:
        """The guest's own FAULT report (the last one), its RIP symbolized."""
        faults = self.reports_of(ReportKind.FAULT)
        if not faults:
            return None
        out = dict(faults[-1].fields)
        if self.fault_rip_symbol:
            out["rip_symbol"] = self.fault_rip_symbol
        return out

    def to_json(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "stop_reason": self.stop_reason,
            "message": self.message,
            "backend": self.backend,
            "memory_bytes": self.memory_bytes,
            "kaslr_slide": self.kaslr_slide,
            "timings_ms": {k: round(v, 4) for k, v in self.timings_ms.items()},
            "exits": self.exits,
            "serial_bytes": len(self.serial),
            "reports": [r.to_json() for r in self.reports],
            "report_errors": self.report_errors,
            "registers": self.registers,
            "rip_symbol": self.rip_symbol,
            "fault": self.fault,
            "instruction_counts": {str(k): v for k, v in self.instruction_counts.items()},
            "diagnosis": self.diagnosis.to_json() if self.diagnosis is not None else None,
        }


@dataclass
class VmConfig:
    memory: int
    cmdline: str = ""
    slide: int | None = None
    timeout: float | None = None
    use_1g: bool | None = None
    shared_memory: bool = True
    # Back the kernel's read-only segments (.text, .rodata) with a
    # KVM_MEM_READONLY slot: second-stage protection the guest cannot lift.
    protect_kernel: bool = True
    dirty_log: bool = False
    # Buffer serial output (COM1's THR) in KVM's coalesced-I/O ring instead of
    # one exit per byte, where the host has KVM_CAP_COALESCED_PIO.
    coalesce_serial: bool = True


def direct_map_1g(features: CpuFeatures, backend: Backend) -> bool:
    """Whether the boot direct map may use 1 GiB pages: only if the vCPU's
    CPUID offers them (Page1GB), and never on KVM-PVM, where a 1 GiB leaf
    faults with reserved bits set even with that bit set (shared/HOST.md)."""
    return features.gbpages and backend != Backend.PVM


def protected_ranges(image: KernelImage) -> list[tuple[int, int]]:
    """Physical page ranges of the non-writable segments, adjacent ones merged."""
    spans = sorted(
        (s.paddr & ~0xFFF, (s.paddr + s.memsz + 0xFFF) & ~0xFFF) for s in image.segments if not s.writable
    )
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def memory_slots(ram_size: int, protected: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """(guest-physical start, size, read-only) slots covering [0, ram_size)."""
    slots, pos = [], 0
    for a, b in protected:
        if pos < a:
            slots.append((pos, a - pos, False))
        slots.append((a, b - a, True))
        pos = b
    if pos < ram_size:
        slots.append((pos, ram_size - pos, False))
    return slots


class Vm:
    """One guest: /dev/kvm, the VM, one vCPU, RAM, and its devices."""

    def __init__(
        self,
        image: KernelImage,
        config: VmConfig,
        *,
        console: Callable[[bytes], None] | None = None,
        on_report: Callable[[Report], Stop | None] | None = None,
        backend: BackendInfo | None = None,
        restore=None,
    ):
        """``restore`` (a ``vmm.snapshot.machine.RestoreSource``) starts the
        guest from saved RAM and vCPU state instead of booting it."""
        self.image = image
        self.config = config
        self.backend = backend or detect_backend()
        self.timings_ms: dict[str, float] = {}
        self._on_report = on_report
        self.kvm = self.vm = self.vcpu = self.memory = None
        self._stop_request: Stop | None = None
        self._pause_requested = False
        self._paused = threading.Event()
        self._resume = threading.Event()
        # What handle_exit decides with: filled in as the parts exist.
        self.exit_policy = ExitPolicy()
        self.parked_ns = 0  # perf_counter_ns() of the vCPU's last park (run_to's held time starts there)
        self._unparked = threading.Event()
        self.running = False
        self._vcpu_thread: int | None = None
        _install_stop_signal()  # here too: run() may be called from another thread
        self.restored_from = restore
        # What the guest reported about its layout before the snapshot (INSPECT fields).
        self.inherited_inspect = dict(getattr(restore, "inspect_fields", None) or {})
        self._memmap = None
        self.debugger = None
        self.watchdog = None
        t = time.perf_counter_ns
        t0 = t()
        try:
            # /dev/kvm and the CPUID the vCPU will get come first: the boot
            # tables' page sizes depend on what that CPUID offers.
            self.kvm = Kvm()
            t_open = t()
            cpuid = _supported_cpuid(self.kvm)
            self.cpu_features = cpu_features(cpuid_leaves(cpuid))
            t_cpuid = t()
            # Guest RAM is prepared before the VM exists: once KVM_CREATE_VM
            # has attached KVM's MMU notifier to this process, every first
            # touch of a fresh page costs noticeably more.
            if restore is None:
                self.memory = GuestMemory(config.memory, shared=config.shared_memory)
            else:
                self.memory = restore.make_memory(config)
            t1 = t()
            if restore is None:
                self._write_boot_state(image, config)
            else:
                self.slide = restore.slide
                self.layout = None
            t2 = t()
            self.vm = self.kvm.create_vm()
            t3 = t()
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(cpuid)
            try:
                tsc_khz = self.vcpu.get_tsc_khz()
            except KvmError:
                tsc_khz = 0
            if restore is None:
                self.memory.write_u64(BOOT_INFO_PHYS + BootInfo.tsc_khz.offset, tsc_khz)
            t4 = t()
            self.protected = protected_ranges(image) if config.protect_kernel else []
            if self.protected and not self.vm.check_extension(KVM_CAP_READONLY_MEM):
                self.protected = []
            self.slots = memory_slots(self.memory.size, self.protected)
            log = KVM_MEM_LOG_DIRTY_PAGES if config.dirty_log else 0
            for slot, (gpa, size, readonly) in enumerate(self.slots):
                self.vm.set_user_memory_region(
                    slot, gpa, size, self.memory.host_address + gpa, log | (KVM_MEM_READONLY if readonly else 0)
                )
            t4b = t()
            if restore is None:
                sregs = long_mode_sregs(self.vcpu.get_sregs(), self.layout.cr3, self.layout.gdt_base)
                self.vcpu.set_sregs(sregs)
                self.vcpu.set_regs(entry_regs(self.layout.entry, self.layout.stack_top, self.layout.boot_info_virt))
            else:
                restore.load_vcpu(self.vcpu)
            self._ring = self._coalesce_serial() if config.coalesce_serial else None
            t5 = t()
        except BaseException:
            self.close()
            raise
        self.tsc_khz = tsc_khz
        self.symbolizer: Symbolizer = image.symbolizer(self.slide)
        self.timings_ms = {
            "guest_memory": (t1 - t_cpuid) / 1e6,
            **(self.layout.timings_ms if self.layout is not None else {"restore_state": (t2 - t1) / 1e6}),
            "kvm_create_vm": (t3 - t2 + t_open - t0) / 1e6,  # opening /dev/kvm included, as before
            "vcpu_create": (t4 - t3 + t_cpuid - t_open) / 1e6,  # the CPUID query included, as before
            "memory_slots": (t4b - t4) / 1e6,
            "vcpu_state": (t5 - t4b) / 1e6,
            "setup_total": (t5 - t0) / 1e6,
        }
        self._setup_done_ns = t5
        self.bus = PortBus()
        self.uart = Uart16550(console)
        self.reports = ReportDevice(self.memory, self._report)
        self.bus.add(COM1_BASE, COM1_SIZE, self.uart)
        self.bus.add(EXIT_PORT, EXIT_PORT_SIZE, ExitDevice())
        self.bus.add(REPORT_PORT, REPORT_PORT_SIZE, self.reports)
        # On VMX/SVM, KVM completes the start marker's OUT by skipping it with
        # RFLAGS.TF already set and reports that as a single-step (x86.c:
        # complete_fast_pio_out -> kvm_skip_emulated_instruction ->
        # kvm_vcpu_do_singlestep); KVM-PVM does not.
        self.icount = InstructionCounter(self._set_single_step,
                                         completion_step=self.backend.backend in (Backend.VMX, Backend.SVM))
        self.bus.add(ICOUNT_PORT, ICOUNT_PORT_SIZE, self.icount)
        self.exit_policy.read_only = self.protected
        self.exit_policy.icount = self.icount
        self.work = WorkMailbox(self.memory, WORK_MAILBOX_SIZE)
        self.bus.add(WORK_PORT, WORK_PORT_SIZE, self.work)
        self._ready_ns: int | None = None

    def _coalesce_serial(self) -> int | None:
        """Have KVM buffer the guest's serial output (writes to COM1's THR) in
        the vCPU's coalesced ring instead of exiting for each byte, where the
        host supports it; returns the ring's offset in the vCPU mmap, or None.
        The ring is drained before every exit whose handling could be seen
        after that output (other ports, reads, the end of the run), so the
        console keeps its order."""
        off = self.vcpu.coalesced_ring_offset()
        if off is None or self.vm.check_extension(K.KVM_CAP_COALESCED_PIO) <= 0:
            return None
        self.vm.register_coalesced_pio(COM1_BASE + Uart16550.THR, 1)
        return self.vcpu.use_coalesced_ring()

    def _drain_ring(self) -> None:
        """Hand the buffered port writes to their devices, oldest first."""
        by_port = self.bus.by_port
        for port, data in self.vcpu.take_coalesced():
            target = by_port.get(port)
            if target is not None:
                dev, dev_off = target
                dev.io_out(dev_off, data)

    def reset_devices(self) -> None:
        """Host-side run state back to "nothing happened yet" (a VM reset in
        place to a snapshot: its guest RAM and vCPU are restored separately)."""
        self._stop_request = None
        self.uart.output.clear()
        self.uart.total_bytes = 0
        self.uart.first_byte_ns = None
        self.reports.reports.clear()
        self.reports.errors.clear()
        self.icount.active, self.icount.steps = None, 0
        self.icount.counts.clear()
        self._ready_ns = None

    def _write_boot_state(self, image: KernelImage, config: VmConfig) -> None:
        """A cold boot: kernel, page tables and boot info written into fresh RAM."""
        self.slide = choose_slide(image, config.slide)
        use_1g = direct_map_1g(self.cpu_features, self.backend.backend) if config.use_1g is None else config.use_1g
        self.layout: BootLayout | None = prepare_guest(
            self.memory,
            image,
            slide=self.slide,
            cmdline=config.cmdline,
            backend=int(self.backend.backend),
            tsc_khz=0,  # known once the vCPU exists; patched by __init__
            use_1g=use_1g,
            fresh_memory=True,  # a new memfd: every page reads as zero
        )

    @property
    def memmap(self):
        """The memory map the guest was given, as ``mm.memmap.MemoryMap``: decoded
        on first use (inspection, snapshots), so booting never imports mm."""
        if self._memmap is None:
            if self.layout is not None:
                self._memmap = self.layout.memmap
            else:  # restored: the map this kernel is booted with in this much RAM
                from mm.memmap import MemoryMap

                size = self.memory.size
                self._memmap = MemoryMap.parse(memory_map_bytes(self.image, size), ram_size=size)
        return self._memmap

    @property
    def debugger(self):
        """A vmm.gdbstub.Debugger when `--gdb` serves this VM: the run loop and
        ``handle_exit`` (its debug exits) call its hooks."""
        return self.exit_policy.debugger

    @debugger.setter
    def debugger(self, debugger) -> None:
        self.exit_policy.debugger = debugger

    # --- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        for name in ("vcpu", "vm", "memory", "kvm"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- control from other threads ---------------------------------------------------
    def _kick_vcpu(self) -> None:
        """Make KVM_RUN return to the run loop: immediate_exit covers a vCPU
        about to enter, the signal one inside the guest (EINTR)."""
        vcpu = self.vcpu
        if vcpu is not None and vcpu.run_struct is not None:
            vcpu.run_struct.immediate_exit = 1
        tid = self._vcpu_thread
        # Without a handler SIGUSR1 would kill the process: a Vm built and run
        # outside the main thread relies on immediate_exit alone.
        if tid is not None and callable(signal.getsignal(STOP_SIGNAL)):
            try:
                signal.pthread_kill(tid, STOP_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN once (the run loop then asks the debugger)."""
        self._kick_vcpu()

    def request_stop(self, stop: Stop) -> None:
        """Ask the vCPU to stop from any thread."""
        self._stop_request = stop
        self._kick_vcpu()

    @contextlib.contextmanager
    def paused(self, timeout: float = 1.0):
        """Hold the vCPU out of the guest while the block runs (from any thread).

        Used for consistent snapshots: immediate_exit plus a signal make
        KVM_RUN return, the run loop parks until the block ends. A no-op when
        the guest is not running. Yields True if the vCPU is actually parked.
        """
        if not self.running or self._vcpu_thread == threading.get_ident():
            yield False
            return
        if self.debugger is not None and self.debugger.holding:
            yield True  # gdb holds the vCPU out of the guest already
            return
        self._resume.clear()
        self._unparked.clear()
        self._pause_requested = True
        self._kick_vcpu()
        parked = self._paused.wait(timeout)
        try:
            yield parked
        finally:
            self._pause_requested = False
            self._resume.set()
            if parked:
                # Block (GIL released) until the vCPU thread is back on its
                # way into KVM_RUN; otherwise it could wait for the GIL for a
                # whole switch interval (5 ms) while this thread runs Python.
                self._unparked.wait(0.05)

    def _report(self, report: Report) -> Stop | None:
        if report.kind == ReportKind.READY and self._ready_ns is None:
            self._ready_ns = time.perf_counter_ns()
        if self._on_report is not None:
            action = self._on_report(report)
            if isinstance(action, Stop):
                return action
        return None

    # --- dirty logging -----------------------------------------------------------------
    def dirty_log(self) -> list[tuple[int, int, bytes]]:
        """KVM_GET_DIRTY_LOG of every slot (which also clears it): ``(first page,
        pages, little-endian bitmap)`` per slot. Needs VmConfig.dirty_log;
        ``vmm.inspector.dirty.dirty_pages`` turns it into one array over RAM."""
        if not self.config.dirty_log:
            raise ValueError("dirty logging is off (VmConfig.dirty_log)")
        out = []
        for slot, (gpa, size, _ro) in enumerate(self.slots):
            pages = size // 4096
            bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
            self.vm.get_dirty_log(slot, bitmap)
            out.append((gpa // 4096, pages, bytes(bitmap)))
        return out

    def dirty_page_numbers(self) -> list[int]:
        """Page numbers written since the last call (KVM_GET_DIRTY_LOG, which
        also clears the log): the sparse form of ``dirty_pages`` for a few pages."""
        import numpy as np

        if not self.config.dirty_log:
            raise ValueError("dirty logging is off (VmConfig.dirty_log)")
        out: list[int] = []
        for slot, (gpa, size, readonly) in enumerate(self.slots):
            if readonly:
                continue  # nothing writes a read-only slot
            pages = size // 4096
            bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
            self.vm.get_dirty_log(slot, bitmap)
            base = gpa // 4096
            words = np.frombuffer(bitmap, dtype=np.uint64)
            for i in np.flatnonzero(words).tolist():
                word = int(words[i])
                while word:
                    low = word & -word
                    out.append(base + i * 64 + low.bit_length() - 1)
                    word ^= low
        return out

    # --- diagnostics ------------------------------------------------------------------
    def register_dump(self) -> dict[str, int]:
        """Every register of the vCPU, flattened (vmm.registers)."""
        return capture(self.vcpu)

    @staticmethod
    def format_registers(regs: dict[str, int]) -> str:
        return format_registers(regs)

    def diagnose(self, rip: int, rbp: int | None):
        """Code around ``rip`` and the frame-pointer backtrace from ``rbp``, read
        through the guest's current page tables (vmm.diagnostics)."""
        return diagnose(guest_reader(self.memory, self.vcpu.get_sregs().cr3), rip, rbp, self.symbolizer)

    # --- the run loop -------------------------------------------------------------------
    def run(self, *, profile: bool = False) -> RunResult:
        """Run until the guest stops.

        With ``profile``, the time spent inside KVM_RUN is accumulated in
        ``timings_ms["in_kvm_run"]`` so the rest of ``run`` is Python's share.
        """
        _install_stop_signal()
        self._vcpu_thread = threading.get_ident()
        self.running = True
        watchdog = None
        if self.config.timeout is not None:
            timeout = Stop(ExitCode.TIMEOUT, "timeout", f"watchdog: guest still running after {self.config.timeout:g} s")
            watchdog = self.watchdog = Watchdog(self.config.timeout, functools.partial(self.request_stop, timeout))
            watchdog.start()
        debugger = self.debugger
        vcpu, bus, policy = self.vcpu, self.bus, self.exit_policy
        vcpu.ns_in_kvm_run = 0
        run = vcpu.run_profiled if profile else vcpu.run
        # Serial output buffered in the coalesced ring comes before whatever
        # the next exit does (a report, the exit, a THR write KVM could not
        # buffer: ring full), except writes to COM1's other registers.
        drain = self._drain_ring if self._ring is not None else None
        unordered, IoOut, Interrupted = _UNORDERED_PORTS, X.IoOut, X.Interrupted
        nexits = 0
        start = time.perf_counter_ns()
        stop: Stop | None = None
        try:
            if debugger is not None:
                stop = debugger.on_start()  # --gdb-wait: held before the first instruction
            while stop is None:
                try:
                    ex = run()
                except KeyboardInterrupt:
                    stop = Stop(ExitCode.INTERRUPTED, "interrupted", "interrupted by the user (Ctrl-C)")
                    break
                cls = ex.__class__
                if cls is not Interrupted:
                    nexits += 1
                if drain is not None and (cls is not IoOut or ex.port not in unordered):
                    drain()  # a pause, a save or gdb sees the console up to here too
                action = handle_exit(ex, bus, policy)
                if action is None:
                    stop = self._stop_request
                elif action is PARK:
                    stop = self._at_park_point(ex)
                elif action.__class__ is bytes:
                    vcpu.complete_io_in(ex, action)
                    stop = self._stop_request
                else:
                    stop = action
            if drain is not None:
                drain()  # what the guest wrote just before it stopped
            if debugger is not None:
                stop = debugger.on_guest_stop(stop)  # gdb sees the corpse before the run ends
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._vcpu_thread = None
            self.running = False
            self._resume.set()
        end = time.perf_counter_ns()
        result = self._result(stop, nexits, start, end)
        if profile:
            result.timings_ms["in_kvm_run"] = vcpu.ns_in_kvm_run / 1e6
        return result

    def _park(self) -> None:
        """vCPU thread: wait outside KVM_RUN until ``paused()`` (or
        ``run_to``) lets the guest go; each release lets it run once."""
        self.parked_ns = time.perf_counter_ns()
        self._paused.set()
        self._resume.wait()
        self._resume.clear()
        self._paused.clear()
        self._unparked.set()

    def run_to(self, addr: int, timeout: float, meanwhile: Callable[[], object] | None = None) -> bool:
        """Inside ``paused()`` only (vCPU parked): let the guest run until it is
        about to execute ``addr`` (an instruction breakpoint in DR0), and hold
        it there. False if it did not get there within ``timeout``; it is then
        parked again wherever it was. The inspector uses it to wait for the
        end of a guest critical section without parking over and over, and
        ``meanwhile`` (called once the guest runs) to catch up with it."""
        vcpu = self.vcpu
        # Not with gdb attached or instructions being counted: they own the debug registers.
        if (not self._paused.is_set() or self._vcpu_thread is None or self.icount.active is not None
                or self.debugger is not None):
            return False
        vcpu.set_guest_debug(K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_USE_HW_BP, (addr, 0, 0, 0, 0, 0, 0, K.DR7_L0))
        self.exit_policy.run_to = addr
        self._paused.clear()
        self._unparked.clear()
        self._resume.set()
        if meanwhile is not None:
            meanwhile()
        reached = self._paused.wait(timeout)
        if not reached:
            self._kick_vcpu()  # _pause_requested is still set: it parks where it is
            if not self._paused.wait(1.0):
                self.exit_policy.run_to = None
                return False  # the guest stopped meanwhile
        self.exit_policy.run_to = None
        vcpu.set_guest_debug(0)
        return reached

    def _set_single_step(self, on: bool) -> None:
        self.vcpu.set_guest_debug(K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_SINGLESTEP if on else 0)

    def _at_park_point(self, ex: X.Exit) -> Stop | None:
        """The pause protocol, where ``handle_exit`` said PARK: the vCPU was
        kicked out of KVM_RUN, or it reached a ``run_to`` address. A stop
        request ends the run; gdb takes an interrupt it asked for; a pending
        ``paused()`` (or ``run_to``) holds the vCPU here."""
        interrupted = ex.__class__ is X.Interrupted
        if interrupted:
            self.vcpu.run_struct.immediate_exit = 0  # the kick is taken
        stop = self._stop_request
        if stop is not None:
            return stop
        debugger = self.debugger
        if interrupted and debugger is not None and debugger.pending:
            return debugger.on_interrupt()
        if self._pause_requested:
            self._park()
        return None

    def _result(self, stop: Stop, nexits: int, start: int, end: int) -> RunResult:
        timings = dict(self.timings_ms)
        timings["run"] = (end - start) / 1e6
        if self.uart.first_byte_ns is not None:
            timings["to_first_serial_byte"] = (self.uart.first_byte_ns - self._setup_done_ns) / 1e6
        if self._ready_ns is not None:
            timings["to_ready"] = (self._ready_ns - self._setup_done_ns) / 1e6
        registers = rip_symbol = None
        message = stop.message
        if stop.reason == "triple-fault" and self.backend.backend == Backend.SVM:
            # KVM-SVM reinitializes the VMCB and resets the vCPU at a SHUTDOWN
            # intercept (the VMCB is undefined after one, AMD APM 15.11): what the
            # vCPU holds now is the reset state (RIP 0xfff0), not the fault's.
            message += "; registers at the fault are lost (KVM-SVM resets the vCPU on shutdown)"
        elif stop.reason not in ("exit",):
            try:
                registers = self.register_dump()
                rip_symbol = self.symbolizer.format(registers["rip"])
            except KvmError:
                pass
        fault_sym = diagnosis = None
        faults = [r for r in self.reports.reports if r.kind == ReportKind.FAULT]
        if faults and faults[-1].int("rip") is not None:
            fault_sym = self.symbolizer.format(faults[-1].int("rip"))
        try:
            # Only for stops a developer has to debug: not for READY stops
            # (vmm pt), a clean exit or the user's Ctrl-C/SIGTERM/closed pipe.
            if faults and faults[-1].int("rip") is not None:
                diagnosis = self.diagnose(faults[-1].int("rip"), faults[-1].int("rbp"))
            elif registers is not None and int(stop.exit_code) not in QUIET_STOPS:
                diagnosis = self.diagnose(registers["rip"], registers["rbp"])
        except KvmError:
            pass
        return RunResult(
            instruction_counts=dict(self.icount.counts),
            fault_rip_symbol=fault_sym,
            exit_code=int(stop.exit_code),
            stop_reason=stop.reason,
            message=message,
            backend=self.backend.name,
            memory_bytes=self.memory.size,
            kaslr_slide=self.slide,
            serial=bytes(self.uart.output),
            reports=list(self.reports.reports),
            report_errors=list(self.reports.errors),
            timings_ms=timings,
            exits=nexits,
            registers=registers,
            rip_symbol=rip_symbol,
            diagnosis=diagnosis,
        )
