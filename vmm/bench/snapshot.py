"""Snapshots: save/load, reset in place, fresh VMs from a zygote, test VMs per second.

Each figure beside a cold boot measured in the same run:

- reset in place to the next guest instruction (dirty pages copied back from
  the zygote, or zeroed where the zygote's page is zero; vCPU state loaded),
  with the pages a trivial test dirtied,
  after a busier test (``workload=mm`` for a few dozen iterations: heap,
  page tables, task stacks), and after tests that write exactly 1, 32 and
  256 pages (``workload=touch``: one u64 into each of N free frames through
  the direct map, contiguous, and for 256 also every other frame), each
  with its breakdown: reading the dirty log, copying pages back, loading the
  vCPU state, resetting devices and giving the next work; the 256-page
  reset also with each other dirty-log mechanism the host offers; beside it
  the reset's floor on this host: its KVM calls (each writable slot's
  KVM_GET_DIRTY_LOG, the vCPU ioctls of the state load) and a memset of as
  many bytes as it zeroed, timed alone and warm, back to back (what is left
  of a reset is Python and the cold caches it meets after KVM_RUN);
- a fresh VM from the zygote (KVM VM + vCPU, RAM a copy-on-write mapping of
  the zygote's memfd, state loaded), to its first instruction;
- trivial test VMs per second (work ``""``: READY -> SUMMARY -> exit), one
  process and two (``pytest -n 2``-style: one zygote per process), reset and
  fork, beside cold boots to exit;
- save and load at 128 MiB, 16 GiB and 64 GiB (a guest stopped at READY):
  file size, time to save (scan + write + fsync), time to load (parse +
  copy into fresh RAM + a VM ready to run).
"""

from __future__ import annotations

import ctypes as C
import multiprocessing
import os
import tempfile
import time

from ..abi import ExitCode, ReportKind
from ..devices import Stop
from ..elf import load_kernel_file
from ..snapshot.machine import open_snapshot, restore_vm, save_vm
from ..snapshot.zygote import Zygote
from ..vm import Vm, VmConfig
from ..vm_builder import offered_dirty_mechanisms
from .stats import Section, distribution, summarize

RAM = 64 << 20
SAVE_SIZES = (128 << 20, 16 << 30, 64 << 30)
#: A busier test (heap, page tables, task stacks): it dirties a few dozen pages.
BUSY_TEST = "workload=mm workload_iters=40"
#: Tests that write exactly N pages, N per the reset target ("256 or fewer"),
#: and the stride between them (2: no two written pages adjacent, one copy each).
TOUCH_TESTS = ((1, 1), (32, 1), (256, 1), (256, 2))
RESET_STEPS = (("log_us", "dirty log"), ("copy_us", "copy"), ("vcpu_us", "vCPU load"), ("devices_us", "devices + work"))


def _ns() -> int:
    return time.perf_counter_ns()


def _cold_cycle(image, backend) -> float:
    t0 = _ns()
    with Vm(image, VmConfig(memory=RAM, timeout=60), backend=backend) as vm:
        r = vm.run()
    assert r.exit_code == 0, r.message
    return (_ns() - t0) / 1e3


def _rate_worker(args) -> tuple[int, float]:
    """In a fresh process: one zygote, then ``n`` trivial test VMs by ``how``."""
    kernel_path, how, n = args
    image = load_kernel_file(kernel_path)
    if how == "cold":
        t0 = time.perf_counter()
        for _ in range(n):
            _cold_cycle(image, None)
        return n, time.perf_counter() - t0
    with Zygote(image, RAM) as z:
        vm = z.fork("") if how == "reset" else None
        if vm is not None:
            vm.run()
        t0 = time.perf_counter()
        for _ in range(n):
            if how == "reset":
                z.reset(vm, "")
                r = vm.run()
            else:
                with z.fork("") as v:
                    r = v.run()
            assert r.exit_code == 0, r.message
        dt = time.perf_counter() - t0
        if vm is not None:
            vm.close()
    return n, dt


