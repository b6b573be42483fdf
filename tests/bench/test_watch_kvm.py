"""The bench's watch measure on a real guest: alternated windows in one run
(their structure and bookkeeping, never their timings)."""

import pytest

from vmm.bench import watch
from vmm.elf import load_kernel_file


@pytest.mark.kvm
def test_one_guest_alternates_unwatched_and_watched_windows(vmm_kernel_path):
    image = load_kernel_file(vmm_kernel_path)
    s = watch.measure(image, watch.WORKLOADS[0], window=0.3, pairs=2)
    assert not s.error, s.error
    assert [w.watched for w in s.windows] == [False, True, False, True, False]
    # The guest ran in every window (its counter read while it ran), and the
    # vCPU thread's CPU time is known and no more than the window's wall time.
    assert all(w.iters > 0 and w.wall_s > 0 for w in s.windows)
    assert all(w.cpu_s is not None and 0 < w.cpu_s <= w.wall_s * 1.05 for w in s.windows)
    assert len(s.slowdowns) == 2 and len(s.cpu_slowdowns) == 2
    # Snapshots only while watched: a refresh's figures each time.
    assert s.snapshots >= 2 and len(s.refresh_cpu_ms) >= s.snapshots and all(t > 0 for t in s.refresh_cpu_ms)
    assert len(s.pause_ms) == len(s.held_ms) == s.snapshots
