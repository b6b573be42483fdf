"""Boot the guest kernel under the VMM: scenarios, reports, in-guest tests.

Uses the `boot` fixture (tests/conftest.py) and the `kvm` marker: skipped
with the reason where /dev/kvm is unusable. One boot takes ~50 ms on KVM-PVM.
"""

from __future__ import annotations

import pytest

from vmm.abi import ExitCode, ReportKind

pytestmark = pytest.mark.kvm


def serial_lines(result) -> list[str]:
    return result.serial.decode("utf-8", "replace").splitlines()


def one(result, kind):
    reps = result.reports_of(kind)
    assert len(reps) == 1, f"expected one {kind.name} report, got {len(reps)}: {result.serial.decode()[-2000:]}"
    return reps[0]


def test_default_boot_is_ready_and_exits_0(boot):
    r = boot("")
    assert r.exit_code == ExitCode.SUCCESS, r.serial.decode()
    lines = serial_lines(r)
    assert "kernel: READY" in lines
    assert "SUMMARY: 0 tests, 0 failures" in lines
    one(r, ReportKind.READY)
    summary = one(r, ReportKind.SUMMARY)
    assert (summary.int("tests"), summary.int("failures")) == (0, 0)
    info = one(r, ReportKind.INFO)
    assert info.int("kaslr_slide") == r.kaslr_slide
    assert info.get("rdrand") in ("0", "1")
    assert info.int("kernel_virt") == 0xFFFF_FFFF_8000_0000 + r.kaslr_slide


@pytest.mark.parametrize("slide", [0, 0x0400_0000])
def test_boots_at_any_slide(boot, slide):
    r = boot("", slide=slide)
    assert r.exit_code == ExitCode.SUCCESS, r.serial.decode()
    assert one(r, ReportKind.INFO).int("kaslr_slide") == slide


def test_inspect_report_describes_allocators(boot):
    r = boot("")
    ins = one(r, ReportKind.INSPECT)
    for key in ("bitmap_phys", "bitmap_frames", "heap_start", "heap_end", "heap_free_head", "stacks"):
        assert ins.int(key) is not None, key
    assert ins.int("heap_end") > ins.int("heap_start")


def test_all_guest_tests_pass(boot):
    r = boot("tests=all")
    lines = serial_lines(r)
    failed = [line for line in lines if line.startswith("not ok")]
    assert not failed, "\n".join(failed)
    assert r.exit_code == ExitCode.SUCCESS
    results = r.reports_of(ReportKind.TEST_RESULT)
    summary = one(r, ReportKind.SUMMARY)
    assert summary.int("tests") == len(results) > 0
    assert summary.int("failures") == 0
    assert all(t.get("status") in ("pass", "skip") for t in results)
    assert f"SUMMARY: {len(results)} tests, 0 failures" in lines


def test_test_list_and_selection(boot):
    r = boot("tests=list")
    names = one(r, ReportKind.TEST_LIST).get("names").split(",")
    assert "frames::alloc_free_single" in names
    assert len(names) == len(set(names))
    r = boot("tests=frames,heap::coalesce")
    ran = [t.get("name") for t in r.reports_of(ReportKind.TEST_RESULT)]
    assert ran == [n for n in names if n.startswith("frames::")] + ["heap::coalesce"]
    assert r.exit_code == ExitCode.SUCCESS


def test_scenario_panic(boot):
    r = boot("scenario=panic")
    assert r.exit_code == ExitCode.PANIC
    p = one(r, ReportKind.PANIC)
    assert p.get("msg") == "scenario panic"
    assert p.get("file", "").endswith("main.rs") and p.int("line") > 0
    assert any(line.startswith("PANIC at ") and line.endswith(": scenario panic") for line in serial_lines(r))


def test_scenario_triplefault(boot):
    assert boot("scenario=triplefault").exit_code == ExitCode.TRIPLE_FAULT


def test_scenario_pagefault_is_reported(boot):
    r = boot("scenario=pagefault")
    assert r.exit_code == ExitCode.GUEST_FAULT
    f = one(r, ReportKind.FAULT)
    assert f.get("kind") == "page_fault"
    assert f.int("vector") == 14
    assert f.int("addr") == 0xDEAD_B000
    assert f.get("error_bits") == "not-present,read,supervisor"


def test_scenario_stack_overflow(boot):
    r = boot("scenario=stackoverflow")
    assert r.exit_code == ExitCode.STACK_OVERFLOW
    assert one(r, ReportKind.FAULT).get("kind") == "stack_overflow"


def test_scenario_hlt(boot):
    assert boot("scenario=hlt").exit_code == ExitCode.HALTED


def test_scenario_loop_hits_watchdog(boot):
    assert boot("scenario=loop", timeout=0.5).exit_code == ExitCode.TIMEOUT
