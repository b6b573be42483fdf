"""Boot: every step from process start to the guest's READY line, each its own figure.

Two kinds of runs:

- in-process boots (after one warm-up boot): the VM's own step timings,
  from KVM_CREATE_VM to the first guest instruction, then to the first
  serial byte and to READY;
- fresh-process boots (``python3 -m vmm.bench.child``): what only a new
  process shows, interpreter start and imports included, measured with
  CLOCK_MONOTONIC across the two processes.

Baselines measured in the same run: the KVM setup ioctls of a minimal C VMM
(``host_baselines.kvm_setup``) beside our KVM_CREATE_VM / RAM / vCPU steps,
and a bare ``python3`` beside our process start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

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


def process_figures(child: dict) -> dict[str, float]:
    """ms figures of one fresh-process boot (pure)."""
    ms = lambda a, b: (b - a) / 1e6  # noqa: E731
    tm = child["timings_ms"]
    t_first = child["t_vm"] + tm["setup_total"] * 1e6
    out = {
        "proc_to_python": ms(child["t_spawn"], child["t_main"]),
        "proc_imports": ms(child["t_main"], child["t_imports"]),
        "proc_kernel_load": ms(child["t_imports"], child["t_kernel"]),
        "proc_to_first_insn": ms(child["t_spawn"], t_first),
        "proc_total": ms(child["t_spawn"], child["t_exit"]),
    }
    if "to_ready" in tm:
        out["proc_to_ready"] = out["proc_to_first_insn"] + tm["to_ready"]
    return out


def bare_python_start() -> float:
    """ms from spawning ``python3`` to its first line of code (no imports of ours)."""
    t0 = time.monotonic_ns()
    out = subprocess.run([sys.executable, "-c", "import time; print(time.monotonic_ns())"],
                         capture_output=True, text=True, check=True).stdout
    return (int(out.strip()) - t0) / 1e6


def measure(image, kernel_path: str, runs: int, process_runs: int, backend=None, memory: int = BOOT_RAM) -> dict:
    samples: dict = {"vm": {}, "proc": {}, "c": {}, "bare_python": [], "errors": []}
    with Vm(image, VmConfig(memory=memory, timeout=60), backend=backend) as vm:  # warm-up
        vm.run()
    for _ in range(runs):
        with Vm(image, VmConfig(memory=memory, timeout=60), backend=backend) as vm:
            result = vm.run()
        if result.exit_code != 0:
            raise RuntimeError(f"guest failed to boot: {result.message}")
        for key, value in result.timings_ms.items():
            samples["vm"].setdefault(key, []).append(value)
    for _ in range(process_runs):
        try:
            figs = process_figures(child_boot(kernel_path, memory))
        except (ChildError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            samples["errors"].append(str(exc))
            break
        for key, value in figs.items():
            samples["proc"].setdefault(key, []).append(value)
        samples["bare_python"].append(bare_python_start())
    try:
        samples["c"] = kvm_setup(memory, runs)
    except BaselineError as exc:
        samples["errors"].append(str(exc))
    return samples


def section_from(samples: dict, memory: int = BOOT_RAM) -> Section:
    """Rows from ``measure``'s samples (pure: tested without KVM)."""
    sec = Section("boot", f"Boot ({memory >> 20} MiB guest): process start to READY")
    vm, proc, c = samples["vm"], samples["proc"], samples["c"]
    s = lambda d, k: summarize(d[k], "ms") if d.get(k) else None  # noqa: E731
    sec.meta = {"memory": memory, "runs": len(vm.get("setup_total", [])),
                "process_runs": len(proc.get("proc_total", []))}
    if proc:
        sec.add("proc_to_python", "process start -> Python running", s(proc, "proc_to_python"),
                baseline=summarize(samples["bare_python"], "ms") if samples["bare_python"] else None,
                baseline_label="bare python3, same measure")
        sec.add("proc_imports", "imports (vmm, mm, numpy)", s(proc, "proc_imports"), indent=1)
        sec.add("proc_kernel_load", "kernel ELF read + parse", s(proc, "proc_kernel_load"), indent=1)
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
        sec.add("proc_to_ready", "process start -> READY", s(proc, "proc_to_ready"))
        sec.add("proc_total", "process start -> process exit", s(proc, "proc_total"), indent=1)
    sec.rows = [r for r in sec.rows if r.figure is not None]
    if samples["errors"]:
        sec.message = "; ".join(samples["errors"])
    return sec


def run(image, kernel_path: str, runs: int, process_runs: int, backend=None, memory: int = BOOT_RAM) -> Section:
    return section_from(measure(image, kernel_path, runs, process_runs, backend, memory), memory)
