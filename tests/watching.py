"""Shared by the kvm tests that look at a running guest from another thread."""

import threading


def run_watched(vm, watch):
    """Run the guest on this thread (the vCPU thread) while ``watch`` looks at
    it from another; ``vm.run()``'s result, once the watcher has finished."""
    t = threading.Thread(target=watch)
    t.start()
    try:
        return vm.run()
    finally:
        t.join()
