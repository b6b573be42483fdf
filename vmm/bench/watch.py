"""What watching costs a guest: snapshot pauses and slowdown per workload.

Each workload runs in one guest and counts its iterations in the inspect
block (``workload_iters``), which the host reads without holding it, so
iterations per second measure the guest's speed. The guest is watched the
way the live view watches (``hz`` refreshes a second, each a snapshot,
every view and a render to an off-screen console) in windows alternated
with windows unwatched: off, on, off, on, ..., off. Each watched window is
compared with the unwatched windows on either side of it (``slowdowns``):
a host whose load drifts moves both alike, where separate boots (the way
this was measured before) differ by 10-20 points on a shared machine. The
figure is the median over the pairs with its quartiles, and all pairs
pooled with a 90 % interval (``pooled_slowdown``): many short windows
(24 of 0.5 s) resolve a few percent where a few long ones do not.

Beside wall time, each window records the vCPU thread's own CPU time
(``Vm.vcpu_thread_time``): iterations per CPU second (``cpu_slowdowns``)
leave out the time the host gave other threads, the watcher's own
included, so they show what watching costs the guest on the CPU it gets
(the holds, the kicks, caches), apart from what sharing a core costs it.
The watcher's CPU per refresh is recorded too: on a host with no idle
core that is the time the guest loses to it.

Workloads (guest command lines):

- compute loop: ``workload=compute`` (CPL0 arithmetic, a 16-byte alloc+free
  per iteration through the size-class cache);
- ``workload=mm``: heap, page-table and task churn;
- fragmented heap: ``workload=compute frag_blocks=N allocator=list``: N free
  blocks on the heap's free list, and every iteration changes its head.
"""

from __future__ import annotations

import io
import random
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
    windows: list[Window] = field(default_factory=list)  # alternated: off, on, off, ..., off
    refresh_cpu_ms: list[float] = field(default_factory=list)  # the watcher's CPU per refresh
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
        """Per watched window: unwatched speed around it / its speed - 1 (wall)."""
        return pair_slowdowns(self.windows)

    @property
    def cpu_slowdowns(self) -> list[float]:
        """The same per second of the vCPU thread's CPU."""
        return pair_slowdowns(self.windows, cpu=True)


@dataclass(frozen=True)
class Window:
    """One stretch of a run, watched or not: the guest's iterations in it, its
    wall time and the vCPU thread's CPU time (None: not known)."""

    watched: bool
    iters: int
    wall_s: float
    cpu_s: float | None = None


def _triples(windows: list[Window], cpu: bool) -> list[tuple[int, float, int, float]]:
    """(iterations before + after, their time, iterations watched, its time)
    per watched window between two unwatched ones with the time asked for."""
    def span(w: Window) -> float | None:
        return w.cpu_s if cpu else w.wall_s

    out = []
    for k in range(1, len(windows) - 1):
        before, on, after = windows[k - 1], windows[k], windows[k + 1]
        if not on.watched or before.watched or after.watched:
            continue
        spans = [span(before), span(on), span(after)]
        if any(t is None or t <= 0 for t in spans) or on.iters <= 0 or before.iters + after.iters <= 0:
            continue
        out.append((before.iters + after.iters, spans[0] + spans[2], on.iters, spans[1]))
    return out


def pair_slowdowns(windows: list[Window], *, cpu: bool = False) -> list[float]:
    """Each watched window against the unwatched windows just before and
    after it (pure): their iterations per second (of wall, or of the vCPU
    thread's CPU with ``cpu``) over its own, minus 1. Windows without the
    time asked for, or without iterations, are left out."""
    return [(plain / plain_s) / (iters / s) - 1 for plain, plain_s, iters, s in _triples(windows, cpu)]


def _pooled(triples) -> float:
    plain = sum(t[0] for t in triples) / sum(t[1] for t in triples)
    watched = sum(t[2] for t in triples) / sum(t[3] for t in triples)
    return plain / watched - 1


