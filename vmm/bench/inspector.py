"""Host inspector: walker throughput, view refresh rate, snapshot pause.

The guest is booted with ``scenario=loop`` (it reports INFO, INSPECT and
READY, then spins at CPL0), so the inspector works on a running vCPU as
``vmm run --inspect`` does: the vCPU runs in the main thread, the
measurements in another one, which stops the guest when done.

- walker: the live page tables walked from CR3 (``walk_arrays``); entries
  examined per second = tables visited x 512 / walk time;
- view refresh: one refresh of the live view (snapshot, labels, audits,
  physical view, heap walk, diff, rendered with rich to a string), as a rate;
- snapshot pause: how long the guest is held for one consistent snapshot
  (its exit to its re-entry, timed on the vCPU thread: ``Vm.visit``), beside
  the baseline of a hold that copies nothing;
- per guest workload (``watch.py``: compute loop, ``workload=mm``, heaps
  fragmented into 1,024 and 16,384 free blocks), watched at 10 Hz as the
  live view does: pause per snapshot (p50/p99/max), total held per snapshot
  (all its holds), the watcher's round trip, how many snapshots were
  stopped (held for a complete read) or retried, the watcher's CPU per
  refresh, and the guest's slowdown: watched windows alternated with
  unwatched ones in one guest, on wall time and per second of the vCPU
  thread's CPU.
"""

from __future__ import annotations

import io
import statistics
import threading
import time

from rich.console import Console

from mm.walker import walk_arrays

from ..abi import ExitCode, ReportKind
from ..inspector.capture import PHASES
from ..inspector.snapshot import take_snapshot
from ..inspector.target import LocalTarget
from ..inspector.views import inspect
from ..devices import Stop
from ..vm import Vm, VmConfig
from . import watch
from .stats import Section, distribution, rate, summarize

GUEST_RAM = 128 << 20
ENTRIES_PER_TABLE = 512


def _nothing() -> None:
    pass


def _measure_live(vm: Vm, inspected: threading.Event, iterations: int, out: dict) -> None:
    try:
        if not inspected.wait(60):
            out["error"] = "the guest sent no INSPECT report within 60 s"
            return
        time.sleep(0.05)  # let it reach its spin loop
        target = LocalTarget(vm)
        facts = target.facts()
        take_snapshot(target, facts=facts)  # warm-up (numpy, caches)
        console = Console(file=io.StringIO(), width=160, force_terminal=False)
        previous = None
        for _ in range(iterations):
            if not vm.running:
                out["error"] = "the guest stopped before the measurements ended"
                return
            bare = vm.visit(_nothing)  # a hold with nothing to copy: the exit path alone
            if bare is not None:
                out["park_ms"].append(bare.held_ns / 1e6)
            snap = take_snapshot(target, facts=facts)
            if snap.parked:
                out["pause_ms"].append(snap.pause_ms)
            if snap.walk_ms > 0:
                out["entries_per_s_live"].append(snap.tables_visited * ENTRIES_PER_TABLE / (snap.walk_ms / 1e3))
            out["tables"] = snap.tables_visited
            out["runs"] = len(snap.runs)
            t2 = time.perf_counter_ns()
            snap = take_snapshot(target, facts=facts)
            view = inspect(snap, target.physmem, previous=previous)
            console.file = io.StringIO()
            console.print(view.render(max_rows=25))
            previous = snap
            out["refresh_ms"].append((time.perf_counter_ns() - t2) / 1e6)
        # The walker alone, vCPU still running (no pause): throughput only. CR3
        # comes from the last snapshot: KVM_GET_SREGS would wait for KVM_RUN.
        root = snap.registers.root
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            walk_arrays(target.physmem, root)
            out["walk_ms"].append((time.perf_counter_ns() - t0) / 1e6)
    except Exception as exc:  # report, never hang the vCPU thread
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        vm.request_stop(Stop(ExitCode.SUCCESS, "bench-done", "inspector benchmark done"))


