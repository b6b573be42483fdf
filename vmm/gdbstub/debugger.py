"""The glue between a running ``Vm`` and a gdb client.

The vCPU thread owns the guest: every register, memory and KVM_SET_GUEST_DEBUG
access happens there. The run loop calls four hooks (``on_start``,
``pending``/``on_interrupt``, ``on_debug_exit``, ``on_guest_stop``); each
that stops the guest enters :meth:`Debugger.hold`, which answers gdb's
packets (queued by the connection's reader thread) until gdb resumes,
detaches or kills. While held the watchdog's clock is stopped and an
inspector's pause request is granted at once (the vCPU is out of the guest).

Stops gdb sees:
- attach (a client connects to a running guest) and Ctrl-C: SIGINT/SIGTRAP;
- a breakpoint or a finished step: SIGTRAP, with ``swbreak``/``hwbreak``;
- the guest's end: panic SIGABRT, page fault / stack overflow / triple fault /
  write to read-only kernel memory SIGSEGV, emulation failure SIGILL, port or
  MMIO the VMM does not know SIGBUS, watchdog SIGXCPU, its own exit SIGTRAP,
  each with a console line naming the RIP; ``continue`` then ends the run as
  it would have without gdb (``W`` reply with the exit code).
"""

from __future__ import annotations

import queue
import threading

from ..abi import ExitCode, ReportKind
from ..devices import Stop
from .. import exits as X
from . import commands as C
from .breakpoints import BreakpointTable, int3_is_intercepted
from .memory import EFER_NXE, read_virtual, write_virtual
from .monitor import run_monitor
from .packets import Malformed, Oversize, Packet
from .server import ClientGone, Connection, GdbAddress, GdbServer, NewClient
from .session import (
    SIGABRT, SIGBUS, SIGILL, SIGINT, SIGSEGV, SIGTRAP, SIGXCPU,
    DetachAction, KillAction, ResumeAction, Session, StopEvent, console_packets, error, stop_reply,
)

#: Exit code of a run gdb ended with ``kill`` (128 + SIGKILL, as a shell shows it).

_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rip")


def signal_for(stop: Stop) -> int:
    code = int(stop.exit_code)
    if code == ExitCode.PANIC:
        return SIGABRT
    if code in (ExitCode.STACK_OVERFLOW, ExitCode.GUEST_FAULT, ExitCode.TRIPLE_FAULT, ExitCode.KERNEL_WRITE):
        return SIGSEGV
    if code == ExitCode.EMULATION_FAILURE:
        return SIGILL
    if code in (ExitCode.UNKNOWN_PORT, ExitCode.UNBACKED_MMIO):
        return SIGBUS
    if code == ExitCode.TIMEOUT:
        return SIGXCPU  # not SIGALRM: gdb passes that one on without stopping
    return SIGTRAP