def _vms_per_second(kernel_path: str, how: str, procs: int, n: int) -> float:
    ctx = multiprocessing.get_context("spawn")  # children open their own /dev/kvm
    with ctx.Pool(procs) as pool:
        t0 = time.perf_counter()
        out = pool.map(_rate_worker, [(kernel_path, how, n)] * procs)
        wall = time.perf_counter() - t0
    # Per process its own loop time (the zygote boot is paid once, outside).
    return sum(k for k, _ in out) / max(dt for _, dt in out) if wall else 0.0


def touch_work(pages: int, stride: int) -> str:
    return f"workload=touch touch_pages={pages} touch_stride={stride}"


def _reset_after(z: Zygote, work: str, iters: int, mechanism: str = "auto") -> list[dict]:
    """``iters`` resets of one fork, each after a run of ``work`` (the reset
    measured is the one that follows that run, with its breakdown)."""
    vm = z.fork(work, dirty_mechanism=mechanism)
    try:
        vm.run()
        z.reset(vm, work)
        out = []
        for _ in range(iters):
            r = vm.run()
            assert r.exit_code == 0, r.message
            out.append(z.reset(vm, work))
        return out
    finally:
        vm.close()


def _reset_floor(z: Zygote, zero_bytes: int, iters: int) -> tuple[list[float], dict[str, float], int, int]:
    """``iters`` rounds of what a reset cannot do without, back to back and
    warm: every writable slot's KVM_GET_DIRTY_LOG (on a log with nothing
    pending), every vCPU ioctl of the state load, a memset of ``zero_bytes``.
    (Round totals in us, the median us of each part, how many dirty-log and
    vCPU ioctls.)"""
    vm = z.fork("")
    try:
        vm.run()
        z.reset(vm, "")  # prepares the loader for this vCPU; the log is taken
        reads, calls = vm.dirty_tracker.reads(), z.load_ioctls(vm)
        scratch = (C.c_char * max(zero_bytes, 1))()
        totals, parts = [], {"log": [], "vcpu": [], "zero": []}
        for _ in range(iters):
            t0 = _ns()
            for read in reads:
                read()
            t1 = _ns()
            for call in calls:
                call()
            t2 = _ns()
            C.memset(scratch, 0, zero_bytes)
            t3 = _ns()
            totals.append((t3 - t0) / 1e3)
            for key, dt in (("log", t1 - t0), ("vcpu", t2 - t1), ("zero", t3 - t2)):
                parts[key].append(dt / 1e3)
        return totals, {k: summarize(v, "us")["median"] for k, v in parts.items()}, len(reads), len(calls)
    finally:
        vm.close()


def _add_reset_row(sec: Section, key: str, label: str, infos: list[dict], baseline: dict, note: str) -> None:
    steps = ", ".join(f"{name} {summarize([i[k] for i in infos], 'us')['median']:.0f}" for k, name in RESET_STEPS)
    pages = [i["pages"] for i in infos]
    runs = [i["runs"] for i in infos]
    zeroed = [i["zeroed"] for i in infos]
    sec.add(key, label, distribution([i["total_us"] for i in infos], "us"), baseline=baseline,
            baseline_label="cold boot to exit", indent=1,
            note=f"{note}; pages restored {min(pages)}-{max(pages)} (the dirty ones, and clean ones each between "
                 f"two dirty pages) in {min(runs)}-{max(runs)} runs, {min(zeroed)}-{max(zeroed)} of them "
                 f"zeroed (zero in the zygote), the others copied; "
                 f"medians (us): {steps}; dirty log by {infos[0]['mechanism']}")


