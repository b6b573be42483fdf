"""What one decoded exit means: ``handle_exit``, a free function.

The run loop (``vmm.vm.Vm.run``) decodes every exit (``vmm.exits``) and hands
it here, the fast port-I/O exits included; tests feed it synthetic exits
without a VM. Policy that depends on run state (a pending ``run_to``
breakpoint, instruction counting, gdb, the read-only kernel slot) comes in an
``ExitPolicy``; what the run loop itself must do (park the vCPU, answer an IN)
comes back as the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import exits as X
from .abi import ExitCode
from .devices import InstructionCounter, PortBus, Stop


class _Park:
    """``handle_exit``'s answer for a point where the run loop may hold the
    vCPU: it was interrupted (a stop request, a pause, gdb), or it reached
    the address a ``run_to`` waits for."""

    def __repr__(self) -> str:
        return "PARK"


PARK = _Park()

Action = Stop | bytes | _Park | None


@dataclass
class ExitPolicy:
    """Run state ``handle_exit`` decides with, beyond the port bus."""

    #: Guest-physical [start, end) ranges backed by KVM_MEM_READONLY slots: a
    #: write there exits as MMIO, and means the guest wrote its own kernel text.
    read_only: list[tuple[int, int]] = field(default_factory=list)
    #: Address of a pending ``Vm.run_to`` instruction breakpoint (DR0).
    run_to: int | None = None
    #: Counts single-stepped instructions while its window is active.
    icount: InstructionCounter | None = None
    #: A ``vmm.gdbstub.Debugger`` when gdb serves this VM: other debug exits are its.
    debugger: object | None = None


NO_POLICY = ExitPolicy()

# Module globals, not `X.IoOut` (two lookups): handle_exit runs once per exit.
_IoOut, _IoIn, _Interrupted, _Debug, _Mmio = X.IoOut, X.IoIn, X.Interrupted, X.Debug, X.Mmio


def handle_exit(exit_: X.Exit, bus: PortBus, policy: ExitPolicy = NO_POLICY) -> Action:
    """Decide what one decoded exit means.

    Returns a ``Stop`` to end the run, bytes to hand back for an IN, ``PARK``
    where the run loop may hold the vCPU, or None to resume the guest.
    """
    cls = exit_.__class__  # `is` tests, port writes first: this runs once per exit
    if cls is _IoOut:
        hit = bus.by_port.get(exit_.port)
        if hit is None:
            return Stop(ExitCode.UNKNOWN_PORT, "unknown-port", f"write to unknown port {exit_.port:#x}")
        device, offset = hit
        size, data = exit_.size, exit_.data
        if len(data) == size:
            return device.io_out(offset, data)
        for i in range(0, len(data), size):  # rep outs: one exit, many items
            stop = device.io_out(offset, data[i : i + size])
            if stop is not None:
                return stop
        return None
    if cls is _IoIn:
        hit = bus.by_port.get(exit_.port)
        if hit is None:
            return Stop(ExitCode.UNKNOWN_PORT, "unknown-port", f"read from unknown port {exit_.port:#x}")
        device, offset = hit
        return device.io_in(offset, exit_.size) * exit_.count
    if cls is _Interrupted:
        return PARK  # the run loop decides (watchdog, request to stop, pause, gdb)
    if cls is _Debug:
        if policy.run_to is not None and exit_.pc == policy.run_to:
            return PARK
        icount = policy.icount
        if icount is not None and icount.active is not None:
            icount.step()  # one single-stepped instruction
            return None
        if policy.debugger is not None:
            return policy.debugger.on_debug_exit(exit_)
        return Stop(ExitCode.HOST_ERROR, "unknown-exit", f"unhandled KVM exit {exit_!r}")
    if cls is _Mmio:
        if exit_.is_write and any(a <= exit_.phys_addr < b for a, b in policy.read_only):
            return Stop(
                ExitCode.KERNEL_WRITE,
                "kernel-write",
                f"guest wrote to read-only kernel memory at guest-physical {exit_.phys_addr:#x} "
                f"(KVM_MEM_READONLY slot; the guest's own page tables cannot lift it)",
            )
        op = "write to" if exit_.is_write else "read from"
        return Stop(ExitCode.UNBACKED_MMIO, "unbacked-mmio", f"MMIO {op} unbacked address {exit_.phys_addr:#x}")
    if cls is X.Hlt:
        return Stop(ExitCode.HALTED, "halted", "guest halted (HLT) with nothing to wake it")
    if cls is X.Shutdown:
        return Stop(ExitCode.TRIPLE_FAULT, "triple-fault", "guest triple-faulted (KVM_EXIT_SHUTDOWN)")
    if cls is X.FailEntry:
        return Stop(
            ExitCode.FAIL_ENTRY,
            "fail-entry",
            f"VM entry failed (hardware reason {exit_.hardware_entry_failure_reason:#x})",
        )
    if cls is X.InternalError:
        return Stop(ExitCode.EMULATION_FAILURE, "internal-error", f"KVM internal error: {exit_.description}")
    if cls is X.SystemEvent:
        return Stop(ExitCode.TRIPLE_FAULT, "system-event", f"system event {exit_.type}")
    return Stop(ExitCode.HOST_ERROR, "unknown-exit", f"unhandled KVM exit {exit_!r}")
