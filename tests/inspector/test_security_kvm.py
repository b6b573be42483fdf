"""Security properties of booted guests, checked from the host.

Every in-guest test item is also audited after it runs (vmm/pytest_plugin.py,
security_violations); these tests check the default boot and a guest under
load, with explicit guard-page probes."""

import threading
import time

import pytest

from vmm.backend import detect_backend
from vmm.inspector.heap import RunTranslator
from vmm.inspector.snapshot import take_snapshot
from vmm.inspector.target import LocalTarget
from vmm.inspector.views import audits, inspect
from vmm.pytest_plugin import security_violations

pytestmark = pytest.mark.kvm


def _check_stacks(snap):
    block = snap.block
    assert block is not None, "the guest's inspect block could not be read"
    assert block.stacks, "no stacks reported"
    tr = RunTranslator(snap.runs)
    for st in block.stacks:
        assert st.top - st.base == 64 * 1024, st
        assert tr.translate(st.base) is not None and tr.translate(st.top - 1) is not None, st
        assert tr.translate(st.guard_low) is None, f"guard page below task {st.task_id}'s stack is mapped"
        assert tr.translate(st.guard_high) is None, f"guard page above task {st.task_id}'s stack is mapped"
    return block


def test_default_boot_is_secure(vmm_ready):
    vm = vmm_ready()
    assert security_violations(vm) == []
    snap = take_snapshot(LocalTarget(vm))
    _check_stacks(snap)
    assert not [f for f in audits(snap) if f.severity.name == "ERROR"]


_B = detect_backend()


@pytest.mark.skipif(
    _B.emulated,
    reason=f"{_B.name} nested under {_B.nested_under}: the host side is emulated, the guest's workload ends first",
)
def test_guest_under_load_stays_secure_and_consistent(vmm_vm):
    vm = vmm_vm("workload=mm workload_ms=1500", timeout=60)
    target = LocalTarget(vm)
    seen_tasks, problems = set(), []

    def watch():
        while not vm.running:
            time.sleep(0.001)
        previous = None
        while vm.running:
            snap = take_snapshot(target)
            if not snap.parked:
                continue
            view = inspect(snap, vm.memory, previous=previous)
            previous = snap
            problems.extend(str(f) for f in view.findings if f.severity.name == "ERROR")
            block = snap.block
            if block is not None:
                seen_tasks.update(s.task_id for s in block.stacks)
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    result = vm.run()
    t.join()
    assert result.exit_code == 0, result.message
    assert not problems, problems[:5]
    assert len(seen_tasks) > 1, "the workload should have run several tasks"
