"""State handed to the next KVM_RUN through kvm_run (VcpuFd.load_synced):
until KVM_RUN takes it, any other vCPU ioctl sees it as already loaded."""

from __future__ import annotations

import pytest

from vmm import kvm_abi as K
from vmm.kvm import Kvm

pytestmark = pytest.mark.kvm


@pytest.fixture
def vcpu():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        if not vm.syncs_regs(K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS | K.KVM_SYNC_X86_EVENTS):
            vm.close()
            pytest.skip("KVM_CAP_SYNC_REGS does not cover regs, sregs and events here")
        cpu = vm.create_vcpu(0)
        yield cpu
        cpu.close()
        vm.close()


def _pending(vcpu):
    regs = vcpu.get_regs()
    regs.rax, regs.rip, regs.rflags = 0x1234_5678, 0xFFF0, 0x2
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0xDEAD_B000  # no CPU check on CR2
    events = vcpu.get_vcpu_events()
    vcpu.load_synced(regs, sregs, events)
    return regs, sregs


def test_a_read_sees_the_pending_state(vcpu):
    _pending(vcpu)
    assert vcpu.run_struct.kvm_dirty_regs != 0
    assert vcpu.get_regs().rax == 0x1234_5678 and vcpu.get_sregs().cr2 == 0xDEAD_B000
    assert vcpu.run_struct.kvm_dirty_regs == 0  # applied by ioctl: KVM_RUN will not load it again


def test_a_later_write_is_not_overwritten(vcpu):
    regs, _ = _pending(vcpu)
    regs.rax = 7
    vcpu.set_regs(regs)  # applies the pending state first, then this
    assert vcpu.run_struct.kvm_dirty_regs == 0
    assert vcpu.get_regs().rax == 7 and vcpu.get_sregs().cr2 == 0xDEAD_B000


def test_any_other_ioctl_applies_it_first(vcpu):
    _pending(vcpu)
    vcpu.get_mp_state()
    assert vcpu.run_struct.kvm_dirty_regs == 0 and vcpu.get_regs().rax == 0x1234_5678


def test_an_image_made_once_loads_as_the_three_structures(vcpu):
    """A reset hands the same registers to every KVM_RUN as one image
    (sync_image, load_synced_image): the same state as load_synced."""
    from vmm.kvm import sync_image

    regs = vcpu.get_regs()
    regs.rbx, regs.rip, regs.rflags = 0xB0B, 0xFFF0, 0x2
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0xC0DE_0000
    image = sync_image(regs, sregs, vcpu.get_vcpu_events())
    vcpu.load_synced_image(image)
    assert vcpu.run_struct.kvm_dirty_regs == K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS | K.KVM_SYNC_X86_EVENTS
    assert vcpu.get_regs().rbx == 0xB0B and vcpu.get_sregs().cr2 == 0xC0DE_0000
    with pytest.raises(ValueError, match="sync image"):
        vcpu.load_synced_image(image[:-1])
