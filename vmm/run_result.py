"""What a run produced: ``RunResult``, and ``build_result`` to make it from a stopped Vm.

Kept apart from the run loop: the loop only counts exits and keeps the
``Stop``; registers, symbols and the fault diagnosis are gathered here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .abi import Backend, ReportKind
from .devices import Stop
from .diagnostics import QUIET_STOPS
from .kvm import KvmError
from .reports import Report


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



def build_result(vm, stop: Stop, nexits: int, start: int, end: int) -> RunResult:
    """The ``RunResult`` of a ``vmm.vm.Vm`` whose run ended with ``stop``: ``nexits``
    exits between perf_counter_ns ``start`` and ``end``."""
    timings = dict(vm.timings_ms)
    timings["run"] = (end - start) / 1e6
    if vm.uart.first_byte_ns is not None:
        timings["to_first_serial_byte"] = (vm.uart.first_byte_ns - vm.setup_done_ns) / 1e6
    if vm.ready_ns is not None:
        timings["to_ready"] = (vm.ready_ns - vm.setup_done_ns) / 1e6
    registers = rip_symbol = None
    message = stop.message
    if stop.reason == "triple-fault" and vm.backend.backend == Backend.SVM:
        # KVM-SVM reinitializes the VMCB and resets the vCPU at a SHUTDOWN
        # intercept (the VMCB is undefined after one, AMD APM 15.11): what the
        # vCPU holds now is the reset state (RIP 0xfff0), not the fault's.
        message += "; registers at the fault are lost (KVM-SVM resets the vCPU on shutdown)"
    elif stop.reason not in ("exit",):
        try:
            registers = vm.register_dump()
            rip_symbol = vm.symbolizer.format(registers["rip"])
        except KvmError:
            pass
    fault_sym = diagnosis = None
    faults = [r for r in vm.reports.reports if r.kind == ReportKind.FAULT]
    if faults and faults[-1].int("rip") is not None:
        fault_sym = vm.symbolizer.format(faults[-1].int("rip"))
    try:
        # Only for stops a developer has to debug: not for READY stops
        # (vmm pt), a clean exit or the user's Ctrl-C/SIGTERM/closed pipe.
        if faults and faults[-1].int("rip") is not None:
            diagnosis = vm.diagnose(faults[-1].int("rip"), faults[-1].int("rbp"))
        elif registers is not None and int(stop.exit_code) not in QUIET_STOPS:
            diagnosis = vm.diagnose(registers["rip"], registers["rbp"])
    except KvmError:
        pass
    return RunResult(
        instruction_counts=dict(vm.icount.counts),
        fault_rip_symbol=fault_sym,
        exit_code=int(stop.exit_code),
        stop_reason=stop.reason,
        message=message,
        backend=vm.backend.name,
        memory_bytes=vm.memory.size,
        kaslr_slide=vm.slide,
        serial=bytes(vm.uart.output),
        reports=list(vm.reports.reports),
        report_errors=list(vm.reports.errors),
        timings_ms=timings,
        exits=nexits,
        registers=registers,
        rip_symbol=rip_symbol,
        diagnosis=diagnosis,
    )