def measure(image, iterations: int, backend=None) -> dict:
    out: dict = {"park_ms": [], "pause_ms": [], "entries_per_s_live": [], "refresh_ms": [], "walk_ms": [],
                 "tables": 0, "runs": 0, "error": ""}
    inspected = threading.Event()

    def on_report(report):
        if report.kind == ReportKind.INSPECT:
            inspected.set()
        return None

    config = VmConfig(memory=GUEST_RAM, cmdline="scenario=loop", timeout=120)
    with Vm(image, config, backend=backend, on_report=on_report) as vm:
        worker = threading.Thread(target=_measure_live, args=(vm, inspected, iterations, out),
                                  name="vmm-bench-inspector", daemon=True)
        worker.start()
        result = vm.run()
        worker.join(timeout=30)
    if result.stop_reason != "bench-done" and not out["error"]:
        out["error"] = f"guest stopped early: {result.message}"
    return out


def section_from(samples: dict) -> Section:
    """Rows from ``measure``'s samples (pure)."""
    sec = Section("inspector", "Host inspector (live guest, vCPU running)")
    sec.meta = {"tables": samples["tables"], "runs": samples["runs"], "memory": GUEST_RAM}
    if samples["walk_ms"]:
        walk = summarize(samples["walk_ms"], "ms")
        entries = samples["tables"] * ENTRIES_PER_TABLE
        per_entry = summarize([w * 1e6 / entries for w in samples["walk_ms"]], "ns") if entries else None
        if per_entry:
            sec.add("walker_entries_per_s", f"walker: page-table entries per second ({samples['tables']} tables)",
                    rate(per_entry))
        sec.add("walk_ms", f"walker: whole address space ({samples['runs']} runs)", walk, indent=1)
    if samples["entries_per_s_live"]:
        sec.add("walker_entries_per_s_paused", "table entries per second copied while held",
                summarize(samples["entries_per_s_live"], "/s"), indent=1)
    if samples["refresh_ms"]:
        refresh = summarize(samples["refresh_ms"], "ms")
        sec.add("refresh_hz", "page-table view: refreshes per second (snapshot + views + render)",
                rate(refresh, "Hz"))
        sec.add("refresh_ms", "one refresh", refresh, indent=1)
    if samples["pause_ms"]:
        park = summarize(samples["park_ms"], "ms") if samples["park_ms"] else None
        sec.add("snapshot_pause", "snapshot pause (guest held)", summarize(samples["pause_ms"], "ms"),
                baseline=park, baseline_label="a hold with nothing to copy (Vm.visit)" if park else "")
    if samples["error"]:
        sec.message = samples["error"]
        if not sec.rows:
            sec.status = "error"
    return sec


