"""Boot: every step from process start to the guest's READY line, each its own figure.

Two kinds of runs:

- in-process boots (after one warm-up boot): the VM's own step timings,
  from KVM_CREATE_VM to the first guest instruction, then to the first
  serial byte and to READY;
- fresh-process boots of the real command, ``vmm run --quiet``, with
  ``VMM_STARTUP_TRACE`` (``vmm.startup``): every step from process start,
  measured with CLOCK_MONOTONIC across the two processes -- interpreter
  start, imports, the guest build-cache check, ELF read + parse, host setup,
  the guest's own time to READY. A few more runs under ``-X importtime``
  split the imports by package (self time, which that flag inflates a
  little). Symbols are not loaded by a plain run; what they cost when
  something needs them is measured in this process, from the kernel's cache
  and from .symtab.

Baselines measured in the same run: the KVM setup ioctls of a minimal C VMM
(``host_baselines.kvm_setup``) beside our KVM_CREATE_VM / RAM / vCPU steps,
and a bare ``python3`` beside our process start.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from ..elf import read_symbols
from ..guest_build import REPO_ROOT
from ..kernel_cache import KernelCache
from ..vm import Vm, VmConfig
from .host_baselines import BaselineError, kvm_setup
from .stats import Section, summarize

BOOT_RAM = 128 << 20

#: (timings_ms key, label, indent) in boot order; missing keys are skipped.
VM_STEPS = [
    ("kvm_create_vm", "KVM_CREATE_VM"),
    ("guest_memory", "guest memory (memfd, sparse mapping)"),
    ("vcpu_create", "vCPU create + CPUID"),
    ("boot_plan", "boot plan (memory map, slide-0 page tables; cached)"),
    ("elf_load", "ELF load + relocations"),
    ("page_tables", "page tables"),
    ("boot_info", "boot info"),
    ("memory_slots", "KVM memory slots"),
    ("vcpu_state", "vCPU registers"),
]
#: Timing keys that are not steps of the setup (totals, or after the first instruction).
NOT_STEPS = {"setup_total", "setup_from_create_vm", "run", "to_first_serial_byte", "to_ready", "in_kvm_run"}
#: Steps a minimal C VMM also does (host_baselines.kvm_setup), with what its figure covers.
C_STEPS = {
    "kvm_create_vm": "minimal C VMM: open + KVM_CREATE_VM",
    "guest_memory": "minimal C VMM: memfd + mmap",
    "memory_slots": "minimal C VMM: KVM_SET_USER_MEMORY_REGION",
    "vcpu_create": "minimal C VMM: KVM_CREATE_VCPU + mmap (no CPUID)",
}


class ChildError(RuntimeError):
    pass


def child_boot(kernel: str, memory: int, cmdline: str = "", timeout: float = 600.0) -> dict:
    """Boot once in a fresh process; the child's JSON plus ``t_spawn``/``t_exit`` (monotonic ns)."""
    t_spawn = time.monotonic_ns()
    proc = subprocess.run(
        [sys.executable, "-m", "vmm.bench.child", str(kernel), str(memory), cmdline],
        capture_output=True, text=True, timeout=timeout,
    )
    t_exit = time.monotonic_ns()
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ChildError(f"boot in a fresh process failed (exit {proc.returncode}): {tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["exit_code"] != 0:
        raise ChildError(f"guest of {memory >> 20} MiB failed in a fresh process: {out['message']}")
    out["t_spawn"], out["t_exit"] = t_spawn, t_exit
    return out


def cli_boot(memory: int, kernel: str | None = None, *, importtime: bool = False, timeout: float = 600.0) -> dict:
    """``vmm run --quiet`` in a fresh process: its startup trace plus ``t_spawn``/``t_exit``
    (and ``imports_ms`` by package with ``importtime``). ``kernel`` None: the built guest,
    through the build-cache check and the kernel cache, as a user runs it."""
    fd, trace = tempfile.mkstemp(prefix="vmm-startup-", suffix=".json")
    os.close(fd)
    # The checkout's entry point, as the README runs it (nothing imports the CLI).
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []),
           str(REPO_ROOT / "vmm.py"), "run", "--quiet", "--memory", str(memory)]
    if kernel is not None:
        cmd += ["--kernel", str(kernel)]
    env = {**os.environ, "VMM_STARTUP_TRACE": trace}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure with bytecode caches, as a user's runs have them
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t_spawn = time.monotonic_ns()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        t_exit = time.monotonic_ns()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(trace) as f:
            text = f.read()
    finally:
        os.unlink(trace)
    if proc.returncode != 0 or not text:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ChildError(f"`vmm run --quiet` failed (exit {proc.returncode}): {tail}")
    out = json.loads(text)
    out["t_spawn"], out["t_exit"] = t_spawn, t_exit
    # CPU time of the process (user + sys, the guest's emulated CPL0 included):
    # steadier than wall time when the machine is shared.
    out["cpu_ms"] = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1e3
    if importtime:
        out["imports_ms"] = import_groups(proc.stderr)
    return out


