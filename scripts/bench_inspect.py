#!/usr/bin/env python3
"""What watching costs: refresh rate of the live view, snapshot pauses, and
how much speed the guest loses while watched.

The guest is a compute loop (one exit at the end), so its run time measures
its speed. It runs unwatched, then watched by the inspector at --hz (each
refresh: a consistent snapshot with the vCPU parked, every view computed and
rendered to an off-screen console), alternating, --runs times each.

    python3 scripts/bench_inspect.py [--hz 10] [--runs 5] [--iterations 3000000] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from tests.elfgen import HIGH, PF_R, PF_X, Elf, Seg  # noqa: E402
from vmm.backend import detect_backend  # noqa: E402
from vmm.bench.stats import distribution  # noqa: E402
from vmm.elf import parse_kernel  # noqa: E402
from vmm.inspector.snapshot import take_snapshot  # noqa: E402
from vmm.inspector.target import LocalTarget  # noqa: E402
from vmm.inspector.views import inspect  # noqa: E402
from vmm.vm import Vm, VmConfig  # noqa: E402


def compute_kernel(iterations: int) -> bytes:
    code = (
        b"\x48\xb9" + struct.pack("<Q", iterations)  # movabs rcx, n
        + b"\x48\xff\xc9"  # L: dec rcx
        + b"\x75\xfb"  # jnz L
        + b"\x31\xc0\xe7\xf4"  # xor eax, eax ; out 0xf4, eax
    )
    return Elf(segments=[Seg(HIGH, 0x100000, code, flags=PF_R | PF_X)], entry=HIGH).build()


def run_once(image, hz: float | None) -> tuple[float, list[float], list[float], int]:
    pauses, refreshes = [], []
    with Vm(image, VmConfig(memory=128 << 20, timeout=120)) as vm:
        stop = threading.Event()
        watcher = None
        if hz:
            target = LocalTarget(vm)
            console = Console(file=io.StringIO(), width=160)

            def watch():
                while not vm.running and not stop.is_set():
                    time.sleep(0.0005)
                previous = None
                while not stop.is_set() and vm.running:
                    t0 = time.perf_counter()
                    snap = take_snapshot(target)
                    view = inspect(snap, target.physmem, previous=previous)
                    console.print(view.render())
                    previous = snap
                    if snap.parked:
                        pauses.append(snap.pause_ms)
                    refreshes.append((time.perf_counter() - t0) * 1e3)
                    stop.wait(max(0.0, 1 / hz - (time.perf_counter() - t0)))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        result = vm.run()
        stop.set()
        if watcher is not None:
            watcher.join()
    if result.exit_code != 0:
        raise SystemExit(f"bench: guest failed: {result.message}")
    return result.timings_ms["run"], pauses, refreshes, len(refreshes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=3_000_000, help="guest loop count (about 1.5 s on PVM)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    backend = detect_backend()
    print(backend.banner)
    image = parse_kernel(compute_kernel(args.iterations))
    run_once(image, None)  # warm-up
    plain, watched, pauses, refresh_ms, rates = [], [], [], [], []
    for _ in range(args.runs):
        plain.append(run_once(image, None)[0])
        t, p, r, n = run_once(image, args.hz)
        watched.append(t)
        pauses += p
        refresh_ms += r
        rates.append(n / (t / 1e3))
    slowdown = [w / p - 1 for w, p in zip(sorted(watched), sorted(plain))]
    out = {
        "backend": backend.to_json(),
        "hz": args.hz,
        "guest_run_ms_unwatched": distribution(plain, "ms"),
        "guest_run_ms_watched": distribution(watched, "ms"),
        "slowdown": distribution(slowdown, "ratio"),
        "refreshes_per_s": distribution(rates, "/s"),
        "refresh_ms": distribution(refresh_ms, "ms"),
        "snapshot_pause_ms": distribution(pauses, "ms") if pauses else None,
    }
    print(f"{'figure':<52} {'median':>10} {'min':>10} {'max':>10}")
    rows = [
        ("guest run, unwatched (ms)", out["guest_run_ms_unwatched"]),
        (f"guest run, watched at {args.hz:g} Hz (ms)", out["guest_run_ms_watched"]),
        ("guest slowdown while watched (%)", {k: out["slowdown"][k] * 100 for k in ("median", "min", "max")}),
        ("live-view refreshes per second achieved", out["refreshes_per_s"]),
        ("one refresh: snapshot + all views + render (ms)", out["refresh_ms"]),
    ]
    if pauses:
        rows.append(("vCPU pause per snapshot (ms)", out["snapshot_pause_ms"]))
    for name, s in rows:
        print(f"{name:<52} {s['median']:>10.3f} {s['min']:>10.3f} {s['max']:>10.3f}")
    if pauses:
        print(f"vCPU pause p99: {out['snapshot_pause_ms']['p99']:.3f} ms over {len(pauses)} snapshots")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
