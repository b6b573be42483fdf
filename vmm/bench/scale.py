"""Scale: boot time and host memory overhead as guest RAM grows.

Each size is booted in a fresh process (``vmm.bench.child``) so RSS is not
blurred by earlier boots. Host memory overhead = VmRSS after the boot minus
VmRSS before it minus the guest RAM actually touched (the memfd's resident
pages, ``GuestMemory.resident_bytes``): what the VMM itself costs beyond the
guest's own memory. RAM is sparse (MAP_NORESERVE), so a 64 GiB guest costs
only what it touches; the guest's own start-up (its frame bitmap) grows with
RAM, and at CPL0 on KVM-PVM it is emulated.
"""

from __future__ import annotations

import subprocess

from ..units import human_size
from .boot import ChildError, child_boot
from .stats import Section, summarize

SIZES = [16 << 20, 1 << 30, 16 << 30, 64 << 30]


def figures(child: dict) -> dict[str, float]:
    """Figures of one fresh-process boot (pure): ms and MiB."""
    tm = child["timings_ms"]
    before = child["rss_before_kib"]["VmRSS"] * 1024
    after = child["rss_after_kib"]["VmRSS"] * 1024
    touched = child["guest_resident_bytes"]
    t_first = child["t_vm"] + tm["setup_total"] * 1e6
    out = {
        "setup_total": tm["setup_total"],
        "page_tables": tm.get("page_tables", 0.0),
        "proc_to_first_insn": (t_first - child["t_spawn"]) / 1e6,
        "touched_mib": touched / (1 << 20),
        "rss_overhead_mib": (after - before - touched) / (1 << 20),
        "rss_before_mib": before / (1 << 20),
    }
    if "to_ready" in tm:
        out["to_ready"] = tm["to_ready"]
    return out


def measure(kernel_path: str, runs: int, sizes: list[int] = SIZES) -> dict:
    samples: dict = {"sizes": {}, "errors": []}
    for size in sizes:
        per: dict[str, list[float]] = {}
        for _ in range(runs):
            try:
                figs = figures(child_boot(kernel_path, size))
            except (ChildError, subprocess.SubprocessError, ValueError, KeyError) as exc:
                samples["errors"].append(f"{human_size(size)}: {exc}")
                break
            for k, v in figs.items():
                per.setdefault(k, []).append(v)
        if per:
            samples["sizes"][size] = per
    return samples


ROWS = [
    ("setup_total", "host setup (all steps -> first instruction)", "ms", 1),
    ("page_tables", "page tables", "ms", 2),
    ("to_ready", "first instruction -> READY", "ms", 1),
    ("touched_mib", "guest RAM touched", "MiB", 1),
    ("rss_overhead_mib", "host memory overhead (RSS beyond guest RAM touched)", "MiB", 1),
]


def section_from(samples: dict) -> Section:
    sec = Section("scale", "Scale: guest RAM size (each boot in a fresh process)")
    sec.meta = {"sizes": sorted(samples["sizes"]), "runs": max((len(v["setup_total"]) for v in
                                                                 samples["sizes"].values()), default=0)}
    base_rss = [v for per in samples["sizes"].values() for v in per.get("rss_before_mib", [])]
    if base_rss:
        sec.add("rss_before", "RSS of the VMM process before a boot (Python, vmm, numpy)", summarize(base_rss, "MiB"))
    for size, per in sorted(samples["sizes"].items()):
        sec.add(f"{size}", f"{human_size(size)} guest", None)
        for key, label, unit, indent in ROWS:
            if per.get(key):
                sec.add(f"{size}/{key}", label, summarize(per[key], unit), indent=indent)
    if samples["errors"]:
        sec.message = "; ".join(samples["errors"])
        if not samples["sizes"]:
            sec.status = "error"
    return sec


def run(kernel_path: str, runs: int, sizes: list[int] = SIZES) -> Section:
    return section_from(measure(kernel_path, runs, sizes))