#: How -X importtime lines are grouped: top-level package -> row. Our own
#: package is split one level further (vmm.exits, vmm.snapshot, ...), so a
#: module that starts costing shows by name.
IMPORT_GROUPS = {"mm": "mm", "numpy": "numpy", "rich": "rich", "elftools": "pyelftools"}
#: Rows below this median (ms) are summed into one.
SMALL_IMPORT_MS = 0.5


def import_groups(importtime_stderr: str) -> dict[str, float]:
    """ms of self import time by package, counting only what is imported after
    ``site`` (the interpreter's own start is a row of its own). Pure."""
    groups: dict[str, float] = dict.fromkeys(IMPORT_GROUPS.values(), 0.0)  # 0: not imported at all
    seen_site = False
    for line in importtime_stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        name = parts[2].strip()
        if not seen_site:
            seen_site = parts[2] == " site"  # top level (no indent): site and all it imported are done
            continue
        top = name.split(".")[0]
        group = ".".join(name.split(".")[:2]) if top == "vmm" else IMPORT_GROUPS.get(top, "stdlib and others")
        groups[group] = groups.get(group, 0.0) + int(parts[0]) / 1000
    return groups


def process_figures(trace: dict) -> dict[str, float]:
    """ms figures of one fresh-process ``vmm run`` (pure)."""
    ms = lambda a, b: (trace[b] - trace[a]) / 1e6  # noqa: E731
    tm = trace["timings_ms"]
    t_first = trace["t_vm"] + tm["setup_total"] * 1e6
    out = {
        "proc_to_python": ms("t_spawn", "t_first"),
        "proc_imports": ms("t_first", "t_imports"),
        "proc_build_check": ms("t_imports", "t_built"),
        "proc_kernel_load": ms("t_built", "t_kernel"),
        "proc_setup": tm["setup_total"],
        "proc_to_first_insn": (t_first - trace["t_spawn"]) / 1e6,
        "proc_total": ms("t_spawn", "t_exit"),
    }
    if "cpu_ms" in trace:
        out["proc_cpu"] = trace["cpu_ms"]
    if "to_ready" in tm:
        out["proc_guest_to_ready"] = tm["to_ready"]
        out["proc_to_ready"] = out["proc_to_first_insn"] + tm["to_ready"]
        out["proc_ratio"] = out["proc_to_ready"] / tm["to_ready"]
    return out


def symbol_costs(image, runs: int) -> dict[str, list[float]]:
    """ms to get the kernel's symbols when something needs them: from its
    cache file, and from .symtab with pyelftools (imported by a warm-up)."""
    out: dict[str, list[float]] = {"symbols_cache": [], "symbols_symtab": []}
    read_symbols(image.data)
    digest = hashlib.sha256(image.data).hexdigest()  # a run knows it from the build stamp
    with tempfile.TemporaryDirectory(prefix="vmm-bench-syms-") as d:
        path = os.path.join(d, "kernel")
        KernelCache.open(path, image.data, digest).symbols(image.data)  # writes the cache file
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            KernelCache.open(path, image.data, digest).symbols(image.data)
            t1 = time.perf_counter_ns()
            read_symbols(image.data)
            t2 = time.perf_counter_ns()
            out["symbols_cache"].append((t1 - t0) / 1e6)
            out["symbols_symtab"].append((t2 - t1) / 1e6)
    return out


def bare_python_start() -> float:
    """ms from spawning ``python3`` to its first line of code (no imports of ours)."""
    t0 = time.monotonic_ns()
    out = subprocess.run([sys.executable, "-c", "import time; print(time.monotonic_ns())"],
                         capture_output=True, text=True, check=True).stdout
    return (int(out.strip()) - t0) / 1e6


