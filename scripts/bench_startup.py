#!/usr/bin/env python3
"""Start-up cost of the CLI's commands, whole processes as a user runs them.

    python3 scripts/bench_startup.py [--runs N] [--tree DIR ...]

For each command: wall time (median, min, max) and CPU time (user + sys of
the process and its children: steadier than wall time on a shared machine),
beside a bare ``python3 -c pass`` and the guest's own first instruction ->
READY (from ``vmm run --json``). ``--tree`` runs other checkouts (e.g. an
older commit unpacked with ``git archive``; its guest kernel built there) to
compare before and after: with several trees the runs alternate between
them, so a change in the machine's load hits all alike. Bytecode caches are warmed first and
PYTHONDONTWRITEBYTECODE is dropped, as on a user's machine. Figures are
reported, never asserted. ``vmm bench --only boot`` splits `vmm run` into
its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "bare python3 -c pass": ["-c", "pass"],
    "vmm run --quiet": ["vmm.py", "run", "--quiet"],
    "vmm memmap --json": ["vmm.py", "memmap", "--json"],
    "vmm run -c scenario=pagefault (fault report, symbolized)": ["vmm.py", "run", "-c", "scenario=pagefault"],
    "vmm pt --json": ["vmm.py", "pt", "--json"],
}


def one(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall * 1e3, cpu * 1e3, proc


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ms ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tree", type=Path, action="append",
                    help="checkout to run (repeatable; default: this one)")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [Path(__file__).resolve().parent.parent])]
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    envs = {t: {**base, "PYTHONPATH": str(t)} for t in trees}
    print(f"{args.runs} runs each, alternating between trees; load average {os.getloadavg()[0]:.1f} at start")
    ready = {t: [] for t in trees}
    for _ in range(args.runs):
        for t in trees:
            out = one(["vmm.py", "run", "--json"], t, envs[t])[2]
            ready[t].append(json.loads(out.stdout)["timings_ms"]["to_ready"])
    results = {t: {} for t in trees}
    for label, cmd in COMMANDS.items():
        for t in trees:
            one(cmd, t, envs[t])  # warm bytecode and kernel caches
        for _ in range(args.runs):
            for t in trees:
                wall, cpu, proc = one(cmd, t, envs[t])
                if proc.returncode not in (0, 5):  # 5: the guest's own fault report
                    print(f"{t} {label}: exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
                    continue
                walls, cpus = results[t].setdefault(label, ([], []))
                walls.append(wall)
                cpus.append(cpu)
    for t in trees:
        print(f"\ntree {t}")
        print(f"  {'guest: first instruction -> READY':58s} {fmt(ready[t])}")
        for label, (walls, cpus) in results[t].items():
            print(f"  {label:58s} wall {fmt(walls)}   cpu {fmt(cpus)}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
