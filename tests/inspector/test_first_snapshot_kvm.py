"""The first snapshot of a guest that has not reported its CR3 yet: the
VMM's boot CR3 stands in, so one hold is enough; a wrong one costs a hold."""

import dataclasses
import time

import pytest

from vmm.inspector.snapshot import VALIDATED, Snapshotter
from vmm.inspector.target import LocalTarget
from tests.watching import run_watched


class _WrongHint(LocalTarget):
    """The VMM's own target, with a CR3 hint that is not where the tables are."""

    def cr3_hint(self):
        return 0x5000


def _first_snapshot(vm, target) -> object:
    """The first snapshot of a Snapshotter, once the guest has reported
    (its block and heap are known), with the report's CR3 left out."""
    out = {}

    def watch():
        while not vm.running:
            time.sleep(0.001)
        while not out and vm.running:
            facts = target.facts()
            if facts.report.cr3 is None or facts.report.heap_start is None:
                time.sleep(0.002)
                continue
            facts = dataclasses.replace(facts, report=dataclasses.replace(facts.report, cr3=None))
            out["snap"] = Snapshotter(target).take(facts)
            out["cr3"] = vm.layout.cr3

    result = run_watched(vm, watch)
    assert result.exit_code == 0, result.message
    return out


@pytest.mark.parametrize("wrong", [False, True])
def test_the_first_snapshot_takes_one_hold_with_the_boot_cr3(vmm_vm, wrong):
    vm = vmm_vm("workload=compute workload_ms=3000", fresh=True)
    out = _first_snapshot(vm, _WrongHint(vm) if wrong else LocalTarget(vm))
    snap = out["snap"]
    assert snap.parked and snap.method == VALIDATED
    assert snap.registers.root == out["cr3"]  # this guest keeps the tables it was booted with
    assert snap.attempts == (2 if wrong else 1)
    assert len(snap.runs) > 0 and snap.heap is not None