def measure(image, kernel_path: str, runs: int, process_runs: int, backend=None, memory: int = BOOT_RAM,
            cli_kernel: str | None = None) -> dict:
    """``cli_kernel``: what the fresh ``vmm run`` processes boot (None: the built guest)."""
    samples: dict = {"vm": {}, "proc": {}, "imports": {}, "symbols": {}, "c": {}, "bare_python": [], "errors": []}
    with Vm(image, VmConfig(memory=memory, timeout=60), backend=backend) as vm:  # warm-up
        vm.run()
    for _ in range(runs):
        with Vm(image, VmConfig(memory=memory, timeout=60), backend=backend) as vm:
            result = vm.run()
        if result.exit_code != 0:
            raise RuntimeError(f"guest failed to boot: {result.message}")
        for key, value in result.timings_ms.items():
            samples["vm"].setdefault(key, []).append(value)
    try:
        cli_boot(memory, cli_kernel)  # after a build: fills the kernel's cache, as any first run does
        for i in range(process_runs):
            for key, value in process_figures(cli_boot(memory, cli_kernel)).items():
                samples["proc"].setdefault(key, []).append(value)
            samples["bare_python"].append(bare_python_start())
        for _ in range(max(1, process_runs // 2)):
            for key, value in cli_boot(memory, cli_kernel, importtime=True)["imports_ms"].items():
                samples["imports"].setdefault(key, []).append(value)
    except (ChildError, subprocess.SubprocessError, ValueError, KeyError, OSError) as exc:
        samples["errors"].append(str(exc))
    samples["symbols"] = symbol_costs(image, max(3, runs))
    try:
        samples["c"] = kvm_setup(memory, runs)
    except BaselineError as exc:
        samples["errors"].append(str(exc))
    return samples


def _import_rows(imports: dict[str, list[float]]) -> list[tuple[str, list[float]]]:
    """Groups by median, largest first; the small ones summed run by run into one row."""
    runs = max((len(v) for v in imports.values()), default=0)
    big, small = [], [0.0] * runs
    for group, values in imports.items():
        if statistics.median(values) >= SMALL_IMPORT_MS or group in IMPORT_GROUPS.values():
            big.append((group, values))
        else:
            for i, v in enumerate(values):
                small[i] += v
    big.sort(key=lambda gv: -statistics.median(gv[1]))
    if any(small):
        big.append((f"modules under {SMALL_IMPORT_MS} ms each", small))
    return big


def section_from(samples: dict, memory: int = BOOT_RAM) -> Section:
    """Rows from ``measure``'s samples (pure: tested without KVM)."""
    sec = Section("boot", f"Boot ({memory >> 20} MiB guest): process start to READY")
    vm, proc, c = samples["vm"], samples["proc"], samples["c"]
    s = lambda d, k: summarize(d[k], "ms") if d.get(k) else None  # noqa: E731
    sec.meta = {"memory": memory, "runs": len(vm.get("setup_total", [])),
                "process_runs": len(proc.get("proc_total", []))}
    if proc:
        sec.add("proc_to_ready", "`vmm run --quiet`: process start -> READY", s(proc, "proc_to_ready"),
                baseline=s(proc, "proc_guest_to_ready"), baseline_label="the guest's own first instruction -> READY")
        sec.add("proc_ratio", "process start -> READY, in multiples of the guest's own time",
                summarize(proc["proc_ratio"], "x") if proc.get("proc_ratio") else None, indent=1, note="target <= 1.5")
        sec.add("proc_to_python", "interpreter start (process start -> our first line)", s(proc, "proc_to_python"),
                indent=1, baseline=summarize(samples["bare_python"], "ms") if samples["bare_python"] else None,
                baseline_label="bare python3, same measure")
        sec.add("proc_imports", "imports", s(proc, "proc_imports"), indent=1)
        for group, values in _import_rows(samples.get("imports", {})):
            sec.add(f"imports_{group}", f"{group} (self time, -X importtime)", summarize(values, "ms"), indent=2,
                    note="not imported" if not any(values) else "")
        sec.add("proc_build_check", "guest build-cache check", s(proc, "proc_build_check"), indent=1)
        sec.add("proc_kernel_load", "kernel read + ELF parse + cache open", s(proc, "proc_kernel_load"), indent=1)
        sec.add("proc_setup", "host setup", s(proc, "proc_setup"), indent=1)
        sec.add("proc_guest_to_ready", "guest: first instruction -> READY", s(proc, "proc_guest_to_ready"), indent=1)
    syms = samples.get("symbols", {})
    if syms:
        sec.add("symbols_cache", "symbols when needed (a fault, --json RIP, gdb): from <kernel>.cache",
                s(syms, "symbols_cache"), note="a plain run loads none")
        sec.add("symbols_symtab", "symbols from .symtab (pyelftools, already imported)", s(syms, "symbols_symtab"), indent=1)
    sec.add("setup_total", "host setup: all of it (RAM, boot data, KVM_CREATE_VM, vCPU, slots) -> first guest instruction", s(vm, "setup_total"))
    known = [k for k, _ in VM_STEPS]
    steps = VM_STEPS + [(k, k.replace("_", " ")) for k in vm if k not in known and k not in NOT_STEPS]
    for key, label in steps:
        if vm.get(key):
            base = s(c, key) if key in C_STEPS else None
            sec.add(key, label, s(vm, key), indent=1, baseline=base, baseline_label=C_STEPS[key] if base else "")
    if proc:
        sec.add("proc_to_first_insn", "process start -> first guest instruction", s(proc, "proc_to_first_insn"))
    sec.add("to_first_serial_byte", "first instruction -> first serial byte", s(vm, "to_first_serial_byte"))
    sec.add("to_ready", "first instruction -> READY", s(vm, "to_ready"))
    if proc:
        sec.add("proc_total", "process start -> process exit", s(proc, "proc_total"))
        sec.add("proc_cpu", "CPU time of that process (user + sys; steadier than wall time on a shared host)",
                s(proc, "proc_cpu"), indent=1)
    sec.rows = [r for r in sec.rows if r.figure is not None]
    if samples["errors"]:
        sec.message = "; ".join(samples["errors"])
    return sec


def run(image, kernel_path: str, runs: int, process_runs: int, backend=None, memory: int = BOOT_RAM,
        cli_kernel: str | None = None) -> Section:
    return section_from(measure(image, kernel_path, runs, process_runs, backend, memory, cli_kernel), memory)
