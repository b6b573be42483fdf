"""Setting a guest up to run: one function per step, in the order KVM needs.

``build_machine`` opens /dev/kvm, reads the CPUID the vCPU will get, prepares
guest RAM (a cold boot's kernel, page tables and boot info, or a snapshot's
RAM), creates the VM and its vCPU, adds the memory slots (the kernel's
read-only segments in KVM_MEM_READONLY slots), loads the vCPU's registers and
turns on coalesced serial output. It returns a ``Machine``: the KVM objects,
RAM and what the steps decided, with the time each step took. Anything it
made is closed again if a step fails. ``vmm.vm.Vm`` runs the result.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

from .abi import COM1_BASE, Backend, BootInfo
from .backend import BackendInfo
from .boot import BootLayout, choose_slide, prepare_guest
from .cpu import CpuFeatures, cpu_features, cpuid_leaves, entry_regs, long_mode_sregs
from .devices import Uart16550
from .elf import KernelImage
from .kvm import Kvm, KvmError, VcpuFd, VmFd
from . import kvm_abi as K
from .layout import BOOT_INFO_PHYS
from .memory import GuestMemory

_CPUID_CACHE = None


def supported_cpuid(kvm: Kvm) -> tuple:
    """KVM_GET_SUPPORTED_CPUID, and what it offers (``CpuFeatures``): it
    does not change while the process runs, so both are made once."""
    global _CPUID_CACHE
    if _CPUID_CACHE is None:
        cpuid = kvm.get_supported_cpuid()
        _CPUID_CACHE = (cpuid, cpu_features(cpuid_leaves(cpuid)))
    return _CPUID_CACHE


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


@dataclass
class Machine:
    """One guest's KVM objects and RAM, set up to run, and what setup decided."""

    kvm: Kvm | None = None
    vm: VmFd | None = None
    vcpu: VcpuFd | None = None
    memory: GuestMemory | None = None
    cpu_features: CpuFeatures | None = None
    tsc_khz: int = 0
    slide: int = 0
    #: Where the cold boot put things; None for a guest restored from a snapshot.
    layout: BootLayout | None = None
    #: Guest-physical [start, end) of the KVM_MEM_READONLY slots (the kernel's text and rodata).
    protected: list[tuple[int, int]] = field(default_factory=list)
    slots: list[tuple[int, int, bool]] = field(default_factory=list)
    #: Offset of the coalesced ring in the vCPU's mapping when serial output goes through it.
    ring: int | None = None
    #: How dirty pages are tracked (``choose_dirty_tracking``), None without dirty logging.
    dirty_mechanism: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: perf_counter_ns() when setup was done (the guest's first instruction comes next).
    setup_done_ns: int = 0

    def close(self) -> None:
        # The vCPU before the VM before /dev/kvm; RAM once KVM no longer maps it.
        for name in ("vcpu", "vm", "memory", "kvm"):
            obj = getattr(self, name)
            if obj is not None:
                obj.close()
                setattr(self, name, None)


def write_boot_state(m: Machine, image: KernelImage, config, backend: BackendInfo) -> None:
    """A cold boot: kernel, page tables and boot info written into fresh RAM."""
    m.slide = choose_slide(image, config.slide)
    use_1g = direct_map_1g(m.cpu_features, backend.backend) if config.use_1g is None else config.use_1g
    m.layout = prepare_guest(
        m.memory,
        image,
        slide=m.slide,
        cmdline=config.cmdline,
        backend=int(backend.backend),
        tsc_khz=0,  # known once the vCPU exists: patched by create_vcpu
        use_1g=use_1g,
        fresh_memory=True,  # a new memfd: every page reads as zero
    )


def create_vcpu(m: Machine, cpuid, cold_boot: bool) -> None:
    """vCPU 0 with the supported CPUID; its TSC frequency goes into the boot info."""
    m.vcpu = m.vm.create_vcpu(0)
    m.vcpu.set_cpuid2(cpuid)
    try:
        m.tsc_khz = m.vcpu.get_tsc_khz()
    except KvmError:
        m.tsc_khz = 0
    if cold_boot:
        m.memory.write_u64(BOOT_INFO_PHYS + BootInfo.tsc_khz.offset, m.tsc_khz)


#: How the VMM may learn which pages a guest wrote (``vmm.dirty_log``),
#: fastest first as measured on KVM-PVM (README, "Figures"):
#: ``choose_dirty_tracking`` takes the first the host offers.
DIRTY_MECHANISMS = ("bitmap", "manual")


def choose_dirty_tracking(vm: VmFd, wanted: str = "auto") -> str:
    """The dirty-logging mechanism for this host, from KVM_CHECK_EXTENSION
    (never from the machine's name): "bitmap" (plain KVM_GET_DIRTY_LOG,
    which every KVM has) or "manual" (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
    KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of just the pages read).
    ``wanted`` other than "auto" asks for one (the benchmark compares
    them); one the host lacks is an error."""
    offered = ["bitmap"]
    if vm.check_extension(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        offered.append("manual")
    if wanted == "auto":
        return next(m for m in DIRTY_MECHANISMS if m in offered)
    if wanted not in offered:
        raise KvmError(errno.EOPNOTSUPP, f"dirty tracking '{wanted}' is not offered by this KVM "
                                         f"(it offers {', '.join(offered)})")
    return wanted


def offered_dirty_mechanisms() -> list[str]:
    """Every dirty-log mechanism this host offers, best first (asked of a scratch VM)."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        out = []
        for m in DIRTY_MECHANISMS:
            try:
                out.append(choose_dirty_tracking(vm, m))
            except KvmError:
                pass
        return out


def enable_dirty_tracking(m: Machine, config) -> None:
    """Before the slots exist: switch on the mechanism
    ``choose_dirty_tracking`` picks. "manual" goes without INITIALLY_SET, so
    a new slot starts write-protected with an empty log, as with the plain
    bitmap: the first look holds only what the guest wrote, and a fork needs
    no clearing of all of RAM first."""
    if not config.dirty_log:
        return
    m.dirty_mechanism = choose_dirty_tracking(m.vm, config.dirty_mechanism)
    if m.dirty_mechanism == "manual":
        m.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)


def add_memory_slots(m: Machine, image: KernelImage, config) -> None:
    """RAM as KVM memory slots: the kernel's read-only segments in
    KVM_MEM_READONLY slots where the host has them (second-stage protection
    the guest cannot lift), dirty logging on every slot when asked."""
    m.protected = protected_ranges(image) if config.protect_kernel else []
    if m.protected and not m.vm.check_extension(K.KVM_CAP_READONLY_MEM):
        m.protected = []
    m.slots = memory_slots(m.memory.size, m.protected)
    log = K.KVM_MEM_LOG_DIRTY_PAGES if config.dirty_log else 0
    for slot, (gpa, size, readonly) in enumerate(m.slots):
        m.vm.set_user_memory_region(
            slot, gpa, size, m.memory.host_address + gpa, log | (K.KVM_MEM_READONLY if readonly else 0)
        )


def load_entry_state(m: Machine) -> None:
    """Long mode with the boot tables and GDT, RIP at the kernel's entry."""
    layout = m.layout
    m.vcpu.set_sregs(long_mode_sregs(m.vcpu.get_sregs(), layout.cr3, layout.gdt_base))
    m.vcpu.set_regs(entry_regs(layout.entry, layout.stack_top, layout.boot_info_virt))


def coalesce_serial(m: Machine) -> None:
    """Have KVM buffer the guest's serial output (writes to COM1's THR) in
    the vCPU's coalesced ring instead of exiting for each byte, where the
    host supports it (KVM_CAP_COALESCED_PIO). The run loop drains the ring
    before every exit whose handling could be seen after that output, so the
    console keeps its order."""
    if m.vcpu.coalesced_ring_offset() is None or m.vm.check_extension(K.KVM_CAP_COALESCED_PIO) <= 0:
        return
    m.vm.register_coalesced_pio(COM1_BASE + Uart16550.THR, 1)
    m.ring = m.vcpu.use_coalesced_ring()


def build_machine(image: KernelImage, config, backend: BackendInfo, restore=None, *,
                  load_state: bool = True) -> Machine:
    """Every setup step, timed (``Machine.timings_ms``, the names ``vmm bench``
    reports). ``restore`` (a ``vmm.snapshot.machine.RestoreSource``) fills RAM
    and the vCPU from a snapshot instead of booting; if it has a machine
    prepared ahead (``take_machine``: a zygote's spare), only the vCPU state
    is loaded. ``load_state=False`` stops before the vCPU state: such a
    prepared machine."""
    t = time.perf_counter_ns
    t0 = t()
    ahead = restore.take_machine(config) if restore is not None and load_state else None
    if ahead is not None:
        try:
            restore.load_vcpu(ahead.vcpu)
        except BaseException:
            ahead.close()
            raise
        t1 = t()
        ahead.timings_ms = {"prepared_ahead": ahead.timings_ms.get("setup_total", 0.0),
                            "vcpu_state": (t1 - t0) / 1e6, "setup_total": (t1 - t0) / 1e6}
        ahead.setup_done_ns = t1
        return ahead
    m = Machine()
    try:
        # /dev/kvm and the CPUID the vCPU will get come first: the boot
        # tables' page sizes depend on what that CPUID offers.
        m.kvm = Kvm()
        t_open = t()
        cpuid, m.cpu_features = supported_cpuid(m.kvm)
        t_cpuid = t()
        # Guest RAM is prepared before the VM exists: once KVM_CREATE_VM has
        # attached KVM's MMU notifier to this process, every first touch of a
        # fresh page costs noticeably more.
        m.memory = GuestMemory(config.memory, shared=config.shared_memory) if restore is None \
            else restore.make_memory(config)
        t1 = t()
        if restore is None:
            write_boot_state(m, image, config, backend)
        else:
            m.slide = restore.slide
        t2 = t()
        m.vm = m.kvm.create_vm()
        t3 = t()
        enable_dirty_tracking(m, config)
        create_vcpu(m, cpuid, cold_boot=restore is None)
        t4 = t()
        add_memory_slots(m, image, config)
        if config.coalesce_serial:
            coalesce_serial(m)
        t4b = t()
        if restore is None:
            load_entry_state(m)
        elif load_state:
            restore.load_vcpu(m.vcpu)
        t5 = t()
    except BaseException:
        m.close()
        raise
    m.timings_ms = {
        "guest_memory": (t1 - t_cpuid) / 1e6,
        **(m.layout.timings_ms if m.layout is not None else {"restore_state": (t2 - t1) / 1e6}),
        "kvm_create_vm": (t3 - t2 + t_open - t0) / 1e6,  # opening /dev/kvm included, as before
        "vcpu_create": (t4 - t3 + t_cpuid - t_open) / 1e6,  # the CPUID query included, as before
        "memory_slots": (t4b - t4) / 1e6,  # coalesced serial included
        "vcpu_state": (t5 - t4b) / 1e6,
        "setup_total": (t5 - t0) / 1e6,
    }
    m.setup_done_ns = t5
    return m
