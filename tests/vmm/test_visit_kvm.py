"""Vm.visit: work done on the vCPU thread with the guest out of KVM_RUN (vmm/visit.py). The guests
are the plugin's (`vmm_vm`: a zygote fork, or cold with --vmm-cold): a visit holds either the same way."""

import os
import threading
import time

import pytest

from vmm.inspector.inspect_block import parked_busy
from vmm.inspector.target import LocalTarget

from tests.watching import run_watched

pytestmark = pytest.mark.kvm


def _may_realtime() -> bool:
    """Can this process put a thread at SCHED_FIFO (CAP_SYS_NICE)? Asked of a scratch thread."""
    out = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            out.append(True)
        except OSError:
            out.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return out[0]


def _same_registers(vm) -> bool:
    """Inside a visit: ``Vm.registers`` (kvm_run's copy, where KVM_CAP_SYNC_REGS
    is there) equals what the ioctls read."""
    r, s = vm.registers()
    r2, s2 = vm.vcpu.get_regs(), vm.vcpu.get_sregs()
    return bytes(r) == bytes(r2) and (s.cr0, s.cr3, s.cr4, s.efer) == (s2.cr0, s2.cr3, s2.cr4, s2.efer)


def _facts_with_hook(target, vm):
    facts = target.facts()
    deadline = time.time() + 10
    while vm.running and not facts.report.quiet_hook and time.time() < deadline:
        time.sleep(0.01)  # until the guest has sent its INSPECT report
        facts = target.facts()
    return facts


def test_a_visit_runs_on_the_vcpu_thread_and_the_guest_goes_on(vmm_vm):
    vm = vmm_vm("workload=compute workload_ms=1500", timeout=60)
    assert vm.visit(lambda: 1) is None  # not running: nothing to hold
    seen = {"visits": [], "rips": set(), "error": None}

    def watch():
        while not vm.running:
            time.sleep(0.001)
        while vm.running and len(seen["visits"]) < 20:
            v = vm.visit(lambda: (threading.get_ident(), vm.vcpu.get_regs().rip, _same_registers(vm)))
            if v is None:
                break
            seen["visits"].append(v)
            time.sleep(0.01)
        v = vm.visit(lambda: os.sched_getscheduler(0), realtime=True)
        seen["policy"] = v.value if v is not None else None
        v = vm.visit(lambda: os.sched_getscheduler(0))
        seen["policy_after"] = v.value if v is not None else None
        try:
            vm.visit(lambda: 1 / 0, realtime=True)
        except ZeroDivisionError as exc:  # fn's error reaches the requester
            seen["error"] = exc
        v = vm.visit(lambda: os.sched_getscheduler(0))
        seen["policy_after_error"] = v.value if v is not None else None

    result = run_watched(vm, watch)
    vcpu_thread = threading.get_ident()  # vm.run() ran here
    assert result.exit_code == 0, result.message
    visits = seen["visits"]
    assert len(visits) == 20
    assert all(v.value[0] == vcpu_thread and v.stops == 1 and v.held_ns > 0 for v in visits)
    assert all(v.value[2] for v in visits), "the registers KVM stored at the exit are the vCPU's"
    assert len({v.value[1] for v in visits}) > 1, "the guest should have moved on between visits"
    assert vm.visit(lambda: 1) is None
    assert isinstance(seen["error"], ZeroDivisionError)
    # A real-time visit runs at SCHED_FIFO where the process may, and leaves the thread as it was.
    assert seen["policy"] in ((os.SCHED_FIFO,) if _may_realtime() else (os.SCHED_OTHER,))
    # The next visit (and the guest) runs at SCHED_OTHER again, after a real-time fn that raised too.
    assert seen["policy_after"] == seen["policy_after_error"] == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_visit_runs_on_to_the_end_of_a_critical_section(vmm_vm):
    """Held inside a critical section, a visit lets the guest run to the
    kernel's quiet hook (an instruction breakpoint) and calls fn there."""
    vm = vmm_vm("workload=mm workload_ms=3000", timeout=60)
    target = LocalTarget(vm)
    found = {"ran_on": 0, "rips": set(), "busy_there": 0, "hook": None, "policies": set(), "policies_there": set()}

    def watch():
        while not vm.running:
            time.sleep(0.001)
        facts = _facts_with_hook(target, vm)
        hook = found["hook"] = facts.report.quiet_hook
        at = facts.report.inspect_block_phys
        while vm.running and found["ran_on"] < 5:
            v = target.visit(lambda: (vm.vcpu.get_regs().rip, parked_busy(vm.memory, at), os.sched_getscheduler(0)),
                             run_on=lambda: hook if parked_busy(vm.memory, at) else None, short=True)
            if v is None:
                break
            if v.ran_on:
                found["ran_on"] += 1
                found["policies_there"].add(v.value[2])
                # Run on and come back at real-time priority, then let go of it.
                again = target.visit(lambda: os.sched_getscheduler(0))
                found["policies"].add(again.value if again is not None else os.SCHED_OTHER)
                found["rips"].add(v.value[0])
                found["busy_there"] += v.value[1]
                assert v.stops == 2 and v.ran_ns > 0
            time.sleep(0.005)

    result = run_watched(vm, watch)
    assert result.exit_code == 0, result.message
    assert found["hook"], "the INSPECT report names no quiet_hook"
    assert found["ran_on"] >= 3, found
    assert found["rips"] == {found["hook"]} and found["busy_there"] == 0, found
    assert found["policies"] == {os.SCHED_OTHER}, found
    assert found["policies_there"] == {os.SCHED_FIFO if _may_realtime() else os.SCHED_OTHER}, found


