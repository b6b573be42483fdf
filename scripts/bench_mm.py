#!/usr/bin/env python3
"""Benchmarks of the mm/ memory model (pure Python, no KVM).

Prints median, min and max over ``--runs`` repetitions for each case, with
the project's target, as a table or (``--json``) as one JSON object.

    python scripts/bench_mm.py [--runs N] [--json] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from mm.addr import PAGE_4K, PageSize  # noqa: E402
from mm.audit import audit_all  # noqa: E402
from mm.flags import PteFlags as F  # noqa: E402
from mm.frames import BumpFrameAllocator  # noqa: E402
from mm.mapper import Mapper  # noqa: E402
from mm.physmem import BufferMemory  # noqa: E402
from mm.walker import translate, walk  # noqa: E402

DIRECT = 0xFFFF_8000_0000_0000
KERNEL = 0xFFFF_FFFF_8000_0000
GiB = 1 << 30
RW_NX = F.PRESENT | F.WRITABLE | F.NO_EXECUTE


def build_direct_map(size: PageSize) -> Callable[[], object]:
    mem = BufferMemory(bytearray(1 << 20))

    def run() -> Mapper:
        m = Mapper.new(mem, BumpFrameAllocator(0x1000, 1 << 20))
        m.map_range(DIRECT, 0, 64 * GiB, RW_NX | F.GLOBAL, size)
        return m

    return run


def build_kernel() -> Callable[[], object]:
    """A few hundred 4 KiB pages in three segments (RX, R, RW) under a 1 GiB direct map."""
    mem = BufferMemory(bytearray(1 << 20))

    def run() -> Mapper:
        m = Mapper.new(mem, BumpFrameAllocator(0x1000, 1 << 20))
        m.map_range(KERNEL, 0x10_0000, 200 * PAGE_4K, F.PRESENT)
        m.map_range(KERNEL + 200 * PAGE_4K, 0x10_0000 + 200 * PAGE_4K, 60 * PAGE_4K, F.PRESENT | F.NO_EXECUTE)
        m.map_range(KERNEL + 260 * PAGE_4K, 0x10_0000 + 260 * PAGE_4K, 140 * PAGE_4K, RW_NX)
        return m

    return run


def tables_4g_4k() -> tuple[BufferMemory, int]:
    """4 GiB mapped with 4 KiB pages: 1M leaves in 2048 PTs (about 8 MiB of tables)."""
    mem = BufferMemory(bytearray(12 << 20))
    m = Mapper.new(mem, BumpFrameAllocator(0x1000, 12 << 20))
    m.map_range(DIRECT, 0, 4 * GiB, RW_NX, PageSize.SIZE_4K)
    return mem, m.root


def guest_ram(size: int) -> BufferMemory:
    """Sparse anonymous RAM like the VMM's (MAP_NORESERVE): only touched pages cost memory."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    return BufferMemory(mmap.mmap(-1, size, flags))


def tables_typical() -> tuple[BufferMemory, int]:
    """A 64 GiB guest mid-run: direct map, kernel image, 64 guarded stacks, 2000 scattered heap pages."""
    mem = guest_ram(64 * GiB)
    m = Mapper.new(mem, BumpFrameAllocator(0x1_0000, 0x9_0000))
    m.map_range(DIRECT, 0, 64 * GiB, RW_NX | F.GLOBAL, PageSize.SIZE_1G)
    m.map_range(KERNEL, 0x10_0000, 200 * PAGE_4K, F.PRESENT)
    m.map_range(KERNEL + 200 * PAGE_4K, 0x10_0000 + 200 * PAGE_4K, 200 * PAGE_4K, RW_NX)
    stacks = 0xFFFF_C000_0000_0000
    for i in range(64):  # 16 KiB stacks, one unmapped guard page between neighbours
        m.map_range(stacks + i * 5 * PAGE_4K + PAGE_4K, 0x100_0000 + i * 4 * PAGE_4K, 4 * PAGE_4K, RW_NX)
    rng = np.random.default_rng(0)
    heap = 0xFFFF_D000_0000_0000
    for i, frame in enumerate(rng.permutation(1 << 16)[:2000].tolist()):
        m.map(heap + i * PAGE_4K, 0x200_0000 + frame * PAGE_4K, PageSize.SIZE_4K, RW_NX)
    return mem, m.root


def measure(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm-up (numpy dispatch, allocations)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def cases() -> list[tuple[str, str, float, Callable[[], Callable[[], object]]]]:
    """(name, what, target ms, setup returning the timed callable)."""

    def walk_4g():
        mem, cr3 = tables_4g_4k()
        return lambda: list(walk(mem, cr3))

    def walk_typ():
        mem, cr3 = tables_typical()
        return lambda: list(walk(mem, cr3))

    def translate_typ():
        mem, cr3 = tables_typical()
        return lambda: translate(mem, cr3, KERNEL + 0x1234)

    def audit_typ():
        mem, cr3 = tables_typical()
        return lambda: audit_all(mem, cr3, pt_alias_exclude=[(DIRECT, DIRECT + 64 * GiB)])

    return [
        ("build_64g_1g", "boot tables: 64 GiB direct map, 1 GiB pages", 1.0, lambda: build_direct_map(PageSize.SIZE_1G)),
        ("build_64g_2m", "boot tables: 64 GiB direct map, 2 MiB pages", 1.0, lambda: build_direct_map(PageSize.SIZE_2M)),
        ("build_kernel_4k", "kernel image: 400 pages of 4 KiB in 3 segments", 1.0, build_kernel),
        ("walk_4g_4k", "walk+coalesce 4 GiB of 4 KiB pages (1M leaves)", 300.0, walk_4g),
        ("walk_typical", "walk+coalesce a typical guest (~2.9k mappings)", 5.0, walk_typ),
        ("translate", "translate one address (typical guest)", 1.0, translate_typ),
        ("audit_typical", "audit_all on the typical guest", 10.0, audit_typ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="repetitions per case (default 20)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--only", nargs="*", help="run only these cases")
    args = ap.parse_args(argv)

    results = []
    for name, what, target, setup in cases():
        if args.only and name not in args.only:
            continue
        times = measure(setup(), args.runs)
        med = statistics.median(times)
        results.append({"name": name, "what": what, "unit": "ms", "n": len(times), "median": round(med, 4),
                        "min": round(min(times), 4), "max": round(max(times), 4), "target": target,
                        "ok": med <= target})
    env = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps({"env": env, "results": results}, indent=2))
    else:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # plain text fallback
            for r in results:
                print(f"{r['name']:<16} median {r['median']:9.3f} ms  min {r['min']:9.3f}  max {r['max']:9.3f}  "
                      f"target {r['target']:g} ms  {'ok' if r['ok'] else 'SLOW'}  ({r['what']})")
        else:
            t = Table(title=f"mm benchmarks (n={args.runs}, Python {env['python']}, numpy {env['numpy']})")
            for col in ("case", "median ms", "min", "max", "target", ""):
                t.add_column(col, justify="left" if col == "case" else "right")
            t.add_column("what")
            for r in results:
                t.add_row(r["name"], f"{r['median']:.3f}", f"{r['min']:.3f}", f"{r['max']:.3f}", f"{r['target']:g}",
                          "[green]ok[/]" if r["ok"] else "[red]SLOW[/]", r["what"])
            Console().print(t)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
