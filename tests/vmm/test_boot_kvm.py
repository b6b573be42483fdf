"""Boot the real guest kernel on KVM and check what a user relies on."""

import json
import subprocess
import sys

import pytest

from vmm.abi import ExitCode, ReportKind

pytestmark = pytest.mark.kvm


def test_normal_boot(boot):
    r = boot()
    assert r.exit_code == 0, r.message
    assert r.stop_reason == "exit"
    assert b"READY" in r.serial
    assert r.reports_of(ReportKind.READY)
    assert r.timings_ms["to_ready"] > 0
    assert r.backend in ("VMX", "SVM", "PVM")


def test_guest_sees_kaslr_slide_host_chose(boot):
    r = boot(slide=0x4000_0000)
    info = r.reports_of(ReportKind.INFO)[0]
    assert info.int("kaslr_slide") == 0x4000_0000 == r.kaslr_slide


def test_panic_reports_message_and_exit_code(boot):
    r = boot("scenario=panic")
    assert r.exit_code == ExitCode.PANIC
    assert b"PANIC" in r.serial and b"scenario panic" in r.serial
    panic = r.reports_of(ReportKind.PANIC)[0]
    assert panic.get("msg") == "scenario panic" and panic.int("line") > 0


def test_triple_fault_is_reported_with_symbolized_rip(boot):
    r = boot("scenario=triplefault")
    assert r.exit_code == ExitCode.TRIPLE_FAULT and r.stop_reason == "triple-fault"
    if r.backend == "SVM":  # KVM-SVM resets the vCPU at a shutdown intercept: no registers, and the report says so
        assert r.registers is None and "registers at the fault are lost" in r.message
        return
    assert r.registers is not None and r.registers["rip"] >= 0xFFFF_FFFF_8000_0000
    assert "kernel::" in r.rip_symbol


def test_halt_is_reported(boot):
    r = boot("scenario=hlt")
    assert r.exit_code == ExitCode.HALTED and "HLT" in r.message


def test_watchdog_stops_runaway_guest(boot):
    r = boot("scenario=loop", timeout=1.0)
    assert r.exit_code == ExitCode.TIMEOUT and r.stop_reason == "timeout"
    assert 500 <= r.timings_ms["run"] < 10_000  # stopped by the watchdog, not early, not never


@pytest.mark.parametrize("memory", [16 << 20, 1 << 30, 64 << 30])
def test_memory_sizes_boot(boot, memory):
    r = boot(memory=memory, fresh=True)  # the boot path at each size: a zygote would be used once, then forked
    assert r.exit_code == 0, r.message
    assert r.reports_of(ReportKind.INFO)[0].int("ram_size") == memory


def test_cli_run_json(guest_kernel_path):
    proc = subprocess.run(
        [sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "--json", "--quiet", "--memory", "32M"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 0 and out["stop_reason"] == "exit" and out["memory_bytes"] == 32 << 20
    assert {"setup_total", "to_ready", "run"} <= set(out["timings_ms"])
    assert out["backend"] in ("VMX", "SVM", "PVM")


def test_cli_exit_code_is_guests(guest_kernel_path):
    proc = subprocess.run(
        [sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "--cmdline", "scenario=panic"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == ExitCode.PANIC
    assert "PANIC" in proc.stdout and "Traceback" not in proc.stderr


def test_guest_fault_is_symbolized(boot):
    r = boot("scenario=pagefault")
    assert r.exit_code == ExitCode.GUEST_FAULT
    assert r.fault is not None and r.fault["addr"] == "0xdeadb000"
    assert "kernel::scenario_page_fault" in r.fault["rip_symbol"]


def test_stack_overflow_names_the_task(boot):
    r = boot("scenario=stackoverflow")
    assert r.exit_code == ExitCode.STACK_OVERFLOW
    assert r.fault["kind"] == "stack_overflow" and "recurse" in r.fault["rip_symbol"]
