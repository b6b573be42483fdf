"""What watching costs a guest: snapshot pauses and slowdown per workload.

Each workload runs for a fixed time (``workload_ms``) and counts its
iterations in the inspect block (``workload_iters``), so iterations per run
measure the guest's speed. It runs unwatched, then watched the way the live
view watches (``hz`` refreshes a second, each a snapshot, every view and a
render to an off-screen console), alternating. Slowdown = unwatched / watched
iterations - 1, per pair of runs; pauses are every snapshot's vCPU pause.

Workloads (guest command lines):

- compute loop: ``workload=compute`` (CPL0 arithmetic, a 16-byte alloc+free
  per iteration through the size-class cache);
- ``workload=mm``: heap, page-table and task churn;
- fragmented heap: ``workload=compute frag_blocks=N allocator=list``: N free
  blocks on the heap's free list, and every iteration changes its head.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console

from ..inspector.snapshot import STOPPED, Snapshotter, read_block
from ..inspector.target import LocalTarget, facts_from_vm
from ..inspector.views import inspect
from ..vm import Vm, VmConfig
from .stats import distribution

GUEST_RAM = 128 << 20


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    cmdline: str


WORKLOADS = (
    Workload("compute", "compute loop", "workload=compute"),
    Workload("mm", "workload=mm", "workload=mm"),
    Workload("frag1k", "fragmented heap, 1,024 free blocks", "workload=compute frag_blocks=1024 allocator=list"),
    Workload("frag16k", "fragmented heap, 16,384 free blocks", "workload=compute frag_blocks=16384 allocator=list"),
)


@dataclass
class WatchSamples:
    workload: Workload
    iters_plain: list[int] = field(default_factory=list)
    iters_watched: list[int] = field(default_factory=list)
    pause_ms: list[float] = field(default_factory=list)  # the snapshot's last hold (the guest's side)
    validated_pause_ms: list[float] = field(default_factory=list)  # the same, snapshots not held for a full read
    held_ms: list[float] = field(default_factory=list)  # all its holds
    held_cpu_ms: list[float] = field(default_factory=list)  # the same on the vCPU thread's CPU
    work_ms: list[float] = field(default_factory=list)  # copies (or a complete read) while held
    round_trip_ms: list[float] = field(default_factory=list)  # the last hold as the watcher saw it: kick to answer
    pause_cpu_ms: list[float] = field(default_factory=list)  # the last hold's CPU time on the vCPU thread
    copy_phases_ms: list[tuple[float, ...]] = field(default_factory=list)  # the last hold's copies, by capture.PHASES
    attempts: list[int] = field(default_factory=list)
    stopped: int = 0  # snapshots that fell back to holding the guest
    retried: int = 0  # snapshots that took more than one hold
    busy: int = 0
    heap_copied: int = 0  # snapshots whose heap was copied whole in the hold
    snapshots: int = 0
    error: str = ""

    @property
    def slowdowns(self) -> list[float]:
        return [p / w - 1 for p, w in zip(self.iters_plain, self.iters_watched) if w > 0]


def _iterations(vm) -> int:
    block = read_block(vm.memory, facts_from_vm(vm))
    return block.workload_iters if block is not None else 0


def run_once(image, workload: Workload, seconds: float, hz: float | None, out: WatchSamples, backend=None) -> int:
    """One run; returns the iterations the guest completed (0 on failure)."""
    cmdline = f"{workload.cmdline} workload_ms={int(seconds * 1000)}"
    with Vm(image, VmConfig(memory=GUEST_RAM, cmdline=cmdline, timeout=120), backend=backend) as vm:
        stop = threading.Event()
        watcher = None
        if hz:
            snapper = Snapshotter(LocalTarget(vm))
            console = Console(file=io.StringIO(), width=160, force_terminal=False)

            def watch():
                while not vm.running and not stop.is_set():
                    time.sleep(0.0005)
                previous = None
                while not stop.is_set() and vm.running:
                    t0 = time.perf_counter()
                    try:
                        snap = snapper.take()
                    except Exception as exc:  # the guest went away mid-snapshot
                        if vm.running:
                            out.error = f"{type(exc).__name__}: {exc}"
                        break
                    view = inspect(snap, vm.memory, previous=previous)
                    console.file = io.StringIO()
                    console.print(view.render(max_rows=25))
                    previous = snap
                    if snap.parked:
                        out.snapshots += 1
                        out.pause_ms.append(snap.pause_ms)
                        if snap.method != STOPPED:
                            out.validated_pause_ms.append(snap.pause_ms)
                        out.held_ms.append(snap.held_ms)
                        if snap.held_cpu_ms is not None:
                            out.held_cpu_ms.append(snap.held_cpu_ms)
                        out.work_ms.append(snap.walk_ms)
                        out.round_trip_ms.append(snap.round_trip_ms)
                        if snap.pause_cpu_ms is not None:
                            out.pause_cpu_ms.append(snap.pause_cpu_ms)
                        if snap.copy_phases_ms:
                            out.copy_phases_ms.append(snap.copy_phases_ms)
                        out.attempts.append(snap.attempts)
                        out.stopped += snap.method == STOPPED
                        out.retried += snap.attempts > 1
                        out.busy += snap.busy
                        out.heap_copied += snap.heap_copied
                    stop.wait(max(0.0, 1 / hz - (time.perf_counter() - t0)))

            watcher = threading.Thread(target=watch, name="vmm-bench-watch", daemon=True)
            watcher.start()
        result = vm.run()
        stop.set()
        if watcher is not None:
            watcher.join(30)
        if result.exit_code != 0:
            out.error = f"guest failed ({workload.cmdline}): {result.message}"
            return 0
        return _iterations(vm)


def measure(image, workload: Workload, *, seconds: float = 2.0, runs: int = 3, hz: float = 10.0,
            backend=None) -> WatchSamples:
    out = WatchSamples(workload)
    for _ in range(runs):
        plain = run_once(image, workload, seconds, None, out, backend)
        watched = run_once(image, workload, seconds, hz, out, backend)
        if out.error:
            break
        out.iters_plain.append(plain)
        out.iters_watched.append(watched)
    return out


def summary_line(s: WatchSamples) -> str:
    """One human line (scripts)."""
    if not s.pause_ms:
        return f"{s.workload.label}: no snapshot ({s.error or 'guest too short'})"
    d = distribution(s.pause_ms, "ms")
    slow = statistics.median(s.slowdowns) * 100 if s.slowdowns else float("nan")
    return (f"{s.workload.label}: pause p50 {d['p50']:.3f} ms, p99 {d['p99']:.3f} ms, max {d['max']:.2f} ms "
            f"over {s.snapshots} snapshots ({s.stopped} stopped, {s.retried} retried, {s.busy} busy, "
            f"holds max {max(s.attempts)}); "
            f"slowdown {slow:.1f} % (iterations {s.iters_plain} unwatched, {s.iters_watched} watched)")