def _save_load(image, size: int, backend, tmp: str) -> dict:
    def at_ready(r):
        return Stop(ExitCode.SUCCESS, "ready") if r.kind == ReportKind.READY else None

    path = os.path.join(tmp, f"s{size}.core")
    with Vm(image, VmConfig(memory=size, timeout=120), backend=backend, on_report=at_ready) as vm:
        assert vm.run().stop_reason == "ready"
        t0 = _ns()
        info = save_vm(vm, path, "bench")
        save_us = (_ns() - t0) / 1e3
    t0 = _ns()
    with open_snapshot(path) as snap:
        with restore_vm(snap, image, VmConfig(memory=0, timeout=60), backend=backend) as vm2:
            load_us = (_ns() - t0) / 1e3
            r = vm2.run()
    assert r.exit_code == 0, r.message
    os.unlink(path)
    return {"save_us": save_us, "load_us": load_us, "file": info["file_bytes"], "stored": info["stored_bytes"],
            "segments": info["segments"]}


def run(image, kernel_path: str, runs: int, backend, *, quick: bool = False, sizes=SAVE_SIZES) -> Section:
    sec = Section("snapshot", "Snapshots, reset and fork")
    iters = 20 if quick else max(50, 10 * runs)
    # The busier test runs ~0.7 s of emulated CPL0 work per reset on KVM-PVM:
    # --quick (and the structure test in tests/snapshot) takes a few samples.
    busy_iters = 5 if quick else iters
    cold = [_cold_cycle(image, backend) for _ in range(max(3, runs))]
    cold_fig = distribution(cold, "us")
    with Zygote(image, RAM, backend=backend) as z:
        sec.meta["zygote_boot_ms"] = z.boot_ms
        vm = z.fork("")
        try:
            vm.run()
            resets, pages, cycles = [], [], []
            for _ in range(iters):
                t0 = _ns()
                info = z.reset(vm, "")
                t1 = _ns()
                r = vm.run()
                t2 = _ns()
                assert r.exit_code == 0, r.message
                resets.append((t1 - t0) / 1e3)
                cycles.append((t2 - t0) / 1e3)
                pages.append(info["pages"])
            busy_resets, busy_pages = [], []
            z.reset(vm, BUSY_TEST)
            for _ in range(busy_iters):
                r = vm.run()
                assert r.exit_code == 0, r.message
                t0 = _ns()
                info = z.reset(vm, BUSY_TEST)
                busy_resets.append((_ns() - t0) / 1e3)
                busy_pages.append(info["pages"])
        finally:
            vm.close()
        # 100 samples each for a p99 that means something (vmm.bench.report), a few with --quick.
        touch_iters = 5 if quick else 100
        touch = {(n, stride): _reset_after(z, touch_work(n, stride), touch_iters) for n, stride in TOUCH_TESTS}
        auto = touch[(256, 1)][0]["mechanism"]
        others = {m: _reset_after(z, touch_work(256, 1), touch_iters, m)
                  for m in offered_dirty_mechanisms() if m != auto}
        zeroed = sorted(i["zeroed"] for i in touch[(256, 1)])[len(touch[(256, 1)]) // 2]
        floor, floor_parts, n_reads, n_calls = _reset_floor(z, zeroed * 4096, touch_iters)
        forks, fork_cycles = [], []
        for _ in range(iters):
            t0 = _ns()
            v = z.fork("")
            t1 = _ns()
            try:
                r = v.run()
            finally:
                v.close()
            fork_cycles.append((_ns() - t0) / 1e3)
            forks.append((t1 - t0) / 1e3)
        built = []  # the same without the machine built ahead: KVM's VM, vCPU and slots made at the fork
        for _ in range(iters):
            t0 = _ns()
            v = z.fork("", spare=False)
            built.append((_ns() - t0) / 1e3)
            v.close()
    sec.add("reset", "reset in place to the next guest instruction", distribution(resets, "us"),
            baseline=cold_fig, baseline_label="cold boot to exit",
            note=f"a trivial test dirtied {int(summarize(pages, 'pages')['median'])} pages (and the host the mailbox)")
    sec.add("reset_busy", "reset in place after a busier test", distribution(busy_resets, "us"),
            baseline=cold_fig, baseline_label="cold boot to exit", indent=1,
            note=f"'{BUSY_TEST}' dirtied {int(summarize(busy_pages, 'pages')['median'])} pages "
                 f"({min(busy_pages)}-{max(busy_pages)})")
    for (n, stride), infos in touch.items():
        key = f"reset_touch_{n}" + ("" if stride == 1 else f"_stride{stride}")
        how = "contiguous" if stride == 1 else f"every {stride}nd frame" if stride == 2 else f"every {stride}th frame"
        _add_reset_row(sec, key, f"reset after a test that wrote {n} page{'s' if n > 1 else ''}"
                       + (f" ({how})" if n > 1 else ""), infos, cold_fig, f"'{touch_work(n, stride)}'")
        if (n, stride) == (256, 1):
            sec.add("reset_floor", "floor of that reset here: its KVM calls and zeroing alone, warm",
                    distribution(floor, "us"), indent=1,
                    note=f"{n_reads} x KVM_GET_DIRTY_LOG {floor_parts['log']:.0f} us, {n_calls} vCPU ioctls "
                         f"{floor_parts['vcpu']:.0f} us, memset of {zeroed * 4096 >> 10} KiB "
                         f"{floor_parts['zero']:.0f} us (medians); the rest of a reset is Python and the "
                         f"caches KVM_RUN left cold")
    for m, infos in others.items():
        _add_reset_row(sec, f"reset_touch_256_{m}", f"the same, 256 pages, dirty log by {m}", infos, cold_fig,
                       f"'{touch_work(256, 1)}'")
    sec.add("fork", "fresh VM from the zygote (CoW RAM), to its first instruction", distribution(forks, "us"),
            baseline=cold_fig, baseline_label="cold boot to exit",
            note="its KVM VM, vCPU and memory slots built ahead, while the fork before it ran (vmm.snapshot.spare)")
    sec.add("fork_built", "the same, everything built at the fork", distribution(built, "us"),
            baseline=cold_fig, baseline_label="cold boot to exit", indent=1)
    sec.add("reset_cycle", "trivial test VM: reset + run to exit", distribution(cycles, "us"),
            baseline=cold_fig, baseline_label="cold boot to exit")
    sec.add("fork_cycle", "trivial test VM: fork + run to exit + close", distribution(fork_cycles, "us"),
            baseline=cold_fig, baseline_label="cold boot to exit")
    n = 30 if quick else 100
    for procs in (1, 2):
        rates = {how: _vms_per_second(kernel_path, how, procs, n if how != "cold" else max(5, n // 10))
                 for how in ("reset", "fork", "cold")}
        for how in ("reset", "fork"):
            sec.add(f"vms_per_s_{how}_{procs}", f"trivial test VMs per second, {procs} process(es), {how}",
                    summarize([rates[how]], "/s"), baseline=summarize([rates["cold"]], "/s"),
                    baseline_label="cold boots per second")
    with tempfile.TemporaryDirectory(dir=os.environ.get("VMM_BENCH_TMP")) as tmp:
        for size in sizes:
            got = [_save_load(image, size, backend, tmp) for _ in range(1 if quick or size > 1 << 30 else min(runs, 3))]
            label = f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
            sec.add(f"save_{size}", f"save at READY, {label} guest (file {got[0]['file'] / (1 << 20):.2f} MiB)",
                    summarize([g["save_us"] for g in got], "us"),
                    note=f"file {got[0]['file'] / (1 << 20):.2f} MiB, {got[0]['segments']} segments")
            sec.add(f"load_{size}", f"load (parse, copy, VM ready), {label} guest",
                    summarize([g["load_us"] for g in got], "us"))
            sec.meta[f"file_bytes_{size}"] = got[0]["file"]
    return sec