def add_watch_rows(sec: Section, samples: list) -> None:
    """Rows for ``watch.measure`` results, one group per workload (pure)."""
    for s in samples:
        w = s.workload
        if s.error:
            sec.message = (sec.message + "; " if sec.message else "") + s.error
        if not s.pause_ms:
            sec.add(f"watch_{w.key}_pause", f"{w.label}: snapshot pause", None,
                    note=s.error or "no snapshot while the guest ran")
            continue
        pause = distribution(s.pause_ms, "ms")
        note = (f"pause p50 {pause['p50']:.3f} ms, p99 {pause['p99']:.3f} ms, max {pause['max']:.3f} ms; "
                f"{s.snapshots} snapshots: {s.stopped} stopped (held for a complete read), {s.retried} retried "
                f"(more than one hold, at most {max(s.attempts)}), {s.busy} busy, {s.heap_copied} with the heap "
                f"copied whole; guest cmdline '{w.cmdline}'")
        sec.add(f"watch_{w.key}_pause", f"{w.label}: snapshot pause (guest held)", pause, note=note)
        if s.stopped and s.validated_pause_ms:
            validated = distribution(s.validated_pause_ms, "ms")
            sec.add(f"watch_{w.key}_validated_pause", "pause of the snapshots validated (not stopped)", validated,
                    indent=1, note=f"p99 {validated['p99']:.3f} ms")
        if s.pause_cpu_ms:
            cpu = distribution(s.pause_cpu_ms, "ms")
            sec.add(f"watch_{w.key}_pause_cpu", "the same on the CPU (vCPU thread's CPU time)", cpu, indent=1,
                    note=f"p99 {cpu['p99']:.3f} ms, max {cpu['max']:.3f} ms (a loaded host's preemptions left out)")
        held = distribution(s.held_ms, "ms")
        sec.add(f"watch_{w.key}_held", "held per snapshot, all holds", held, indent=1,
                note=f"p99 {held['p99']:.3f} ms")
        if s.held_cpu_ms:
            held_cpu = distribution(s.held_cpu_ms, "ms")
            sec.add(f"watch_{w.key}_held_cpu", "the same on the CPU (all holds)", held_cpu, indent=1,
                    note=f"p99 {held_cpu['p99']:.3f} ms, max {held_cpu['max']:.3f} ms")
        phases = ""
        if s.copy_phases_ms:
            cols = list(zip(*s.copy_phases_ms))
            phases = "; ".join(f"{name} {distribution(col, 'ms')['p50'] * 1e3:.0f}/{distribution(col, 'ms')['p99'] * 1e3:.0f}"
                               for name, col in zip(PHASES, cols))
            phases = f"p50/p99 us by copy: {phases}"
        sec.add(f"watch_{w.key}_work", "copies while held", distribution(s.work_ms, "ms"), indent=1, note=phases)
        if s.round_trip_ms:
            trip = distribution(s.round_trip_ms, "ms")
            sec.add(f"watch_{w.key}_round_trip", "watcher's round trip: kick, hold, answer", trip, indent=1,
                    note=f"p99 {trip['p99']:.3f} ms (the guest runs until the kick lands)")
        if s.refresh_cpu_ms:
            refresh = distribution(s.refresh_cpu_ms, "ms")
            sec.add(f"watch_{w.key}_refresh_cpu", "the watcher's CPU per refresh (snapshot, views, render)", refresh,
                    indent=1, note=f"p99 {refresh['p99']:.3f} ms: on a host with no idle core, time the guest loses")
        _slowdown_rows(sec, s)


def _slowdown_rows(sec: Section, s) -> None:
    """The alternated windows' slowdowns (``watch.pair_slowdowns``): on wall
    time, and per second of the vCPU thread's CPU."""
    w = s.workload
    on = [x for x in s.windows if x.watched]
    off = [x for x in s.windows if not x.watched]
    for key, label, values, cpu in (("slowdown", "guest slowdown watched at 10 Hz (wall)", s.slowdowns, False),
                                    ("slowdown_cpu", "the same per second of the vCPU thread's CPU",
                                     s.cpu_slowdowns, True)):
        if not values:
            continue
        pct = [100 * x for x in values]
        q = statistics.quantiles(pct, n=4, method="inclusive") if len(pct) > 1 else [pct[0]] * 3
        pooled = watch.pooled_slowdown(s.windows, cpu=cpu)
        note = (f"median of {len(pct)} watched windows, each against the unwatched ones around it "
                f"({on[0].wall_s:.1f} s each), quartiles {q[0]:+.1f} .. {q[2]:+.1f} %; all of them pooled "
                f"{100 * pooled[0]:+.1f} %, 90 % interval {100 * pooled[1]:+.1f} .. {100 * pooled[2]:+.1f} % "
                f"(pairs resampled)")
        if cpu:
            share = [sum(x.cpu_s for x in ws) / sum(x.wall_s for x in ws) if all(x.cpu_s is not None for x in ws)
                     else None for ws in (off, on)]
            if None not in share:
                note += f"; the vCPU thread got {100 * share[0]:.0f} % of a CPU unwatched, {100 * share[1]:.0f} % watched"
        else:
            note += f"; iterations per s unwatched {sum(x.iters for x in off) / sum(x.wall_s for x in off):,.0f}"
        sec.add(f"watch_{w.key}_{key}", label, summarize(pct, "%"), indent=1, note=note)


def run(image, iterations: int, backend=None, *, watch_pairs: int = 0, watch_window: float = 0.5) -> Section:
    sec = section_from(measure(image, iterations, backend))
    if watch_pairs:
        add_watch_rows(sec, [watch.measure(image, w, window=watch_window, pairs=watch_pairs, backend=backend)
                             for w in watch.WORKLOADS])
    return sec
