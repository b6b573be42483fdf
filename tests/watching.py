"""Shared by the kvm tests that look at a running guest from another thread."""

import threading


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
