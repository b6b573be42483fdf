"""The MP state of our vCPUs: without an in-kernel local APIC (this VMM
creates no irqchip) KVM keeps a vCPU RUNNABLE, so a reset in place need not
load it again (VcpuFd.only_runnable, FastLoader.load). These tests fail if
that stops being true: a guest's HLT then no longer reaches user space as
KVM_EXIT_HLT, or leaves another state behind."""

from __future__ import annotations

import fcntl

import pytest

from vmm import kvm_abi as K
from vmm.kvm import Kvm, KvmError
from vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


def test_a_guest_that_halts_leaves_the_vcpu_runnable(vmm_kernel):
    with Vm(vmm_kernel, VmConfig(memory=64 << 20, cmdline="scenario=hlt", timeout=30)) as vm:
        r = vm.run()
        assert r.stop_reason == "halted", r.message  # HLT exited to user space (KVM_EXIT_HLT)
        assert vm.vcpu.get_mp_state().mp_state == K.KVM_MP_STATE_RUNNABLE
        assert vm.vcpu.only_runnable()
        with pytest.raises(KvmError) as refused:
            vm.vcpu.set_mp_state(K.kvm_mp_state(mp_state=K.KVM_MP_STATE_HALTED))
        assert refused.value.what == "KVM_SET_MP_STATE"
        assert vm.vcpu.get_mp_state().mp_state == K.KVM_MP_STATE_RUNNABLE  # the question changed nothing


def test_with_an_in_kernel_apic_the_answer_is_no_and_the_state_is_kept():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            try:
                fcntl.ioctl(vm.fd, K.KVM_CREATE_IRQCHIP, 0)
            except OSError as exc:
                pytest.skip(f"KVM_CREATE_IRQCHIP: {exc}")
            vcpu = vm.create_vcpu(0)
            try:
                assert vcpu.get_mp_state().mp_state == K.KVM_MP_STATE_RUNNABLE  # the boot vCPU
                assert not vcpu.only_runnable()
                assert vcpu.get_mp_state().mp_state == K.KVM_MP_STATE_RUNNABLE  # HALTED was put back
            finally:
                vcpu.close()
        finally:
            vm.close()
