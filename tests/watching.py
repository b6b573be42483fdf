"""Shared by the kvm tests that look at a running guest from another thread."""

import threading
import time


def run_watched(vm, watch):
    """Run the guest on this thread (the vCPU thread) while ``watch`` looks at
    it from another; ``vm.run()``'s result, once the watcher has finished.
    When the watcher is done, the guest's `workload=` loop is asked to end
    (``Vm.end_work``): it ends as at its `workload_ms` deadline, frees
    everything and exits 0, instead of running on with no one watching."""

    def watch_then_end():
        try:
            watch()
        finally:
            vm.end_work()

    t = threading.Thread(target=watch_then_end)
    t.start()
    try:
        return vm.run()
    finally:
        t.join()


def snapshots_while_running(vm, snapper, problems: list[str]):
    """From the watcher thread: ``snapper``'s snapshots back to back until the
    guest stops. A snapshot that raises while the guest still runs is a
    problem; once it has gone, one may (it stopped mid-snapshot)."""
    while not vm.running:
        time.sleep(0.001)
    while vm.running:
        try:
            snap = snapper.take()
        except Exception as exc:
            if vm.running:
                problems.append(f"snapshot raised {type(exc).__name__}: {exc}")
            return
        yield snap
