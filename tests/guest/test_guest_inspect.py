"""The live-inspection block (docs/ABI.md, "Inspect block"): the host finds
it through the INSPECT report and reads it from guest memory."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from vmm.abi import ReportKind

INSPECT_RS = Path(__file__).resolve().parents[2] / "guest" / "src" / "inspect.rs"

MAGIC = 0x3142_494D_4D56_5950  # b"PYVMMIB1"
SIZE = 800
# name: (offset, struct format), as in docs/ABI.md
FIELDS = {
    "magic": (0, "Q"), "version": (8, "I"), "size": (12, "I"), "seq": (16, "Q"),
    "heap_free_head": (24, "Q"), "heap_start": (32, "Q"), "heap_end": (40, "Q"),
    "heap_free_bytes": (48, "Q"), "heap_large_bytes": (56, "Q"), "frames_free": (64, "Q"),
    "bitmap_phys": (72, "Q"), "bitmap_bits": (80, "Q"), "stack_count": (88, "I"),
    "current_task": (92, "I"), "demand_start": (96, "Q"), "demand_end": (104, "Q"),
    "demand_faults": (112, "Q"), "heap_allocs": (120, "Q"), "heap_frees": (128, "Q"),
    "heap_cached_bytes": (136, "Q"), "workload_iters": (144, "Q"), "heap_index": (152, "Q"),
}
STACKS_OFF, STACK_REC, MAX_STACKS = 160, 40, 16


def parse(raw: bytes) -> dict:
    out = {k: struct.unpack_from("<" + f, raw, off)[0] for k, (off, f) in FIELDS.items()}
    out["stacks"] = [
        dict(zip(("base", "top", "guard_low", "guard_high", "task_id", "flags"),
                 struct.unpack_from("<QQQQII", raw, STACKS_OFF + i * STACK_REC)))
        for i in range(MAX_STACKS)
    ]
    return out


def test_offsets_match_guest_source():
    src = INSPECT_RS.read_text()
    pinned = dict(re.findall(r"offset_of!\(InspectBlock, (\w+)\) == (\d+)", src))
    for name, (off, _) in FIELDS.items():
        if name != "magic":
            assert int(pinned[name]) == off, name
    assert int(pinned["stacks"]) == STACKS_OFF
    assert f"INSPECT_SIZE: usize = {SIZE}" in src


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