def pooled_slowdown(windows: list[Window], *, cpu: bool = False, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float] | None:
    """All watched windows against their unwatched neighbours at once (pure):
    iterations per second unwatched over watched, minus 1, and a 90 %
    interval from the pairs resampled with replacement (a fixed seed: the
    same windows give the same interval). None without a pair. Sums weigh
    every second alike, where the median of per-pair ratios
    (``pair_slowdowns``) only resists outliers; the interval says whether
    the run can tell 5 % from 0."""
    triples = _triples(windows, cpu)
    if not triples:
        return None
    rng = random.Random(seed)
    draws = sorted(_pooled([rng.choice(triples) for _ in triples]) for _ in range(resamples))
    return _pooled(triples), draws[int(0.05 * (resamples - 1))], draws[int(0.95 * (resamples - 1))]


def _iterations(vm, facts) -> int:
    """The guest's iterations so far, read while it runs (one aligned u64)."""
    block = read_block(vm.memory, facts)
    return block.workload_iters if block is not None else 0


def run_windows(image, workload: Workload, *, window: float, pairs: int, hz: float, out: WatchSamples,
                backend=None) -> None:
    """One guest, ``pairs`` watched windows of ``window`` seconds between
    ``pairs + 1`` unwatched ones (``out.windows``); every snapshot's figures
    into ``out``."""
    seconds = (2 * pairs + 1) * window
    # The guest's own deadline is only a backstop: the watcher ends the
    # loop (``Vm.end_work``) after the last window.
    cmdline = f"{workload.cmdline} workload_ms={int((seconds + 60) * 1000)}"
    config = VmConfig(memory=GUEST_RAM, cmdline=cmdline, timeout=seconds + 180)
    with Vm(image, config, backend=backend) as vm:
        stop = threading.Event()

        def watch():
            try:
                _watch(vm, window, pairs, hz, stop, out)
            except Exception as exc:  # the guest went away mid-snapshot
                if vm.running:
                    out.error = f"{type(exc).__name__}: {exc}"
            finally:
                vm.end_work()

        watcher = threading.Thread(target=watch, name="vmm-bench-watch", daemon=True)
        watcher.start()
        result = vm.run()
        stop.set()
        watcher.join(30)
        if result.exit_code != 0:
            out.error = f"guest failed ({workload.cmdline}): {result.message}"


def _watch(vm, window: float, pairs: int, hz: float, stop: threading.Event, out: WatchSamples) -> None:
    facts = None
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        if vm.running:
            facts = facts_from_vm(vm)  # (the block's place is known once the guest has reported it)
            if _iterations(vm, facts) > 0:  # past READY and any heap building
                break
        time.sleep(0.005)
    else:
        if not stop.is_set():
            out.error = f"{out.workload.label}: the guest's workload did not start within 60 s"
        return
    snapper = Snapshotter(LocalTarget(vm))
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    previous = None

    def refresh():
        nonlocal previous
        c0 = time.thread_time()
        snap = snapper.take()
        view = inspect(snap, vm.memory, previous=previous)
        console.file = io.StringIO()
        console.print(view.render(max_rows=25))
        previous = snap
        out.refresh_cpu_ms.append((time.thread_time() - c0) * 1e3)
        _record(snap, out)

    for k in range(2 * pairs + 1):
        watched = k % 2 == 1
        i0, t0, c0 = _iterations(vm, facts), time.perf_counter(), vm.vcpu_thread_time()
        end = t0 + window
        while not stop.is_set() and vm.running and time.perf_counter() < end:
            tick = time.perf_counter()
            if watched:
                refresh()
            stop.wait(max(0.0, min(end, tick + 1 / hz) - time.perf_counter()))
        i1, t1, c1 = _iterations(vm, facts), time.perf_counter(), vm.vcpu_thread_time()
        if stop.is_set() or not vm.running:
            return
        out.windows.append(Window(watched, i1 - i0, t1 - t0, None if c0 is None or c1 is None else c1 - c0))


def _record(snap, out: WatchSamples) -> None:
    if not snap.parked:
        return
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


def measure(image, workload: Workload, *, window: float = 0.5, pairs: int = 24, hz: float = 10.0,
            backend=None) -> WatchSamples:
    out = WatchSamples(workload)
    run_windows(image, workload, window=window, pairs=pairs, hz=hz, out=out, backend=backend)
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
            f"slowdown {slow:.1f} % (median of {len(s.slowdowns)} alternated windows)")