class Debugger:
    """Serves one VM to gdb clients at ``address``; attach with :meth:`attach`."""

    def __init__(self, vm, address: GdbAddress, *, wait: bool = False, say=lambda msg: None):
        self.vm = vm
        self.wait = wait
        self.say = say
        self.events: queue.Queue = queue.Queue()
        self.conn: Connection | None = None
        self.session: Session | None = None
        self.holding = False
        self.write_through = False
        self.bps = BreakpointTable(software_int3=int3_is_intercepted(vm.backend))
        self._bp_kind: dict[int, int] = {}
        self._interrupt = False
        self._lock = threading.Lock()  # orders `holding` against clients asking for a stop
        self._stepping = False
        self._regs: dict[str, int] | None = None
        self._overflow_said = False
        self._started = False
        self.stops = 0
        self._awaiting_stop = False  # gdb sent c/s/vCont and waits for a stop reply
        self._gdb_resumed = False  # gdb has resumed the guest at least once (ends --gdb-wait)
        self.server = GdbServer(address, self.events, self._client_arrived, self._client_interrupt, say)
        self.address = self.server.address

    # --- lifetime -------------------------------------------------------------------------
    def attach(self) -> "Debugger":
        self.vm.debugger = self
        return self

    def close(self) -> None:
        self.server.close()
        if self.vm.debugger is self:
            self.vm.debugger = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.close()

    def connect_hint(self, kernel_path: str) -> str:
        """The line to give gdb (symbols slid by the KASLR offset gdb also gets from qOffsets)."""
        return f"gdb {kernel_path} -ex 'target remote {self.address.gdb_target}'"

    # --- threads other than the vCPU's ------------------------------------------------------
    def _client_arrived(self, conn: Connection) -> None:
        self._stop_guest()  # gdb expects a stopped target on connect, as QEMU gives it

    def _client_interrupt(self) -> None:
        self._stop_guest()

    def _stop_guest(self) -> None:
        with self._lock:
            if self.holding:
                return  # already stopped: the hold loop reads the queue
            self._interrupt = True
        self.vm.kick()

    # --- run-loop hooks (vCPU thread) -------------------------------------------------------
    @property
    def pending(self) -> bool:
        return self._interrupt

    def on_start(self) -> Stop | None:
        """Before the first instruction: with --gdb-wait, hold until gdb continues."""
        self._started = True
        if self.wait:
            self.say(f"gdb: waiting for a debugger on {self.address} before the first instruction")
            return self.hold(StopEvent(SIGTRAP), reply=False, need_client=True)
        return None

    def on_interrupt(self) -> Stop | None:
        """KVM_RUN returned EINTR and a client asked for a stop (attach or Ctrl-C)."""
        if not self._work_queued() and self.conn is None:
            self._interrupt = False
            return None  # nobody to tell: a client that left before we stopped
        attach = self.conn is None
        return self.hold(StopEvent(SIGTRAP if attach else SIGINT), reply=self._awaiting_stop)

    def on_debug_exit(self, ex: X.Debug) -> Stop | None:
        """KVM_EXIT_DEBUG: a breakpoint, a finished step, or a step of the
        many-breakpoints mode that has not reached one yet."""
        rip = self._registers(refresh=True)["rip"]
        if ex.exception == 3 and rip in self.bps.int3:
            return self.hold(StopEvent(SIGTRAP, "swbreak"), reply=True)
        if self._stepping:
            return self.hold(StopEvent(SIGTRAP), reply=True)  # one instruction done
        if rip in self.bps:
            kind = "hwbreak" if self._bp_kind.get(rip) == 1 else "swbreak"
            return self.hold(StopEvent(SIGTRAP, kind), reply=True)
        if self.bps.stepped or self.conn is None:
            return None  # stepping towards a breakpoint past the fourth; or stale after detach
        return self.hold(StopEvent(SIGTRAP), reply=True)

    def on_guest_stop(self, stop: Stop) -> Stop:
        """The guest is ending (exit, panic, fault, watchdog...): show gdb the
        corpse; whatever gdb does next, the run then ends with ``stop``."""
        if self.conn is None or stop.exit_code == ExitCode.KILLED:
            return stop
        msg = f"pyvmm: {stop.message} (exit code {int(stop.exit_code)})"
        fault = self._fault_line()
        if fault:
            msg += f"\npyvmm: {fault}"
        msg += f"\npyvmm: RIP {self._symbol(self._registers(refresh=True)['rip'])}; continue ends the run\n"
        out = self.hold(StopEvent(signal_for(stop), "", msg), reply=self._awaiting_stop, final=stop)
        return out if out is not None else stop

    # --- holding the guest ------------------------------------------------------------------------
    def hold(self, event: StopEvent, *, reply: bool, need_client: bool = False, final: Stop | None = None) -> Stop | None:
        """Serve gdb with the guest stopped. Returns None to resume the guest,
        or the Stop that ends the run."""
        vm = self.vm
        with self._lock:
            self.holding = True
            self._interrupt = False  # the guest is stopped: a Ctrl-C from before is answered by this stop
        self.stops += 1
        watchdog = getattr(vm, "watchdog", None)
        if watchdog is not None:
            watchdog.hold()
        self._regs = None
        try:
            if self.session is not None:
                self.session.last_stop = event
                if reply and self.conn is not None:
                    self._send_stop(event)
            while True:
                try:
                    conn, ev = self.events.get(timeout=0.25)
                except queue.Empty:
                    continue
                if isinstance(ev, NewClient):
                    self._adopt(conn, event)
                    continue
                if conn is not self.conn:
                    continue  # left over from a client that is gone
                if isinstance(ev, ClientGone):
                    self.say("gdb: client disconnected" + (" mid-packet" if ev.mid_packet else "") + "; guest resumes")
                    self._drop_client()
                    if final is not None:
                        return final
                    if need_client and not self._gdb_resumed:
                        continue  # --gdb-wait: still nobody has said continue
                    return None
                if isinstance(ev, (Malformed, Oversize)):
                    conn.send(error(1))
                    continue
                if not isinstance(ev, Packet):
                    continue
                try:
                    cmd = C.decode(ev.payload)
                except C.BadCommand:
                    conn.send(error(1))
                    continue
                try:
                    out = self.session.handle(cmd)
                except Exception as exc:  # noqa: BLE001 - a failed request must not take the VM down
                    self.say(f"gdb: {type(cmd).__name__} failed: {type(exc).__name__}: {exc}")
                    conn.send(error(5))  # EIO
                    continue
                if isinstance(out, ResumeAction):
                    if final is not None:
                        # The guest is gone: the run ends now, as gdb's `continue` asked.
                        conn.send(b"W%02x" % (int(final.exit_code) & 0xFF))
                        self._drop_client()
                        return final
                    self._resume(step=out.step)
                    self._awaiting_stop = True
                    self._gdb_resumed = True
                    return None
                if isinstance(out, DetachAction):
                    conn.send(b"OK")
                    self.say("gdb: detached; guest resumes")
                    self._drop_client()
                    if final is not None:
                        return final
                    self._gdb_resumed = True
                    return None
                if isinstance(out, KillAction):
                    self._drop_client()
                    if final is not None:
                        return final
                    return Stop(ExitCode.KILLED, "killed", "killed by gdb")
                if isinstance(out, list):
                    for pkt in out:
                        conn.send(pkt)
                else:
                    conn.send(out)
                if isinstance(cmd, C.StartNoAck):
                    conn.no_ack = True  # after the OK, which gdb still acknowledges
        finally:
            self._regs = None
            if watchdog is not None:
                watchdog.release()
            with self._lock:
                self.holding = False
                # A Ctrl-C or a new client that came after the last packet we
                # read: stop again at once rather than leave it for later.
                again = self._work_queued()
                if again:
                    self._interrupt = True
            if again:
                vm.kick()

    def _work_queued(self) -> bool:
        """Drop what gone clients left in the queue; True if anything is left
        (a new client, or the current client's packets or departure)."""
        q = self.events
        with q.mutex:
            keep = (self.conn, self.server.client)  # the adopted client, and one about to be
            live = [item for item in q.queue if item[0] is not None and item[0] in keep]
            q.queue.clear()
            q.queue.extend(live)
        return bool(live)

    def _adopt(self, conn: Connection, event: StopEvent) -> None:
        if self.conn is not None and self.conn is not conn:
            conn.close()
            return
        self.conn = conn
        self.session = Session(self)
        self.session.last_stop = event
        self._awaiting_stop = False
        self.say(f"gdb: client connected on {self.address}; guest stopped (KASLR slide {self.vm.slide:#x}, "
                 f"answered through qOffsets; by hand: symbol-file -o {self.vm.slide:#x} KERNEL)")

    def _drop_client(self) -> None:
        for addr, byte in self.bps.clear().items():
            self._poke(addr, byte)
        self._bp_kind.clear()
        self._stepping = False
        self._awaiting_stop = False
        self._apply_guest_debug(step=False)
        conn, self.conn, self.session = self.conn, None, None
        if conn is not None:
            conn.close()

    def _send_stop(self, event: StopEvent) -> None:
        conn = self.conn
        self._awaiting_stop = False
        msg = event.message
        if self.bps.overflow and not self._overflow_said:
            self._overflow_said = True
            msg = ("pyvmm: more than 4 breakpoints: the debug registers hold 4, the rest are found by "
                   "single-stepping (slow)\n") + msg
        if msg:
            for pkt in console_packets(msg):
                conn.send(pkt)
        conn.send(stop_reply(event, self._registers()))

    def _resume(self, step: bool) -> None:
        self._stepping = step
        self._regs = None
        self._apply_guest_debug(step)

    def _apply_guest_debug(self, step: bool) -> None:
        control, debugreg = self.bps.guest_debug(step)
        vcpu = self.vm.vcpu
        if vcpu is not None:
            vcpu.set_guest_debug(control, debugreg)

    # --- DebugTarget (used by Session, vCPU thread) ---------------------------------------------
    def _registers(self, refresh: bool = False) -> dict[str, int]:
        if self._regs is None or refresh:
            vcpu = self.vm.vcpu
            r = vcpu.get_regs()
            s = vcpu.get_sregs()
            out = {name: getattr(r, name) for name in _GPRS}
            out["eflags"] = r.rflags & 0xFFFF_FFFF
            for seg in _SEGMENTS:
                out[seg] = getattr(s, seg).selector
            out["fs_base"] = s.fs.base
            out["gs_base"] = s.gs.base
            for cr in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
                out[cr] = getattr(s, cr)
            self._regs = out
        return self._regs

    def registers(self) -> dict[str, int]:
        return self._registers()

    def set_registers(self, values: dict[str, int]) -> None:
        vcpu = self.vm.vcpu
        gp = {k: v for k, v in values.items() if k in _GPRS or k == "eflags"}
        if gp:
            r = vcpu.get_regs()
            for k, v in gp.items():
                if k == "eflags":
                    r.rflags = (r.rflags & ~0xFFFF_FFFF) | v
                else:
                    setattr(r, k, v)
            vcpu.set_regs(r)
        sys_ = {k: v for k, v in values.items() if k not in gp}
        if sys_:
            s = vcpu.get_sregs()
            for k, v in sys_.items():
                if k in ("fs_base", "gs_base"):
                    getattr(s, k[:2]).base = v
                else:
                    setattr(s, k, v)
            vcpu.set_sregs(s)
        self._regs = None

    def _walk_args(self) -> tuple[int, bool]:
        regs = self._registers()
        return regs["cr3"], bool(regs["efer"] & EFER_NXE)

    def read_memory(self, addr: int, n: int) -> bytes:
        cr3, nxe = self._walk_args()
        data = read_virtual(self.vm.memory, cr3, addr, n, nxe=nxe)
        if self.bps.int3:
            data = self._hide_int3(addr, data)
        return data

    def _hide_int3(self, addr: int, data: bytes) -> bytes:
        """gdb must see the original bytes under planted int3s."""
        out = bytearray(data)
        for bp, orig in self.bps.int3.items():
            if addr <= bp < addr + len(out):
                out[bp - addr] = orig[0]
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        cr3, nxe = self._walk_args()
        write_virtual(self.vm.memory, cr3, addr, data, write_through=self.write_through, nxe=nxe)

    def _poke(self, addr: int, data: bytes) -> None:
        """A debugger write that ignores W (int3 planting into read-only text)."""
        cr3, nxe = self._walk_args()
        write_virtual(self.vm.memory, cr3, addr, data, write_through=True, nxe=nxe)

    def breakpoint(self, insert: bool, kind: int, addr: int) -> None:
        if insert:
            how = self.bps.insert(kind, addr)
            if how == "int3":
                cr3, nxe = self._walk_args()
                original = read_virtual(self.vm.memory, cr3, addr, 1, nxe=nxe)
                self._poke(addr, b"\xcc")
                self.bps.planted(addr, original)
            self._bp_kind[addr] = kind
        else:
            restore = self.bps.remove(kind, addr)
            if restore is not None:
                self._poke(addr, restore)
            if addr not in self.bps:
                self._bp_kind.pop(addr, None)

    def offsets(self) -> int:
        return self.vm.slide

    def monitor(self, command: str) -> str:
        return run_monitor(self, command)

    # --- helpers -----------------------------------------------------------------------------
    def _symbol(self, rip: int) -> str:
        try:
            return self.vm.symbolizer.format(rip)
        except Exception:  # noqa: BLE001 - a symbol is a nicety, never a failure
            return f"{rip:#x}"

    def _fault_line(self) -> str:
        faults = [r for r in self.vm.reports.reports if r.kind == ReportKind.FAULT]
        if not faults:
            return ""
        f = faults[-1]
        rip = f.int("rip")
        where = self._symbol(rip) if rip is not None else "?"
        return (f"guest fault ({f.fields.get('kind', '?')}): {f.fields.get('name', '')} at {where}, "
                f"address {f.fields.get('addr', '?')}, error {f.fields.get('error', '?')}")

