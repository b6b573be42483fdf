"""KVM_SET_MSRS through the safe layer: a short count is an error naming the MSR."""

from __future__ import annotations

import pytest

from vmm.kvm import Kvm, MsrRefused, msr_batch

pytestmark = pytest.mark.kvm

IA32_SYSENTER_CS, IA32_SYSENTER_ESP = 0x174, 0x175
NO_SUCH_MSR = 0xDEAD_0000  # in no architectural or KVM range


@pytest.fixture
def vcpu():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        cpu = vm.create_vcpu(0)
        yield cpu
        cpu.close()
        vm.close()


def test_set_msrs_sets_them(vcpu):
    vcpu.set_msrs({IA32_SYSENTER_CS: 0x10, IA32_SYSENTER_ESP: 0x8000})
    assert vcpu.get_msrs([IA32_SYSENTER_CS, IA32_SYSENTER_ESP]) == {IA32_SYSENTER_CS: 0x10, IA32_SYSENTER_ESP: 0x8000}


def test_short_count_names_the_first_refused_msr(vcpu):
    with pytest.raises(MsrRefused, match="0xdead0000 = 0x1") as refused:
        vcpu.set_msrs({IA32_SYSENTER_CS: 0x18, NO_SUCH_MSR: 1, IA32_SYSENTER_ESP: 5})
    assert (refused.value.index, refused.value.position) == (NO_SUCH_MSR, 1)
    # KVM stops at the refused one: the MSR before it is set, the one after is not.
    assert vcpu.get_msrs([IA32_SYSENTER_CS, IA32_SYSENTER_ESP]) == {IA32_SYSENTER_CS: 0x18, IA32_SYSENTER_ESP: 0}


def test_a_prebuilt_batch_is_set_again(vcpu):
    batch = msr_batch({IA32_SYSENTER_CS: 0x20})
    for _ in range(2):
        vcpu.set_msrs(batch)
        assert vcpu.get_msrs([IA32_SYSENTER_CS]) == {IA32_SYSENTER_CS: 0x20}
        vcpu.set_msrs({IA32_SYSENTER_CS: 0})
    with pytest.raises(MsrRefused):
        vcpu.set_msrs(msr_batch({NO_SUCH_MSR: 1}))
