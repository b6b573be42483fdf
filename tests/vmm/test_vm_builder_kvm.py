"""The setup steps (vmm.vm_builder) on real KVM: what each leaves behind, read back."""

from __future__ import annotations

import pytest

from vmm.abi import BootInfo
from vmm.backend import detect_backend
from vmm.layout import BOOT_INFO_PHYS
from vmm.vm import VmConfig
from vmm.vm_builder import build_machine, memory_slots, protected_ranges

MiB = 1 << 20


def test_slots_cover_ram_with_the_kernel_text_read_only():
    ram = 64 * MiB
    protected = [(0x200000, 0x260000), (0x300000, 0x301000)]
    slots = memory_slots(ram, protected)
    assert slots == [(0, 0x200000, False), (0x200000, 0x60000, True), (0x260000, 0xA0000, False),
                     (0x300000, 0x1000, True), (0x301000, ram - 0x301000, False)]
    assert memory_slots(ram, []) == [(0, ram, False)]


@pytest.mark.kvm
def test_cold_boot_machine_is_ready_to_enter_the_kernel(guest_image):
    config = VmConfig(memory=64 * MiB, slide=0)
    m = build_machine(guest_image, config, detect_backend())
    try:
        layout = m.layout
        regs, sregs = m.vcpu.get_regs(), m.vcpu.get_sregs()
        assert regs.rip == layout.entry and regs.rsp == layout.stack_top
        assert sregs.cr3 == layout.cr3 and sregs.efer & (1 << 10)  # EFER.LMA: long mode active
        assert m.memory.read_u64(BOOT_INFO_PHYS + BootInfo.tsc_khz.offset) == m.tsc_khz
        # Every byte of RAM in exactly one slot; the kernel's read-only segments in read-only ones.
        assert sum(size for _gpa, size, _ro in m.slots) == m.memory.size
        assert [(gpa, gpa + size) for gpa, size, ro in m.slots if ro] == m.protected
        assert m.protected == protected_ranges(guest_image) != []
        assert set(m.timings_ms) >= {"guest_memory", "kvm_create_vm", "vcpu_create", "memory_slots",
                                     "vcpu_state", "setup_total"}
    finally:
        m.close()
    assert (m.kvm, m.vm, m.vcpu, m.memory) == (None, None, None, None)
