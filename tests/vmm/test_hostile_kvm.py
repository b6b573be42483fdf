"""Hostile guests: the host stays up, reports what happened, and the
inspector stays within bounds on whatever the guest left in its tables."""

import os
import time

import pytest

from mm import PageSize, PteFlags
from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from tests import hostile
from vmm.abi import ExitCode
from vmm.backend import detect_backend
from vmm.elf import parse_kernel
from vmm.inspector.snapshot import take_snapshot
from vmm.inspector.target import LocalTarget
from vmm.inspector.views import inspect
from vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm
RAM = 32 << 20


def _run(elf: bytes, **kw):
    cfg = dict(memory=RAM, timeout=20)
    cfg.update(kw)
    with Vm(parse_kernel(elf), VmConfig(**cfg)) as vm:
        result = vm.run()
        t0 = time.perf_counter()
        view = inspect(take_snapshot(LocalTarget(vm)), vm.memory)  # must never raise
        inspect_s = time.perf_counter() - t0
    return result, view, inspect_s


def test_kernel_text_write_stopped_by_readonly_slot():
    result, _, _ = _run(hostile.write_own_text())
    assert result.exit_code == ExitCode.KERNEL_WRITE, result.message
    assert "read-only kernel memory" in result.message and "0x100" in result.message
    assert result.registers is not None  # register dump with the faulting RIP


def test_text_write_succeeds_without_the_slot():
    """The control: with protection off, the same guest writes its text and exits 0x42."""
    result, _, _ = _run(hostile.write_own_text(), protect_kernel=False)
    assert result.exit_code == 0x42


def test_garbage_page_tables():
    result, view, seconds = _run(hostile.garbage_page_tables())
    assert result.exit_code in (0x42, ExitCode.TRIPLE_FAULT, ExitCode.EMULATION_FAILURE), result.message
    if result.exit_code == ExitCode.TRIPLE_FAULT and result.backend == "SVM":
        pytest.skip("SVM: KVM-SVM resets the vCPU at the triple fault's shutdown intercept; CR3 no longer points at the garbage")
    kinds = {f.kind for f in view.findings}
    assert kinds & {"reserved_bits", "table_outside_ram", "leaf_outside_ram"}, kinds
    assert seconds < 30


def test_cyclic_page_tables():
    result, view, seconds = _run(hostile.cyclic_page_tables())
    assert result.exit_code in (0x42, ExitCode.TRIPLE_FAULT), result.message
    assert {f.kind for f in view.findings} & {"cycle", "shared_table"}
    assert seconds < 30


_SVM_SHUTDOWN_RESETS = pytest.mark.skipif(
    detect_backend().name == "SVM",
    reason="SVM: KVM-SVM resets the vCPU at the triple fault's shutdown intercept, so CR3 and RIP at the fault are gone",
)


@_SVM_SHUTDOWN_RESETS
def test_cr3_inside_maxphyaddr_outside_ram():
    """A legal CR3 (no bit at or above the vCPU's MAXPHYADDR) that points past
    guest RAM: the guest dies on its next fetch, the inspector says where CR3 went."""
    with Vm(parse_kernel(hostile.cr3_outside_ram()), VmConfig(memory=RAM, timeout=20)) as vm:
        result = vm.run()
        cr3 = vm.vcpu.get_sregs().cr3
        view = inspect(take_snapshot(LocalTarget(vm)), vm.memory)
        maxphyaddr = vm.cpu_features.maxphyaddr
    assert result.exit_code in (ExitCode.TRIPLE_FAULT, ExitCode.EMULATION_FAILURE, ExitCode.UNBACKED_MMIO), result.message
    # The guest computed its CR3 from its own CPUID; the host's decode of the vCPU agrees.
    assert cr3 & ~0xFFF == (1 << (maxphyaddr - 1)) | 0x5000, (hex(cr3), maxphyaddr)
    found = [f for f in view.findings if f.kind == "cr3_outside_ram"]
    assert found, {f.kind for f in view.findings}
    assert not any(f.kind == "reserved_bits" for f in view.findings)


