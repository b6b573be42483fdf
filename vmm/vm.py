"""A guest that runs: devices, the run loop and control from other threads.

``Vm`` owns everything for one guest and closes it deterministically. Its
setup steps are ``vmm.vm_builder``'s and its ``RunResult`` is built by
``vmm.run_result``.
``Vm.run()`` drives KVM_RUN until the guest stops and returns a
``RunResult``. Every exit comes back from ``VcpuFd.run`` decoded
(``vmm.exits``) and goes to ``handle_exit`` (``vmm.exit_handling``), a free
function tests feed synthetic exits; the run loop keeps only the pause
protocol and the order of buffered serial output.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from .abi import Backend, ReportKind
from .backend import BackendInfo, detect_backend
from .boot import BootLayout, memory_map_bytes
from .diagnostics import diagnose, guest_reader
from .dirty_log import DirtyLog
from .registers import capture, format_registers
from .devices import ExitDevice, InstructionCounter, PortBus, ReportDevice, Stop, Uart16550, WorkMailbox
from .elf import KernelImage, Symbolizer
from .exit_handling import PARK, ExitPolicy, handle_exit
from . import kvm_abi as K
from .reports import Report
from .run_result import RunResult, build_result
from .visit import DONE, DROPPED, PENDING, RUNNING_ON, SERVING, Visit
from .vm_builder import build_machine
from .watchdog import Watchdog

STOP_SIGNAL = signal.SIGUSR1
# COM1's registers other than THR (the exit storm's scratch): writes to them
# need no ordering against serial output buffered in the coalesced ring.
_UNORDERED_PORTS = frozenset(range(COM1_BASE, COM1_BASE + COM1_SIZE)) - {COM1_BASE + Uart16550.THR}


_FIFO, _OTHER = os.sched_param(1), os.sched_param(0)


def _set_realtime(on: bool) -> bool:
    """The calling thread to SCHED_FIFO (lowest real-time priority) or back
    to SCHED_OTHER; False if the process may not (no CAP_SYS_NICE)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO if on else os.SCHED_OTHER, _FIFO if on else _OTHER)
        return True
    except OSError:  # PermissionError without CAP_SYS_NICE
        return False