def test_pauses_from_two_threads_take_turns(vmm_vm):
    """The control server and a local view may both hold the guest: the first
    holder's end must not let the guest run inside the second one's block."""
    vm = vmm_vm("workload=compute workload_ms=1500", timeout=60)
    holds, problems = [], []

    def hold(name, before_end):
        with vm.paused() as parked:
            if not parked:
                problems.append(f"{name}: not parked")
                return
            parked_at = vm.parked_ns
            before_end()
            # Still parked, and not parked again since: nobody let it run.
            if not vm._paused.is_set() or vm.parked_ns != parked_at:
                problems.append(f"{name}: the guest ran inside the block")
            holds.append(name)

    def watch():
        while not vm.running:
            time.sleep(0.001)
        second = threading.Thread(target=hold, args=("second", lambda: time.sleep(0.2)))
        first = threading.Thread(target=hold, args=("first", lambda: (second.start(), time.sleep(0.1))))
        first.start()
        first.join()
        second.join()
        with vm.paused() as outer, vm.paused() as inner:  # nested in one thread: one pause
            problems.extend(["nested: not parked"] if not (outer and inner) else [])

    result = run_watched(vm, watch)
    assert not problems, problems
    assert holds == ["first", "second"], holds
    assert result.exit_code == 0, result.message


def test_the_next_holder_waits_for_a_slow_vcpu_to_leave_the_last_park(vmm_vm):
    """A loaded host: the vCPU thread takes longer to leave its park than the
    first holder waits for it (here a thread that keeps the GIL for long
    switch intervals delays it). The second holder must still get a park of
    its own, not the first one's stale mark with the guest about to run."""
    import sys

    vm = vmm_vm("workload=compute workload_ms=60000", timeout=120)  # ended by run_watched
    problems, stop = [], threading.Event()

    def spin():  # pure Python: it lets the GIL go only when the interval forces it
        while not stop.is_set():
            sum(range(1000))

    def watch():
        while not vm.running:
            time.sleep(0.001)
        interval = sys.getswitchinterval()
        for _ in range(6):
            with vm.paused() as parked:
                if not parked:
                    problems.append("first: not parked")
                sys.setswitchinterval(0.2)
                spinner = threading.Thread(target=spin)
                spinner.start()  # takes the GIL as this block ends and the vCPU wakes
            try:
                with vm.paused() as parked:
                    parked_at = vm.parked_ns
                    time.sleep(0.05)
                    if parked and (not vm._paused.is_set() or vm.parked_ns != parked_at):
                        problems.append("second: the guest ran inside the block")
            finally:
                stop.set()
                spinner.join()
                stop.clear()
                sys.setswitchinterval(interval)

    result = run_watched(vm, watch)
    assert not problems, problems
    assert result.exit_code == 0, result.message
