#!/usr/bin/env python3
"""Boot-path benchmark: host setup time, time to the guest's ready line, and
Python's dispatch cost per port-I/O exit.

Prints medians with min and max over N runs, always with the KVM backend.
Figures are reported, never asserted (these machines are shared and noisy).

    python3 scripts/bench_boot.py [--runs 20] [--exits 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import shutil
import subprocess
import tempfile
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.elfgen import exit_storm_kernel  # noqa: E402
from vmm.backend import detect_backend  # noqa: E402
from vmm.elf import load_kernel_file, parse_kernel  # noqa: E402
from vmm.guest_build import build_guest  # noqa: E402
from vmm.kvm_abi import KVM_RUN  # noqa: E402
from vmm.vm import Vm, VmConfig  # noqa: E402


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_boots(image, runs: int, memory: int) -> dict[str, dict]:
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        with Vm(image, VmConfig(memory=memory, timeout=30)) as vm:
            result = vm.run()
        if result.exit_code != 0:
            raise SystemExit(f"bench: guest failed: {result.message}")
        for key, value in result.timings_ms.items():
            samples.setdefault(key, []).append(value)
    return {k: summarize(v) for k, v in samples.items()}


C_BASELINE = r"""
#include <linux/kvm.h>
#include <stdint.h>
#include <sys/ioctl.h>
/* The same exit storm as the Python loop, handled in C: run until the guest
   writes the exit port; returns the number of exits or -1 on error. */
long run_storm(int fd, struct kvm_run *run) {
    long n = 0;
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) return -1;
        n++;
        if (run->exit_reason != KVM_EXIT_IO) return -1;
        if (run->io.port == 0xf4) return n;
    }
}
"""


def c_baseline() -> ctypes.CDLL | None:
    """Build the C loop with gcc into a temporary directory (None if no gcc)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="vmm-bench-"))
    (tmp / "storm.c").write_text(C_BASELINE)
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(tmp / "storm.so"), str(tmp / "storm.c")], check=True)
    lib = ctypes.CDLL(str(tmp / "storm.so"))
    lib.run_storm.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.run_storm.restype = ctypes.c_long
    return lib


def _bare_python_loop(vm: Vm) -> float:
    """KVM_RUN from Python with no dispatch at all: the floor for any Python VMM."""
    fd, run_map, ioctl = vm.vcpu.fd, vm.vcpu._map, fcntl.ioctl
    n = 0
    t0 = time.perf_counter_ns()
    while True:
        ioctl(fd, KVM_RUN, 0)
        n += 1
        if run_map[34] == 0xF4:  # kvm_run.io.port (low byte) of the exit port
            break
    return (time.perf_counter_ns() - t0) / 1e3 / n


def bench_exits(n_exits: int, runs: int) -> dict[str, dict]:
    """Per-exit cost of the Python run loop beside a C loop doing the same ioctl."""
    image = parse_kernel(exit_storm_kernel(n_exits).build())
    lib = c_baseline()
    py, prof, c, bare = [], [], [], []
    for _ in range(runs):
        with Vm(image, VmConfig(memory=16 << 20, timeout=60)) as vm:
            bare.append(_bare_python_loop(vm))
        with Vm(image, VmConfig(memory=16 << 20, timeout=60)) as vm:
            result = vm.run()
        py.append(result.timings_ms["run"] * 1e3 / result.exits)
        with Vm(image, VmConfig(memory=16 << 20, timeout=60)) as vm:
            result = vm.run(profile=True)
        prof.append((result.timings_ms["run"] - result.timings_ms["in_kvm_run"]) * 1e3 / result.exits)
        if lib is not None:
            with Vm(image, VmConfig(memory=16 << 20, timeout=60)) as vm:
                t0 = time.perf_counter_ns()
                n = lib.run_storm(vm.vcpu.fd, vm.vcpu.run_address)
                c.append((time.perf_counter_ns() - t0) / 1e3 / n)
    out = {
        "python_round_trip_us": summarize(py),
        "python_share_profiled_us": summarize(prof),
        "bare_python_ioctl_us": summarize(bare),
        "dispatch_over_bare_us": summarize([p - q for p, q in zip(sorted(py), sorted(bare))]),
    }
    if c:
        out["c_round_trip_us"] = summarize(c)
        out["python_minus_c_us"] = summarize([p - q for p, q in zip(sorted(py), sorted(c))])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="boots per figure (default 20)")
    ap.add_argument("--exits", type=int, default=20000, help="port writes in the exit storm (default 20000)")
    ap.add_argument("--memory", type=int, default=128, help="guest RAM in MiB (default 128)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()

    backend = detect_backend()
    print(backend.banner)
    image = load_kernel_file(build_guest(quiet=True))
    with Vm(image, VmConfig(memory=args.memory << 20)) as vm:  # warm-up: imports, CPUID cache
        vm.run()
    t0 = time.perf_counter()
    boots = bench_boots(image, args.runs, args.memory << 20)
    exits = bench_exits(args.exits, max(3, args.runs // 4))
    elapsed = time.perf_counter() - t0

    rows = [
        ("KVM_CREATE_VM -> first guest instruction (all host setup)", boots["setup_total"], "ms"),
        ("  KVM_CREATE_VM", boots["kvm_create_vm"], "ms"),
        ("  guest RAM (memfd + mmap)", boots["guest_memory"], "ms"),
        ("  vCPU create + CPUID", boots["vcpu_create"], "ms"),
        ("  memory map", boots["memory_map"], "ms"),
        ("  ELF load + relocations", boots["elf_load"], "ms"),
        ("  page tables", boots["page_tables"], "ms"),
        ("  boot info", boots["boot_info"], "ms"),
        ("  memory slots (KVM_SET_USER_MEMORY_REGION)", boots["memory_slots"], "ms"),
        ("  vCPU registers", boots["vcpu_state"], "ms"),
        ("first instruction -> first serial byte", boots["to_first_serial_byte"], "ms"),
        ("first instruction -> READY", boots["to_ready"], "ms"),
        ("port-I/O exit round trip, Python loop (guest -> Python -> guest)", exits["python_round_trip_us"], "us"),
        ("  Python's share, profiled (time outside KVM_RUN, incl. timer calls)", exits["python_share_profiled_us"], "us"),
        ("port-I/O exit round trip, bare Python ioctl loop (no dispatch)", exits["bare_python_ioctl_us"], "us"),
        ("  our dispatch cost per exit (full loop - bare loop)", exits["dispatch_over_bare_us"], "us"),
    ]
    if "c_round_trip_us" in exits:
        rows += [
            ("port-I/O exit round trip, C loop (same ioctl, gcc -O2)", exits["c_round_trip_us"], "us"),
            ("  Python dispatch cost on top of KVM_RUN (Python - C)", exits["python_minus_c_us"], "us"),
        ]
    print(f"{'figure':<76} {'median':>10} {'min':>10} {'max':>10}")
    for name, s, unit in rows:
        print(f"{name:<76} {s['median']:>8.3f}{unit} {s['min']:>8.3f}{unit} {s['max']:>8.3f}{unit}")
    print(f"({args.runs} boots of {args.memory} MiB; exit storm of {args.exits} exits; {elapsed:.1f} s)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"backend": backend.to_json(), "boots": boots, "exits": exits, "runs": args.runs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
