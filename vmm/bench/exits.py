"""Port-I/O exits: how many per second, and what Python's dispatch costs per exit.

Every run boots the exit-storm guest (``storm.py``) four times, each in a
fresh VM, and drives it with:

- the VMM's own run loop (``Vm.run``): the real thing;
- the same loop with ``profile=True``: time outside ``KVM_RUN`` is Python's;
- a bare Python loop (``ioctl`` and a port check, no dispatch): the floor
  for any Python VMM;
- a C loop doing the same ``ioctl`` (``host_baselines.kvm_loop``): the
  baseline, built with gcc in this run.

Differences (Python minus C, Python minus bare) are taken per run, then
summarized.
"""

from __future__ import annotations

import fcntl
import time

from .. import kvm_abi as K
from ..abi import EXIT_PORT
from ..vm import Vm, VmConfig
from .host_baselines import BaselineError, kvm_loop
from .stats import Section, rate, summarize
from .storm import storm_kernel

STORM_RAM = 16 << 20


def _bare_python_loop(vm: Vm) -> float:
    """KVM_RUN from Python with no dispatch at all; us per exit."""
    fd, run_map, ioctl, kvm_run = vm.vcpu.fd, vm.vcpu.run_buffer, fcntl.ioctl, K.KVM_RUN
    port_low = K.KVM_RUN_EXIT_UNION + K.kvm_run_io.port.offset  # little-endian: its low byte
    n = 0
    t0 = time.perf_counter_ns()
    while True:
        ioctl(fd, kvm_run, 0)
        n += 1
        if run_map[port_low] == EXIT_PORT & 0xFF:
            break
    return (time.perf_counter_ns() - t0) / 1e3 / n


def measure(n_exits: int, runs: int, backend=None) -> dict:
    """Per-exit samples (us) of each loop, one per run."""
    image = storm_kernel(n_exits)
    config = VmConfig(memory=STORM_RAM, timeout=120)
    try:
        lib = kvm_loop()
        c_error = ""
    except BaselineError as exc:
        lib, c_error = None, str(exc)
    out: dict = {"python": [], "profiled": [], "bare": [], "c": [], "c_error": c_error}
    for _ in range(runs):
        with Vm(image, config, backend=backend) as vm:
            out["bare"].append(_bare_python_loop(vm))
        with Vm(image, config, backend=backend) as vm:
            result = vm.run()
        if result.exit_code != 0:
            raise RuntimeError(f"exit storm guest failed: {result.message}")
        out["python"].append(result.timings_ms["run"] * 1e3 / result.exits)
        with Vm(image, config, backend=backend) as vm:
            result = vm.run(profile=True)
        out["profiled"].append((result.timings_ms["run"] - result.timings_ms["in_kvm_run"]) * 1e3 / result.exits)
        if lib is not None:
            with Vm(image, config, backend=backend) as vm:
                t0 = time.perf_counter_ns()
                n = lib.run_storm(vm.vcpu.fd, vm.vcpu.run_address)
                dt = time.perf_counter_ns() - t0
            if n <= 0:
                lib, out["c_error"] = None, "the C loop's KVM_RUN failed"
            else:
                out["c"].append(dt / 1e3 / n)
    return out


RATE_NOTE = "derived: 1 / round trip per run (min from the slowest run, max from the fastest)"
DIFF_NOTE = "derived: difference of two loops timed in each run; noise can make one run negative (read the median)"


def section_from(samples: dict, n_exits: int) -> Section:
    """Rows from ``measure``'s samples (pure: tested without KVM)."""
    sec = Section("exits", "Exits: port-I/O round trips (guest -> VMM -> guest)")
    sec.meta = {"exits_per_run": n_exits, "runs": len(samples["python"])}
    py = summarize(samples["python"], "us")
    c = summarize(samples["c"], "us") if samples["c"] else None
    c_label = "C loop, same ioctl (gcc -O2)"
    sec.add("exits_per_s", "exits per second, Python VMM", rate(py), baseline=rate(c) if c else None,
            baseline_label=c_label, note=RATE_NOTE)
    sec.add("round_trip", "round trip per exit, Python VMM", py, baseline=c, baseline_label=c_label)
    if c:
        diffs = [p - q for p, q in zip(samples["python"], samples["c"])]
        sec.add("python_minus_c", "Python's dispatch cost per exit (Python - C)", summarize(diffs, "us"), indent=1,
                note=DIFF_NOTE)
    sec.add("python_share_profiled", "time outside KVM_RUN per exit (profiled)", summarize(samples["profiled"], "us"),
            indent=1)
    bare = summarize(samples["bare"], "us")
    sec.add("bare_python_round_trip", "round trip, bare Python ioctl loop (no dispatch)", bare)
    diffs = [p - q for p, q in zip(samples["python"], samples["bare"])]
    sec.add("dispatch_over_bare", "our dispatch per exit (full loop - bare loop)", summarize(diffs, "us"), indent=1,
            note=DIFF_NOTE)
    if not c:
        sec.message = f"no C baseline: {samples.get('c_error') or 'not measured'}"
    return sec


def run(n_exits: int, runs: int, backend=None) -> Section:
    return section_from(measure(n_exits, runs, backend), n_exits)
