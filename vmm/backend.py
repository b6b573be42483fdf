"""Which hardware-virtualization backend KVM uses on this host.

On a VMX (Intel) or SVM (AMD) host, guest code runs at hardware speed. On
KVM-PVM (a KVM guest inside a cloud VM, no hardware virtualization), guest
code at CPL0 is executed by KVM's instruction emulator: every in-guest figure
must say which backend produced it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .abi import Backend
from .host_cpuid import hypervisor_signature


# Hypervisor signatures (CPUID 0x40000000) under which "hardware virtualization" is itself emulated.
EMULATORS = {"TCGTCGTCGTCG": "QEMU TCG"}


@dataclass(frozen=True)
class BackendInfo:
    backend: Backend
    module: str
    cpu_model: str
    detail: str
    # The hypervisor this host itself runs under (CPUID 0x40000000 signature), and
    # the emulator's name when that hypervisor emulates the CPU (VMX/SVM under QEMU TCG).
    host_hypervisor: str | None = None
    nested_under: str | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def banner(self) -> str:
        return f"KVM backend: {self.name} ({self.detail}); CPU: {self.cpu_model}"

    def to_json(self) -> dict:
        return {"backend": self.name, "module": self.module, "cpu_model": self.cpu_model, "detail": self.detail,
                "host_hypervisor": self.host_hypervisor, "nested_under": self.nested_under}

    @property
    def emulated(self) -> bool:
        """Guest code at every CPL runs in an emulator: no figure is hardware speed."""
        return self.nested_under is not None


def _host_hypervisor() -> str | None:
    try:
        return hypervisor_signature()
    except (OSError, ValueError, AttributeError):  # no executable mapping allowed here
        return None


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@functools.lru_cache(maxsize=4)
def detect_backend(sys_module: str = "/sys/module", cpuinfo_path: str = "/proc/cpuinfo") -> BackendInfo:
    """Look at the loaded KVM vendor module (the authority) and the CPU flags.

    Cached: neither changes while the process runs, and every Vm asks.
    """
    try:
        with open(cpuinfo_path) as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    model = _cpu_model(cpuinfo)
    hv = _host_hypervisor()
    loaded = {m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.isdir(os.path.join(sys_module, m))}
    if "kvm_pvm" in loaded:
        return BackendInfo(Backend.PVM, "kvm_pvm", model, "CPL0 guest code emulated, CPL3 native", hv)
    emulator = EMULATORS.get(hv or "")
    detail = "hardware virtualization"
    if emulator:
        detail = f"hardware virtualization nested under {emulator}: emulated, not hardware speed"
    if "kvm_intel" in loaded:
        return BackendInfo(Backend.VMX, "kvm_intel", model, detail, hv, emulator)
    if "kvm_amd" in loaded:
        return BackendInfo(Backend.SVM, "kvm_amd", model, detail, hv, emulator)
    return BackendInfo(Backend.UNKNOWN, "none", model, "no KVM vendor module found")
