"""The live-inspection block (docs/ABI.md, "Inspect block"): the host finds
it through the INSPECT report and reads it from guest memory."""

from __future__ import annotations

import threading
import time

import pytest

from vmm.abi import INSPECT_BLOCK_MAGIC as MAGIC
from vmm.abi import INSPECT_BLOCK_SIZE as SIZE
from vmm.abi import InspectBlockRaw, ReportKind, StackRecord


def parse(raw: bytes) -> dict:
    """The block's fields by name, through the host's one definition (vmm/abi.py)."""
    block = InspectBlockRaw.from_buffer_copy(raw)
    out = {name: getattr(block, name) for name, *_ in InspectBlockRaw._fields_ if name != "stacks"}
    out["stacks"] = [{name: getattr(r, name) for name, *_ in StackRecord._fields_} for r in block.stacks]
    return out


@pytest.mark.kvm
def test_block_readable_and_current(vmm_boot):
    run = vmm_boot("")
    assert run.exit_code == 0, run.describe()
    (ins,) = run.reports_of(ReportKind.INSPECT)
    phys, virt = ins.int("inspect_block_phys"), ins.int("inspect_block_virt")
    t = run.translate(virt)
    assert t is not None and int(t.phys) == phys
    b = parse(run.read_phys(phys, SIZE))
    assert b["magic"] == MAGIC and b["version"] == 1 and b["size"] == SIZE
    assert b["seq"] % 2 == 0
    assert b["heap_start"] == ins.int("heap_start")
    # The default TLSF heap publishes its index (the free-list head is the list allocator's).
    assert b["heap_free_head"] == 0 and b["heap_index"] == ins.int("heap_index") != 0
    assert ins.get("heap_allocator") == "tlsf"
    assert b["bitmap_phys"] == ins.int("bitmap_phys")
    assert b["bitmap_bits"] == ins.int("bitmap_bits")
    assert 0 < b["frames_free"] <= b["bitmap_bits"]
    assert ins.int("kernel_phys_start") == 0x10_0000
    assert ins.int("kernel_phys_end") > ins.int("kernel_phys_start")


@pytest.mark.kvm
def test_workload_mm_runs_and_keeps_block_current(vmm_boot):
    run = vmm_boot("workload=mm workload_ms=1100", timeout=30)
    assert run.exit_code == 0, run.describe()
    lines = run.serial.splitlines()
    status = [line for line in lines if line.startswith("workload: t=")]
    assert 1 <= len(status) <= 2, status
    assert any(line.startswith("workload: done, ") for line in lines)
    (ins,) = run.reports_of(ReportKind.INSPECT)
    b = parse(run.read_phys(ins.int("inspect_block_phys"), SIZE))
    assert b["workload_iters"] > 10
    assert b["seq"] % 2 == 0
    assert b["heap_allocs"] > b["workload_iters"] // 4
    # Workers were reaped: only task 0's stack is left.
    live = [s for s in b["stacks"] if s["flags"] & 1]
    assert [s["task_id"] for s in live] == [0] and b["stack_count"] == 1


@pytest.mark.kvm
@pytest.mark.parametrize("workload", ["mm", "compute"])
def test_the_host_ends_a_workload_early(vmm_vm, workload):
    """Without `workload_ms` the loop runs until stopped; ``Vm.end_work``
    ends it as its deadline would (the guest frees everything, exits 0)."""
    vm = vmm_vm(f"workload={workload}", timeout=30)
    started = f"workload: {workload}, until stopped".encode()

    def watch():
        deadline = time.monotonic() + 30
        while started not in vm.uart.output and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.end_work()

    t = threading.Thread(target=watch)
    t.start()
    try:
        result = vm.run()
    finally:
        t.join()
    assert result.exit_code == 0, result.message  # not the watchdog's 124
    assert started in result.serial and b"workload: done, " in result.serial
