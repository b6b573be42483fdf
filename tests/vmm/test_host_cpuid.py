"""CPUID executed by this process agrees with what the kernel read from the same CPU."""

from __future__ import annotations

from vmm.backend import EMULATORS, detect_backend
from vmm.host_cpuid import cpuid, hypervisor_signature


def _cpuinfo() -> dict[str, str]:
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if ":" in line:
                k, v = line.split(":", 1)
                info.setdefault(k.strip(), v.strip())
            elif not line.strip() and info:
                break
    return info


def test_vendor_string_matches_proc_cpuinfo():
    _, b, c, d = cpuid(0)
    vendor = b"".join(x.to_bytes(4, "little") for x in (b, d, c)).decode()  # EBX, EDX, ECX
    assert vendor == _cpuinfo()["vendor_id"]


def test_hypervisor_bit_matches_the_kernels_flag():
    flags = _cpuinfo()["flags"].split()
    assert bool(cpuid(1)[2] >> 31 & 1) == ("hypervisor" in flags)
    sig = hypervisor_signature()
    assert (sig is not None) == ("hypervisor" in flags)


def test_backend_reports_emulation_exactly_under_an_emulator():
    info = detect_backend()
    assert info.host_hypervisor == hypervisor_signature()
    assert info.emulated == (info.host_hypervisor in EMULATORS and info.name in ("SVM", "VMX"))
    assert ("not hardware speed" in info.banner) == info.emulated
