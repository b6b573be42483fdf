"""Control-register bits and the long-mode entry state of the boot vCPU."""

from __future__ import annotations

from dataclasses import dataclass

from . import gdt
from .kvm_abi import kvm_regs, kvm_sregs

# CR0 (SDM Vol. 3A, 2.5)
CR0_PE = 1 << 0  # protected mode
CR0_MP = 1 << 1  # monitor coprocessor
CR0_ET = 1 << 4  # extension type (hardwired 1 on modern CPUs)
CR0_NE = 1 << 5  # native FPU error reporting
CR0_WP = 1 << 16  # supervisor writes honour read-only pages (W^X needs it)
CR0_AM = 1 << 18
CR0_CD = 1 << 30
CR0_PG = 1 << 31  # paging

# CR4
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5  # required for long mode
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9  # left clear: the kernel uses no SSE (shared/HOST.md)
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
CR4_FSGSBASE = 1 << 16
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21

# EFER (MSR 0xC0000080)
EFER_SCE = 1 << 0
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (set directly: we skip the 32-bit step)
EFER_NXE = 1 << 11  # makes PTE bit 63 mean no-execute

BOOT_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
BOOT_CR4 = CR4_PAE
BOOT_EFER = EFER_LME | EFER_LMA | EFER_NXE

RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1

_NAMES = {
    "cr0": {CR0_PE: "PE", CR0_MP: "MP", CR0_ET: "ET", CR0_NE: "NE", CR0_WP: "WP", CR0_AM: "AM", CR0_CD: "CD", CR0_PG: "PG"},
    "cr4": {
        CR4_PSE: "PSE", CR4_PAE: "PAE", CR4_PGE: "PGE", CR4_OSFXSR: "OSFXSR", CR4_OSXMMEXCPT: "OSXMMEXCPT",
        CR4_UMIP: "UMIP", CR4_FSGSBASE: "FSGSBASE", CR4_SMEP: "SMEP", CR4_SMAP: "SMAP",
    },
    "efer": {EFER_SCE: "SCE", EFER_LME: "LME", EFER_LMA: "LMA", EFER_NXE: "NXE"},
}


def decode_bits(register: str, value: int) -> list[str]:
    """Names of the set bits we know in cr0/cr4/efer."""
    return [name for bit, name in _NAMES[register].items() if value & bit]


def long_mode_sregs(sregs: kvm_sregs, cr3: int, gdt_base: int) -> kvm_sregs:
    """Fill ``sregs`` (as read from the vCPU) with the 64-bit entry state."""
    code = gdt.segment_from_entry(gdt.KERNEL_CS, gdt.CODE64)
    data = gdt.segment_from_entry(gdt.KERNEL_DS, gdt.DATA)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base = gdt_base
    sregs.gdt.limit = len(gdt.BOOT_GDT) * 8 - 1
    # IDT left empty: an exception before the guest installs its own IDT is a
    # triple fault, which the host reports as such.
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = BOOT_CR0
    sregs.cr3 = cr3
    sregs.cr4 = BOOT_CR4
    sregs.efer = BOOT_EFER
    return sregs


def entry_regs(rip: int, rsp: int, rdi: int) -> kvm_regs:
    regs = kvm_regs()
    regs.rip = rip
    regs.rsp = rsp
    regs.rdi = rdi
    regs.rflags = RFLAGS_RESERVED
    return regs


# --- what the vCPU reports (CPUID as set on it) ------------------------------------------
CPUID_EXT_MAX = 0x8000_0000  # EAX: highest extended leaf
CPUID_EXT_FEATURES = 0x8000_0001  # EDX bit 26: 1 GiB pages (Page1GB)
CPUID_ADDRESS_SIZES = 0x8000_0008  # EAX[7:0]: MAXPHYADDR, EAX[15:8]: linear-address bits
CPUID_PAGE1GB = 1 << 26
#: SDM 4.1.4: without leaf 0x80000008 a CPU with PAE has MAXPHYADDR 36.
MAXPHYADDR_FALLBACK = 36


@dataclass(frozen=True)
class CpuFeatures:
    """Paging facts of the vCPU: what a walker must know to judge entries like the CPU does.

    Decoded from the CPUID table the VMM sets on the vCPU. On KVM-PVM the CPUID
    instruction in the guest sees host-like values (shared/HOST.md); for these
    leaves that is the same host's MAXPHYADDR and the same (absent) Page1GB bit.
    """

    maxphyaddr: int = 52
    linear_bits: int = 48
    gbpages: bool = True

    def to_json(self) -> dict:
        return {"maxphyaddr": self.maxphyaddr, "linear_bits": self.linear_bits, "gbpages": self.gbpages}


def cpu_features(cpuid: dict[int, tuple[int, int, int, int]]) -> CpuFeatures:
    """CpuFeatures from ``{leaf: (eax, ebx, ecx, edx)}`` (subleaf 0)."""
    ext_max = cpuid.get(CPUID_EXT_MAX, (0, 0, 0, 0))[0]
    gbpages = ext_max >= CPUID_EXT_FEATURES and bool(cpuid.get(CPUID_EXT_FEATURES, (0, 0, 0, 0))[3] & CPUID_PAGE1GB)
    if ext_max >= CPUID_ADDRESS_SIZES and CPUID_ADDRESS_SIZES in cpuid:
        eax = cpuid[CPUID_ADDRESS_SIZES][0]
        phys, linear = eax & 0xFF, (eax >> 8) & 0xFF
    else:
        phys, linear = MAXPHYADDR_FALLBACK, 48
    if not 32 <= phys <= 52:  # a nonsense table: assume the architectural limit
        phys = 52
    return CpuFeatures(maxphyaddr=phys, linear_bits=linear or 48, gbpages=gbpages)


def cpuid_leaves(cpuid2) -> dict[int, tuple[int, int, int, int]]:
    """``{leaf: (eax, ebx, ecx, edx)}`` of subleaf 0 from a kvm_cpuid2 buffer."""
    out = {}
    for i in range(cpuid2.nent):
        e = cpuid2.entries[i]
        if e.index == 0 and e.function not in out:
            out[e.function] = (e.eax, e.ebx, e.ecx, e.edx)
    return out