@_SVM_SHUTDOWN_RESETS  # (and nested under QEMU TCG, MOV CR3 gives SVM_EXIT_ERR instead of the #GP the SDM/APM specify)
def test_cr3_with_reserved_bits_faults_and_is_reported():
    """Bit MAXPHYADDR set in CR3: MOV to CR3 raises #GP (no IDT: triple fault).
    CR3 keeps its old value, and the host's report names the faulting instruction."""
    with Vm(parse_kernel(hostile.cr3_reserved_bits()), VmConfig(memory=RAM, timeout=20)) as vm:
        boot_cr3 = vm.layout.cr3
        result = vm.run()
        cr3 = vm.vcpu.get_sregs().cr3
        view = inspect(take_snapshot(LocalTarget(vm)), vm.memory)
    assert result.exit_code == ExitCode.TRIPLE_FAULT, result.message
    assert cr3 & ~0xFFF == boot_cr3 & ~0xFFF, (hex(cr3), hex(boot_cr3))
    assert result.registers is not None
    assert result.registers["rip"] == hostile.HIGH + hostile.CR3_RESERVED_MOV_OFFSET, hex(result.registers["rip"])
    assert not any(f.kind in ("cr3_outside_ram", "reserved_bits") for f in view.findings)


def test_serial_spam_is_bounded():
    result, _, _ = _run(hostile.serial_spam(20000))
    assert result.exit_code == 0
    assert len(result.serial) == 20000 and set(result.serial) == {ord("A")}


def test_endless_loop_watchdog():
    result, _, _ = _run(hostile.endless_loop(), timeout=0.5)
    assert result.exit_code == ExitCode.TIMEOUT


def test_triple_fault():
    result, _, _ = _run(hostile.triple_fault())
    assert result.exit_code == ExitCode.TRIPLE_FAULT


def test_unknown_port():
    result, _, _ = _run(hostile.unknown_port())
    assert result.exit_code == ExitCode.UNKNOWN_PORT and "0x80" in result.message


def test_mmio_beyond_ram():
    virt = 0xFFFF_9000_0000_0000
    with Vm(parse_kernel(hostile.mmio_write(virt)), VmConfig(memory=RAM, timeout=20)) as vm:
        # Play the guest mapping a device window: a page beyond the end of RAM.
        frames = BumpFrameAllocator(0x50000, 0x60000)  # free frames of the low conventional area
        mapper = Mapper(vm.memory, vm.layout.cr3, frames)
        mapper.map(virt, RAM + 0x10_0000, PageSize.SIZE_4K, PteFlags.PRESENT | PteFlags.WRITABLE | PteFlags.NO_EXECUTE)
        result = vm.run()
    assert result.exit_code == ExitCode.UNBACKED_MMIO, result.message
    assert f"{RAM + 0x10_0000:#x}" in result.message


def test_report_channel_outside_ram():
    result, _, _ = _run(hostile.report_outside_ram())
    assert result.exit_code == 0
    assert len(result.report_errors) == 2
    assert "outside guest RAM" in result.report_errors[0] and "magic" in result.report_errors[1]


def test_host_survives_many_hostile_boots_without_leaking_fds():
    before = len(os.listdir("/proc/self/fd"))
    for make in (hostile.triple_fault, hostile.unknown_port, hostile.cr3_outside_ram, hostile.cr3_reserved_bits, hostile.garbage_page_tables):
        for _ in range(5):
            _run(make())
    assert len(os.listdir("/proc/self/fd")) <= before + 2


@pytest.mark.parametrize("where", ["kernel text (read-only slot)", "outside RAM", "misaligned"])
def test_end_flag_the_host_must_not_write_stops_the_run(where):
    """The guest names the word the host writes when it ends the guest's work:
    the host never writes into the read-only kernel slots or outside RAM."""
    addr = {"kernel text (read-only slot)": 0x100000, "outside RAM": RAM + 0x1000, "misaligned": 0x110001}[where]
    with Vm(parse_kernel(hostile.end_flag_at(addr)), VmConfig(memory=RAM, timeout=20)) as vm:
        text = vm.memory.read(0x100000, 64)
        result = vm.run()
        vm.end_work()
        assert vm.memory.read(0x100000, 64) == text
    assert result.exit_code == ExitCode.BAD_REPORT and "end-of-work flag" in result.message, result.message


def test_end_flag_is_rung_by_end_work_and_cleared_by_a_reset():
    with Vm(parse_kernel(hostile.end_flag_at(0x110000)), VmConfig(memory=RAM, timeout=20)) as vm:
        result = vm.run()
        assert result.exit_code == 0, result.message
        assert vm.memory.read(0x110000, 4) == bytes(4)
        vm.end_work()
        assert vm.memory.read(0x110000, 4) == (1).to_bytes(4, "little")
        vm.reset_devices()  # what a reset in place does besides RAM and vCPU (no dirty log sees host writes)
        assert vm.memory.read(0x110000, 4) == bytes(4)
