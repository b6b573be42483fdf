"""gdb stub: what debugging costs, each figure beside the bare work without gdb.

The guest is held before its first instruction (as ``--gdb-wait``) and a
client in another thread speaks the remote protocol over a UNIX socket, in
no-ack mode as gdb does:

- ``m`` of 4 KiB at the kernel's entry: one request/reply round trip,
  beside the host's own walk of CR3 plus a 4 KiB read of guest RAM;
- ``stepi``: ``vCont;s`` round trips per second, beside one single-stepped
  KVM_RUN without gdb (KVM_SET_GUEST_DEBUG SINGLESTEP, KVM_RUN, KVM_EXIT_DEBUG);
- continue to a breakpoint N instructions ahead (Z0 + ``vCont;c`` until the
  stop reply), beside the same N instructions run to the same hardware
  breakpoint set directly with KVM_SET_GUEST_DEBUG, no gdb.

The address N instructions ahead is found by single-stepping the boot path
once; every run boots afresh, so the path is the same each time.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

from .. import kvm_abi as K
from ..abi import ExitCode
from ..devices import Stop
from ..gdbstub.breakpoints import GUESTDBG_ENABLE, GUESTDBG_SINGLESTEP, GUESTDBG_USE_HW_BP, dr7_for
from ..gdbstub.debugger import Debugger
from ..gdbstub.memory import read_virtual
from ..gdbstub.packets import Framer, Packet, encode
from ..gdbstub.server import GdbAddress
from ..vm import Vm, VmConfig
from .stats import Section, rate, summarize

GUEST_RAM = 64 << 20
STEPS = 200  # stepi round trips per run
AHEAD = 2000  # instructions between the stop and the breakpoint


def _client(path: str, body, out: dict) -> None:
    sock = None
    try:
        for _ in range(200):
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                break
            except OSError:
                sock.close()
                sock = None
                time.sleep(0.01)
        framer = Framer(limit=1 << 20)
        pending: list = []

        def ask(payload: bytes) -> bytes:
            sock.sendall(encode(payload))
            while True:
                while not pending:
                    pending.extend(e for e in framer.feed(sock.recv(65536)) if isinstance(e, Packet))
                p = pending.pop(0).payload
                if not p.startswith(b"O") or p == b"OK":  # O + hex is console output
                    return p

        ask(b"qSupported:swbreak+;hwbreak+")
        sock.sendall(b"+")
        ask(b"QStartNoAckMode")
        body(ask, out)
        ask(b"D")
    except Exception as exc:  # report, never hang the vCPU thread
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if sock is not None:
            sock.close()


def _gdb_run(image, body, backend) -> dict:
    out: dict = {"error": ""}
    with tempfile.TemporaryDirectory() as tmp, Vm(image, VmConfig(memory=GUEST_RAM, timeout=120, slide=0), backend=backend) as vm:
        path = os.path.join(tmp, "gdb.sock")
        with Debugger(vm, GdbAddress("unix", path=path), wait=True):
            t = threading.Thread(target=_client, args=(path, body, out), daemon=True)
            t.start()
            vm.run()
            t.join(10)
    return out


def _reg(reply: bytes, n: int) -> int:
    return int.from_bytes(bytes.fromhex(reply.decode()), "little") if len(reply) == 16 else -1


def _path_ahead(image, backend, n: int) -> int:
    """The RIP single-stepping reaches after ``n`` instructions of boot, first reached there."""
    seen: list[int] = []

    def body(ask, out):
        for _ in range(n):
            ask(b"vCont;s")
            seen.append(_reg(ask(b"p10"), 16))

    out = _gdb_run(image, body, backend)
    if out["error"]:
        raise RuntimeError(out["error"])
    target = seen[-1]
    if target in seen[:-1]:
        for i in range(len(seen) - 1, -1, -1):  # the last address visited only once
            if seen.count(seen[i]) == 1:
                return seen[i]
    return target


class _BareBreakpoint:
    """Run-loop hooks without gdb: a hardware breakpoint set straight through
    KVM_SET_GUEST_DEBUG, timed from the first KVM_RUN to KVM_EXIT_DEBUG."""

    holding = False
    pending = False

    def __init__(self, vm: Vm, addr: int):
        self.vm, self.addr = vm, addr
        self.t0 = self.t1 = 0

    def on_start(self):
        self.vm.vcpu.set_guest_debug(GUESTDBG_ENABLE | GUESTDBG_USE_HW_BP, [self.addr, 0, 0, 0, 0, 0, 0, dr7_for(1)])
        self.t0 = time.perf_counter_ns()
        return None

    def on_debug_exit(self, ex):
        self.t1 = time.perf_counter_ns()
        return Stop(ExitCode.SUCCESS, "bench-bp", "breakpoint reached")

    def on_interrupt(self):
        return None

    def on_guest_stop(self, stop):
        return stop


def measure(image, runs: int, backend=None) -> dict:
    s: dict = {"m_us": [], "walk_read_us": [], "stepi_us": [], "kvm_step_us": [], "cont_ms": [], "bare_ms": [],
               "error": ""}
    entry = None

    def body(ask, out):
        nonlocal entry
        rip = _reg(ask(b"p10"), 16)
        entry = rip
        ask(b"m%x,1000" % rip)  # warm-up
        for _ in range(20):
            t0 = time.perf_counter_ns()
            reply = ask(b"m%x,1000" % rip)
            s["m_us"].append((time.perf_counter_ns() - t0) / 1e3)
            assert len(reply) == 0x2000, reply[:20]
        t_steps = time.perf_counter_ns()
        for _ in range(STEPS):
            ask(b"vCont;s")
        s["stepi_us"].append((time.perf_counter_ns() - t_steps) / 1e3 / STEPS)

    for _ in range(runs):
        out = _gdb_run(image, body, backend)
        if out["error"]:
            s["error"] = out["error"]
            return s

    # Bare costs in the same process: a walk + 4 KiB read; one single-stepped KVM_RUN.
    with Vm(image, VmConfig(memory=GUEST_RAM, timeout=60, slide=0), backend=backend) as vm:
        sregs = vm.vcpu.get_sregs()
        pm = vm.memory
        for _ in range(20 * runs):
            t0 = time.perf_counter_ns()
            read_virtual(pm, sregs.cr3, entry, 4096)
            s["walk_read_us"].append((time.perf_counter_ns() - t0) / 1e3)
        vm.vcpu.set_guest_debug(GUESTDBG_ENABLE | GUESTDBG_SINGLESTEP)
        for _ in range(STEPS):
            t0 = time.perf_counter_ns()
            reason = vm.vcpu.run()
            if reason == K.KVM_EXIT_DEBUG:  # a port exit in between is not a step: not counted
                s["kvm_step_us"].append((time.perf_counter_ns() - t0) / 1e3)

    target = _path_ahead(image, backend, AHEAD)

    def cont(ask, out):
        ask(b"Z0,%x,1" % target)
        t0 = time.perf_counter_ns()
        reply = ask(b"vCont;c")
        s["cont_ms"].append((time.perf_counter_ns() - t0) / 1e6)
        if not reply.startswith(b"T05"):
            out["error"] = f"continue did not stop at the breakpoint: {reply[:40]!r}"

    for _ in range(runs):
        out = _gdb_run(image, cont, backend)
        if out["error"]:
            s["error"] = out["error"]
            return s
        with Vm(image, VmConfig(memory=GUEST_RAM, timeout=60, slide=0), backend=backend) as vm:
            hook = vm.debugger = _BareBreakpoint(vm, target)
            result = vm.run()
            if result.stop_reason == "bench-bp":
                s["bare_ms"].append((hook.t1 - hook.t0) / 1e6)
    return s


def section_from(s: dict) -> Section:
    sec = Section("gdb", "gdb stub (remote protocol over a UNIX socket, no-ack mode)")
    if s["m_us"]:
        sec.add("m_4k", "m packet: read 4 KiB of kernel text, round trip", summarize(s["m_us"], "us"),
                baseline=summarize(s["walk_read_us"], "us") if s["walk_read_us"] else None,
                baseline_label="host walk of CR3 + 4 KiB read")
    if s["stepi_us"]:
        step = summarize(s["stepi_us"], "us")
        sec.add("stepi_per_s", "stepi (vCont;s round trips) per second", rate(step),
                baseline=rate(summarize(s["kvm_step_us"], "us")) if s["kvm_step_us"] else None,
                baseline_label="single-stepped KVM_RUN, no gdb")
        sec.add("stepi_us", "one stepi", step, indent=1,
                baseline=summarize(s["kvm_step_us"], "us") if s["kvm_step_us"] else None,
                baseline_label="one single-stepped KVM_RUN")
    if s["cont_ms"]:
        sec.add("continue_to_bp", f"continue to a breakpoint {AHEAD} instructions ahead", summarize(s["cont_ms"], "ms"),
                baseline=summarize(s["bare_ms"], "ms") if s["bare_ms"] else None,
                baseline_label="same instructions to the same hardware breakpoint, no gdb")
    if s["error"]:
        sec.message = s["error"]
        if not sec.rows:
            sec.status = "error"
    return sec


def run(image, runs: int, backend=None) -> Section:
    return section_from(measure(image, runs, backend))