def _install_stop_signal() -> None:
    """KVM_RUN only returns EINTR for a signal that has a handler."""
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(STOP_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(STOP_SIGNAL, lambda *_: None)


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
    # With dirty_log: "auto" (the fastest the host offers) or one of
    # vmm.vm_builder.DIRTY_MECHANISMS ("bitmap", "manual").
    dirty_mechanism: str = "auto"
    # Buffer serial output (COM1's THR) in KVM's coalesced-I/O ring instead of
    # one exit per byte, where the host has KVM_CAP_COALESCED_PIO.
    coalesce_serial: bool = True


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
        # One paused() holder at a time: the holder's exit releases the vCPU,
        # so a second thread inside its own paused() block (the control
        # server beside a local view) would find the guest running again.
        self._pause_owner = threading.Lock()
        self._pause_holder: int | None = None  # thread id inside paused(), for nested blocks
        self._resume = threading.Event()
        # What handle_exit decides with: filled in as the parts exist.
        self.exit_policy = ExitPolicy()
        self.parked_ns = 0  # perf_counter_ns() of the vCPU's last park (run_to's held time starts there)
        self._unparked = threading.Event()
        self._visit: Visit | None = None  # asked for by visit(), served at the park point
        self._visit_lock = threading.Lock()  # who takes a pending visit: the vCPU, or its requester giving up
        self._sync_regs: bool | None = None  # KVM stores regs and sregs in kvm_run on request (asked once)
        self._exit_regs = False  # inside a visit's fn: kvm_run holds this exit's registers
        self._realtime: bool | None = None  # may a visit run at SCHED_FIFO (learnt on the first that asks)
        self._rt_on = False  # the vCPU thread is at SCHED_FIFO for the visit it serves
        self.running = False
        self._vcpu_thread: int | None = None
        self._kick_signal = False  # a SIGUSR1 handler is installed (set by run)
        _install_stop_signal()  # here too: run() may be called from another thread
        self.restored_from = restore
        # What the guest reported about its layout before the snapshot (INSPECT fields).
        self.inherited_inspect = dict(getattr(restore, "inspect_fields", None) or {})
        self._memmap = None
        self.debugger = None
        self.watchdog = None
        # Setup (KVM, CPUID, RAM, boot state, slots, registers) is the builder's.
        machine = build_machine(image, config, self.backend, restore)
        self.kvm, self.vm, self.vcpu, self.memory = machine.kvm, machine.vm, machine.vcpu, machine.memory
        self.cpu_features, self.tsc_khz, self.slide = machine.cpu_features, machine.tsc_khz, machine.slide
        self.layout: BootLayout | None = machine.layout
        self.protected, self.slots, self._ring = machine.protected, machine.slots, machine.ring
        self.dirty_mechanism: str | None = machine.dirty_mechanism  # vm_builder.choose_dirty_tracking
        self._dirty = None  # the DirtyLog, made on first use (dirty_tracker)
        self.timings_ms, self.setup_done_ns = machine.timings_ms, machine.setup_done_ns
        self.symbolizer: Symbolizer = image.symbolizer(self.slide)
        self.ready_ns: int | None = None
        self._add_devices(console)

    def _add_devices(self, console: Callable[[bytes], None] | None) -> None:
        """The port bus: COM1, the exit and report ports, the instruction
        counter and the work mailbox (docs/ABI.md)."""
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
        self.work = WorkMailbox(self.memory, WORK_MAILBOX_SIZE, self.protected)
        self.bus.add(WORK_PORT, WORK_PORT_SIZE, self.work)

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
        self.work.reset()
        self.ready_ns = None

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
        if getattr(self, "_dirty", None) is not None:
            self._dirty.close()
            self._dirty = None
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
        if tid is not None and self._kick_signal:
            try:
                signal.pthread_kill(tid, STOP_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def vcpu_thread_time(self) -> float | None:
        """The vCPU thread's CPU time so far, in seconds (the guest's own time
        in KVM_RUN included), or None when the guest is not running: beside
        wall time it tells a guest slowed by sharing a core (less CPU for the
        same wall) from one slowed on the CPU it got. Any thread may ask."""
        tid = self._vcpu_thread
        if tid is None:
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(tid))
        except OSError:  # the thread ended meanwhile
            return None

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN once (the run loop then asks the debugger)."""
        self._kick_vcpu()

    def end_work(self) -> None:
        """Ask the guest to end its `workload=` loop at its next iteration, as
        at its `workload_ms` deadline (it frees everything and exits 0): for
        a watcher done with a guest it kept busy. Safe from any thread."""
        self.work.end_work()

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
        Holders from several threads take turns (a second waits up to
        ``timeout`` for the first to end, then parks the vCPU itself).
        """
        if not self.running or self._vcpu_thread == threading.get_ident():
            yield False
            return
        if self.debugger is not None and self.debugger.holding:
            yield True  # gdb holds the vCPU out of the guest already
            return
        me = threading.get_ident()
        if self._pause_holder == me:
            yield self._paused.is_set()  # nested: the outer block owns the pause and its end
            return
        if not self._pause_owner.acquire(timeout=timeout):
            yield False  # another thread has held it longer than we may wait
            return
        self._pause_holder = me
        try:
            # With the turn ours, a park still marked is the last holder's: it
            # let the vCPU go, which has not left the park yet (a loaded host
            # can take longer than that holder waited). Until it has, this
            # holder would read that stale mark as its own park while the
            # guest is about to run.
            leave_by = time.monotonic() + timeout
            while self._paused.is_set() and self.running and time.monotonic() < leave_by:
                time.sleep(0.0002)
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
        finally:
            self._pause_holder = None
            self._pause_owner.release()

    def visit(self, fn: Callable[[], object], *, run_on: Callable[[], int | None] | None = None,
              timeout: float = 1.0, run_on_timeout: float = 0.05, realtime: bool = False) -> Visit | None:
        """Call ``fn`` on the vCPU thread with the guest out of KVM_RUN, from
        any other thread (``vmm.visit``): the vCPU is kicked out, calls ``fn``
        at its park point and goes straight back into the guest; nobody
        else's wake-up is inside the pause. ``run_on`` (asked at the first
        stop) may name an address to let the guest run to first; if it is
        not there within ``run_on_timeout``, it is kicked again and ``fn``
        runs where it stopped. ``realtime``: for a short ``fn`` only, the
        vCPU thread runs the visit at real-time priority where the process
        may (SCHED_FIFO, CAP_SYS_NICE): on a busy host no other task, our
        own woken requester included, takes its CPU while the guest is
        out. Returns the served ``Visit`` (``fn``'s value, the time held),
        or None when the guest is not running here or stopped first
        (nothing holds it: read as it is). ``fn``'s exceptions are raised
        here."""
        if not self.running or self._vcpu_thread == threading.get_ident():
            return None
        if self.debugger is not None or self._paused.is_set():
            return self._visit_parked(fn, timeout)  # gdb owns the stops, or the vCPU is parked already
        v = Visit(fn, run_on, realtime=realtime)
        if self._sync_regs is None:
            self._sync_regs = self.vm.syncs_regs(K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS)
        if self._sync_regs:
            # KVM stores the registers in kvm_run as the kick lands: fn reads
            # them there instead of two ioctls (~20 us of the hold here).
            self.vcpu.request_sync_regs(K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS)
        with self._visit_lock:
            self._visit = v
        self._kick_vcpu()
        if not v.progress.wait(timeout):
            with self._visit_lock:
                if v.stage == PENDING:  # never taken (the loop is stuck or gone)
                    self._visit = None
                    v.stage = DROPPED
            if v.stage == DROPPED:
                if self._sync_regs and self.vcpu is not None:
                    self.vcpu.request_sync_regs(0)  # no exit should go on paying for the copy
                return None
        if not v.done.wait(run_on_timeout if v.stage == RUNNING_ON else timeout):
            self._kick_vcpu()  # not at the address in time: it stops where it is
            if not v.done.wait(timeout):
                return None
        if v.error is not None:
            raise v.error
        return v if v.stage == DONE else None

    def _visit_parked(self, fn: Callable[[], object], timeout: float) -> Visit | None:
        """A visit while gdb holds the vCPU, or another thread has it parked:
        ``fn`` runs here, inside ``paused()``, all of it counted as held."""
        v = Visit(fn)
        t0 = time.perf_counter_ns()
        with self.paused(timeout) as parked:
            if not parked:
                return None
            v.exit_ns = time.perf_counter_ns()
            v.value = fn()
        v.stage, v.stops, v.held_ns = DONE, 1, time.perf_counter_ns() - t0
        return v

    def _serve_visit(self, v: Visit, at: int, interrupted: bool) -> None:
        """vCPU thread, at the park point: the visit's next step (see ``visit``),
        at real-time priority if it asks and the process may."""
        if v.realtime and self._realtime is not False:
            self._rt_on = self._realtime = _set_realtime(True)
        try:
            self._visit_step(v, at, interrupted)
        finally:
            self._leave_realtime()  # (the step leaves it inside the timed hold; not if it raised)

    def _visit_step(self, v: Visit, at: int, interrupted: bool) -> None:
        cpu = time.thread_time_ns()  # the hold on the CPU, without what the host scheduler takes from it
        with self._visit_lock:  # taken: its requester no longer drops it
            if v.stage not in (PENDING, RUNNING_ON):
                return
            first, v.stage = v.stage == PENDING, SERVING
        v.stops += 1
        if first:
            addr = v.run_on() if v.run_on is not None and self.icount.active is None else None
            if addr is not None:
                # Let it run to ``addr`` first (as run_to does), then come back here.
                self._arm_run_to(addr)
                v.stage = RUNNING_ON
                v.progress.set()
                self._leave_realtime()
                now = time.perf_counter_ns()
                v.held_ns += now - at
                v.cpu_ns += time.thread_time_ns() - cpu
                v.ran_ns = -now
                return
        else:
            self._disarm_run_to()
            v.ran_ns += at
            v.ran_on = not interrupted
        self._visit = None
        self._exit_regs = bool(self._sync_regs)
        try:
            v.value = v.fn()
        except Exception as exc:  # the requester raises it
            v.error = exc
        finally:
            self._exit_regs = False
            if self._sync_regs:
                self.vcpu.request_sync_regs(0)  # other exits need not pay for the copy
        v.exit_ns = at
        v.stage = DONE
        v.progress.set()
        # Back to SCHED_OTHER inside the timed hold: the guest waits for it,
        # and for whatever the scheduler runs first when this thread drops
        # (measured here: ~15 us, and under load now and then milliseconds,
        # which the CPU time leaves out). Timed up to here; the way back
        # into KVM_RUN, a few us, is not.
        self._leave_realtime()
        v.held_ns += time.perf_counter_ns() - at
        v.cpu_ns += time.thread_time_ns() - cpu
        v.done.set()

    def _leave_realtime(self) -> None:
        """vCPU thread: back to SCHED_OTHER if a visit put it at SCHED_FIFO."""
        if self._rt_on:
            _set_realtime(False)
            self._rt_on = False

    def _drop_visit(self) -> None:
        """The run ends: a pending visit will not be served."""
        with self._visit_lock:
            v, self._visit = self._visit, None
            if v is not None and v.stage in (PENDING, RUNNING_ON, SERVING):
                if v.stage == RUNNING_ON:
                    self._disarm_run_to()
                if self._sync_regs:
                    self.vcpu.request_sync_regs(0)
                v.stage = DROPPED
                v.progress.set()
                v.done.set()

    def registers(self) -> tuple[K.kvm_regs, K.kvm_sregs]:
        """The vCPU's general and system registers: inside a visit's ``fn``,
        as KVM stored them in kvm_run at this exit (no ioctl), else
        KVM_GET_REGS/KVM_GET_SREGS."""
        if self._exit_regs and threading.get_ident() == self._vcpu_thread:
            return self.vcpu.sync_regs()
        return self.vcpu.get_regs(), self.vcpu.get_sregs()

    def _report(self, report: Report) -> Stop | None:
        if report.kind == ReportKind.READY and self.ready_ns is None:
            self.ready_ns = time.perf_counter_ns()
        if self._on_report is not None:
            action = self._on_report(report)
            if isinstance(action, Stop):
                return action
        return None

    # --- dirty logging -----------------------------------------------------------------
    @property
    def dirty_tracker(self):
        """This VM's ``vmm.dirty_log.DirtyLog`` (needs VmConfig.dirty_log), made on first use."""
        if not self.config.dirty_log:
            raise ValueError("dirty logging is off (VmConfig.dirty_log)")
        if self._dirty is None:
            self._dirty = DirtyLog(self.vm, self.slots, self.dirty_mechanism)
        return self._dirty

    def dirty_log(self) -> list[tuple[int, int, bytes]]:
        """Pages written since the last look, per slot: ``(first page, pages,
        little-endian bitmap)``; reading re-arms the log.
        ``vmm.inspector.dirty.dirty_pages`` turns it into one array over RAM."""
        return self.dirty_tracker.bitmaps()

    def dirty_runs(self) -> list[tuple[int, int]]:
        """Runs ``(first page, count)`` of the pages written since the last
        look, ascending; reading re-arms the log. The sparse form of ``dirty_log``."""
        return self.dirty_tracker.take()

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
        # Whether a kick may signal this thread: decided once here, not on
        # every kick (the pause's latency is what a snapshot holds the guest).
        self._kick_signal = callable(signal.getsignal(STOP_SIGNAL))
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
                nexits += 1  # less the kicks: _at_park_point
                if drain is not None and (ex.__class__ is not IoOut or ex.port not in unordered):
                    drain()  # a pause, a save or gdb sees the console up to here too
                action = handle_exit(ex, bus, policy)
                if action is None:
                    stop = self._stop_request
                elif action is PARK:
                    if ex.__class__ is Interrupted:
                        nexits -= 1  # our own kick, not a guest exit
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
            self._drop_visit()
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
        # Not with gdb attached or instructions being counted: they own the debug registers.
        if (not self._paused.is_set() or self._vcpu_thread is None or self.icount.active is not None
                or self.debugger is not None):
            return False
        self._arm_run_to(addr)
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
        self._disarm_run_to()
        return reached

    def _arm_run_to(self, addr: int) -> None:
        """Stop the guest when it is about to execute ``addr``: an instruction
        breakpoint in DR0 (local enable, R/W=00 execute, LEN=00), and the exit
        policy told to park there instead of reporting a debug exit."""
        self.vcpu.set_guest_debug(K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_USE_HW_BP,
                                  (addr, 0, 0, 0, 0, 0, 0, K.DR7_L0))
        self.exit_policy.run_to = addr

    def _disarm_run_to(self) -> None:
        self.exit_policy.run_to = None
        self.vcpu.set_guest_debug(0)

    def _set_single_step(self, on: bool) -> None:
        self.vcpu.set_guest_debug(K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_SINGLESTEP if on else 0)

    def _at_park_point(self, ex: X.Exit) -> Stop | None:
        """The pause protocol, where ``handle_exit`` said PARK: the vCPU was
        kicked out of KVM_RUN, or it reached a ``run_to`` address. A stop
        request ends the run; gdb takes an interrupt it asked for; a pending
        ``paused()`` (or ``run_to``) holds the vCPU here."""
        at = time.perf_counter_ns()
        interrupted = ex.__class__ is X.Interrupted
        if interrupted:
            self.vcpu.run_struct.immediate_exit = 0  # the kick is taken
        stop = self._stop_request
        if stop is not None:
            return stop
        debugger = self.debugger
        if interrupted and debugger is not None and debugger.pending:
            return debugger.on_interrupt()
        visit = self._visit
        if visit is not None:
            self._serve_visit(visit, at, interrupted)
        if self._pause_requested:
            self._park()
        return None

    def _result(self, stop: Stop, nexits: int, start: int, end: int) -> RunResult:
        return build_result(self, stop, nexits, start, end)
