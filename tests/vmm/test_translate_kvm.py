"""mm's walker agrees with the hardware (KVM_TRANSLATE) on a booted guest.

KVM_TRANSLATE on PVM reports validity and the physical address but not
permissions (shared/HOST.md), so this compares exactly those, over the
guest's own final page tables, for thousands of addresses.
"""

import random

import pytest

from mm import walker
from mm.flags import ADDR_MASK

pytestmark = pytest.mark.kvm


def _sample_addresses(runs, rng: random.Random, n_random: int) -> list[int]:
    addrs = []
    for r in runs:
        # both ends of every run, the first byte past it, and a few inside
        addrs += [r.virt, r.virt + r.size - 1, r.virt + r.size]
        addrs += [r.virt + rng.randrange(r.size) for _ in range(4)]
        if r.virt >= 0x1000:
            addrs.append(r.virt - 1)
    for _ in range(n_random):  # mostly unmapped, both halves
        a = rng.getrandbits(47)
        addrs.append(a if rng.random() < 0.5 else a | 0xFFFF_8000_0000_0000)
    return [a for a in addrs if walker.is_canonical(a)] if hasattr(walker, "is_canonical") else addrs


def test_walker_matches_kvm_translate(vmm_vm):
    rng = random.Random(1234)
    # KVM_TRANSLATE sets Accessed bits in the guest's tables (shared/HOST.md):
    # a VM of its own (closed after the test), never one reset for another test.
    vm = vmm_vm("", timeout=30)
    result = vm.run()
    assert result.exit_code == 0, result.message
    cr3 = vm.vcpu.get_sregs().cr3 & ADDR_MASK
    mem = vm.memory
    runs = list(walker.walk(mem, cr3))
    assert runs, "the guest's page tables map nothing"
    addrs = _sample_addresses(runs, rng, 2000)
    assert len(addrs) >= 2000
    mismatches = []
    for a in addrs:
        hw = vm.vcpu.translate(a)
        ours = walker.translate(mem, cr3, a)
        hw_valid = bool(hw.valid)
        if hw_valid != (ours is not None) or (hw_valid and hw.physical_address != ours.phys):
            mismatches.append((hex(a), hw_valid, hex(hw.physical_address), ours))
    assert not mismatches, mismatches[:10]
