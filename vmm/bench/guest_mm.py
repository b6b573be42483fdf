"""Guest memory management, from the guest's own in-guest benchmarks.

The guest, booted with ``bench=all``, sends one BENCH report per benchmark
after READY (docs/ABI.md): ``name``, ``unit`` (``cycles``), ``n``, ``p50``,
``p99``, ``min``, ``max``, ``cpl`` (0 or 3) and optionally ``size``,
``freelist_len`` and ``impl``. Cycles become ns with the TSC frequency KVM
reports (``Vm.tsc_khz``).

Benchmarks are recognised by name patterns, not a fixed list, so the guest
can add and rename them: each one is put in a *kind* (small allocation,
large allocation, demand fault, map+unmap, INVLPG, CR3 flush, other) and,
where the host has an equivalent, shown beside the host's own figure
measured in the same run:

- allocations: glibc ``malloc``+``free`` of the same size, with the same
  number of free chunks lying around when the guest says ``freelist_len``;
- demand fault: a Linux minor fault (anonymous ``mmap``, first touch);
- map+unmap: ``mmap(MAP_POPULATE)`` + ``munmap`` of one page.

- aligned allocations (a name ending ``_a512``): glibc ``aligned_alloc``.

The heap's backing allocator is fixed at boot (``allocator=tlsf|list``), so
when the guest runs its heap benchmarks, each run also boots the guest with
``bench=heap allocator=list`` and the first-fit rows stand beside TLSF's in
the same report. The guest's fragmentation trace (INFO ``event=heap_frag``,
both allocators on one trace) becomes its own section.

INVLPG and CR3 flushes have no user-space equivalent: no baseline. Unknown
benchmarks are shown as the guest named them. On KVM-PVM CPL0 code is
emulated and CPL3 code native, so every row carries the privilege level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..abi import ReportKind
from ..units import human_size
from ..vm import Vm, VmConfig
from . import host_baselines as hb
from .stats import Section, merge_distributions, scale, summarize

GUEST_RAM = 128 << 20
NO_BENCHMARKS = "guest reports no benchmarks (update the guest)"

#: (kind, title, name pattern), first match wins: specific before general.
KINDS = [
    ("invlpg", "INVLPG (one page)", re.compile(r"invlpg|flush_?page|tlb_?one", re.I)),
    ("cr3_flush", "CR3 reload (full TLB flush)", re.compile(r"cr3|flush_?all|tlb_?flush", re.I)),
    ("demand_fault", "demand-paging fault", re.compile(r"fault|demand|\bpf\b", re.I)),
    ("map_unmap", "map + unmap", re.compile(r"map", re.I)),
    ("frame_alloc", "physical frame allocation + free", re.compile(r"frame", re.I)),
    ("alloc", "allocation + free", re.compile(r"alloc|malloc|heap|kmalloc", re.I)),
]
KIND_TITLES = {k: t for k, t, _ in KINDS} | {
    "small_alloc": "small allocation + free",
    "large_alloc": "allocation of 4 KiB or more",
    "other": "other guest benchmarks",
}
KIND_ORDER = ["small_alloc", "large_alloc", "frame_alloc", "demand_fault", "map_unmap", "invlpg", "cr3_flush", "other"]
_LARGE = re.compile(r"large|big|page", re.I)
#: A size in a benchmark's name: ``alloc_free_64``, ``alloc_free_4k``, ``map_unmap_2m``.
_NAME_SIZE = re.compile(r"(?:^|_)(\d+)([kmg]?)(?:_|$)", re.I)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
#: An alignment in a benchmark's name: ``alloc_free_64_a512``.
_NAME_ALIGN = re.compile(r"_a(\d+)$")
SMALL_DEFAULT, LARGE_DEFAULT = 64, 4096


@dataclass(frozen=True)
class GuestBench:
    """One BENCH report, decoded."""

    name: str
    kind: str
    cpl: int | None
    size: int | None
    freelist_len: int | None
    impl: str | None
    figure: dict  # in the guest's unit (cycles)
    bench_id: str | None = None  # the guest's unique id, when it sends one
    extra: tuple = ()  # other keys the guest sent, as (key, value) pairs
    align: int = 0  # alignment above 16 asked for (0: default)

    @property
    def ident(self) -> tuple:
        return (self.bench_id,) if self.bench_id else (self.name, self.cpl, self.size, self.freelist_len, self.impl)


def align_from_name(name: str) -> int:
    """``alloc_free_64_a512`` -> 512; 0 if the name asks for no alignment."""
    m = _NAME_ALIGN.search(name)
    return int(m.group(1)) if m else 0


def size_from_name(name: str) -> int | None:
    """``alloc_free_64k`` -> 65536; None if the name carries no size."""
    m = _NAME_SIZE.search(name)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()] if m else None


def classify(name: str, size: int | None) -> str:
    for kind, _title, pattern in KINDS:
        if pattern.search(name):
            if kind == "alloc":
                if size is not None:
                    return "large_alloc" if size >= 4096 else "small_alloc"
                return "large_alloc" if _LARGE.search(name) else "small_alloc"
            return kind
    return "other"


def decode(report) -> GuestBench | None:
    """A BENCH report as a ``GuestBench``; None if it lacks the basic keys."""
    name = report.get("name")
    p50 = report.int("p50")
    if not name or p50 is None:
        return None
    fig = {
        "median": float(p50), "p50": float(p50),
        "p99": float(report.int("p99", p50)), "min": float(report.int("min", p50)),
        "max": float(report.int("max", p50)), "n": report.int("n", 1) or 1,
        "unit": report.get("unit") or "cycles",
    }
    size = report.int("size")
    if size is None:
        size = size_from_name(name)
    known = {"name", "id", "unit", "n", "p50", "p99", "min", "max", "cpl", "size", "freelist_len", "impl"}
    extra = tuple(sorted((k, v) for k, v in report.fields.items() if k not in known))
    return GuestBench(name, classify(name, size), report.int("cpl"), size, report.int("freelist_len"),
                      report.get("impl"), fig, report.get("id"), extra, align_from_name(name))


def to_ns(fig: dict, tsc_khz: int | float) -> dict:
    """A cycles figure in ns (other units unchanged, as are cycles without a TSC frequency)."""
    if fig["unit"] == "cycles" and tsc_khz:
        return scale(fig, 1e6 / tsc_khz, "ns")
    return fig


def merge_runs(runs: list[list[GuestBench]]) -> list[GuestBench]:
    """The same benchmarks over several boots, merged by identity (first-seen order)."""
    groups: dict[tuple, list[GuestBench]] = {}
    for benches in runs:
        for b in benches:
            groups.setdefault(b.ident, []).append(b)
    out = []
    for items in groups.values():
        first = items[0]
        fig = merge_distributions([b.figure for b in items]) if len(items) > 1 else dict(first.figure, runs=1)
        out.append(GuestBench(first.name, first.kind, first.cpl, first.size, first.freelist_len, first.impl, fig,
                              first.bench_id, first.extra, first.align))
    return out


def alloc_size(b: GuestBench) -> int:
    if b.size is not None:
        return b.size
    return LARGE_DEFAULT if b.kind == "large_alloc" else SMALL_DEFAULT


def baseline_requests(benches: list[GuestBench]) -> set[tuple]:
    """What the host must measure to stand beside these: ('malloc', size, freelist), ('fault',), ('map',)."""
    req: set[tuple] = set()
    for b in benches:
        if b.kind in ("small_alloc", "large_alloc"):
            req.add(("malloc", alloc_size(b), b.freelist_len or 0) + ((b.align,) if b.align > 16 else ()))
        elif b.kind == "demand_fault":
            req.add(("fault",))
        elif b.kind == "map_unmap":
            req.add(("map",))
    return req


def baseline_label(req: tuple) -> str:
    if req[0] == "malloc":
        extra = f", {req[2]} free chunk{'s' if req[2] != 1 else ''}" if req[2] else ""
        if len(req) > 3:
            return f"glibc aligned_alloc({req[3]})+free {human_size(req[1])}{extra}"
        return f"glibc malloc+free {human_size(req[1])}{extra}"
    if req[0] == "fault":
        return "Linux minor fault (mmap + first touch)"
    if req[0] == "map":
        return "mmap(MAP_POPULATE) + munmap 4 KiB"
    return str(req)


def measure_baselines(requests: set[tuple], quick: bool) -> tuple[dict[tuple, dict], str]:
    """Host figures (ns) for each request, and an error message if gcc etc. failed."""
    out: dict[tuple, dict] = {}
    try:
        khz = hb.tsc_khz()
        for req in sorted(requests, key=str):
            if req[0] == "malloc":
                out[req] = hb.malloc_free(req[1], 20_000 if quick else 200_000, khz, req[2], *req[3:])
            elif req[0] == "fault":
                out[req] = hb.minor_fault(2048 if quick else 8192, 2 if quick else 4, khz)
            elif req[0] == "map":
                out[req] = hb.map_unmap(5_000 if quick else 50_000, khz)
    except hb.BaselineError as exc:
        return out, str(exc)
    return out, ""


def label(b: GuestBench) -> str:
    parts = []
    if b.size is not None and b.kind in ("small_alloc", "large_alloc"):
        parts.append(human_size(b.size) + (f" aligned {b.align}" if b.align > 16 else ""))
    if b.freelist_len is not None:
        parts.append(f"free list {b.freelist_len}")
    if b.impl:
        parts.append(b.impl)
    return b.name + (f" ({', '.join(parts)})" if parts else "")


def _baseline_for(b: GuestBench) -> tuple | None:
    req = baseline_requests([b])
    return req.pop() if req else None


def section_from(benches: list[GuestBench], tsc_khz: float, baselines: dict[tuple, dict], *,
                 message: str = "", meta: dict | None = None) -> Section:
    """Rows grouped by kind; each guest figure in ns beside its host baseline (pure)."""
    sec = Section("guest", "Guest memory management (in-guest benchmarks, p50 / p99 per operation)")
    sec.meta = dict(meta or {}, tsc_khz=tsc_khz)
    if not benches:
        sec.status = "empty"
        sec.message = message or NO_BENCHMARKS
        for req, fig in sorted(baselines.items(), key=lambda kv: str(kv[0])):
            sec.add(f"host:{'/'.join(map(str, req))}", f"host: {baseline_label(req)}", fig)
        return sec
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    ranked = sorted(
        enumerate(benches),
        key=lambda ib: (order[ib[1].kind], ib[1].name, ib[1].size or 0, ib[1].impl or "",
                        ib[1].freelist_len or 0, -1 if ib[1].cpl is None else ib[1].cpl, ib[0]),
    )
    current = None
    for _, b in ranked:
        if b.kind != current:
            current = b.kind
            sec.add(f"kind:{b.kind}", KIND_TITLES[b.kind], None)
        req = _baseline_for(b)
        base = baselines.get(req) if req else None
        key = b.bench_id or "/".join(
            str(x) for x in (b.name, b.impl, b.size, b.freelist_len, f"cpl{b.cpl}") if x is not None)
        sec.add(key, label(b), to_ns(b.figure, tsc_khz), cpl=b.cpl, indent=1,
                baseline=base, baseline_label=baseline_label(req) if req and base else "",
                extra={"kind": b.kind, "guest_name": b.name, "size": b.size, "freelist_len": b.freelist_len,
                       "impl": b.impl, "cycles": b.figure, "guest_extra": dict(b.extra)})
    if message:
        sec.message = message
    return sec


def growth_section(benches: list[GuestBench], tsc_khz: float, baselines: dict[tuple, dict]) -> Section | None:
    """How a small allocation's cost grows with the free list: each length beside length 1 (pure).

    One group per (benchmark, implementation, CPL) that the guest measured at
    several free-list lengths, and glibc at the same lengths. None if the
    guest reports no free-list lengths.
    """
    groups: dict[tuple, dict[int, GuestBench]] = {}
    for b in benches:
        if b.kind in ("small_alloc", "large_alloc") and b.freelist_len is not None:
            groups.setdefault((b.name, b.impl or "", -1 if b.cpl is None else b.cpl), {})[b.freelist_len] = b
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    sec = Section("guest_freelist", "Small allocation + free vs free-list length (each beside the shortest list)")
    lengths: set[int] = set()
    sizes: set[tuple] = set()
    for (name, impl, cpl), by_len in sorted(groups.items()):
        first = min(by_len)
        ref = to_ns(by_len[first].figure, tsc_khz)
        where = f", CPL {cpl}" if cpl >= 0 else ""
        sec.add(f"{name}/{impl}/cpl{cpl}", f"{name}{f' ({impl})' if impl else ''}{where}", None)
        for n in sorted(by_len):
            b = by_len[n]
            lengths.add(n)
            sizes.add((alloc_size(b),) + ((b.align,) if b.align > 16 else ()))
            sec.add(f"{name}/{impl}/cpl{cpl}/fl{n}", f"free list {n}", to_ns(b.figure, tsc_khz), indent=1,
                    cpl=None if cpl < 0 else cpl, baseline=ref if n != first else None,
                    baseline_label=f"free list {first}" if n != first else "")
    for shape in sorted(sizes):
        size, align = shape[0], shape[1:]
        host = {n: baselines[("malloc", size, n) + align] for n in sorted(lengths) if ("malloc", size, n) + align in baselines}
        if len(host) > 1:
            first = min(host)
            key = f"{size}" + (f"a{align[0]}" if align else "")
            sec.add(f"glibc/{key}", f"host: {baseline_label(('malloc', size, 0) + align)}", None)
            for n, fig in host.items():
                sec.add(f"glibc/{key}/fl{n}", f"{n} free chunk{'s' if n != 1 else ''}", fig, indent=1,
                        baseline=host[first] if n != first else None,
                        baseline_label=f"{first} free chunk{'s' if first != 1 else ''}" if n != first else "")
    return sec


def frag_reports(result) -> list[dict]:
    """The guest's fragmentation-trace results (INFO ``event=heap_frag``), one per allocator."""
    return [dict(r.fields) for r in result.reports_of(ReportKind.INFO) if r.get("event") == "heap_frag"]


def _int(d: dict, k: str) -> int:
    try:
        return int(d.get(k, 0))
    except (TypeError, ValueError):
        return 0


def frag_section(frags: list[dict]) -> Section | None:
    """Fragmentation after the same random churn traces on each allocator, first fit as baseline (pure).

    One report per (trace, allocator); each figure is the median (min, max)
    over the traces.
    """
    by: dict[str, list[dict]] = {}
    for f in frags:
        if f.get("allocator"):
            by.setdefault(f["allocator"], []).append(f)
    if not by:
        return None
    first = next(iter(by.values()))
    sec = Section("guest_frag", "Heap fragmentation after random churn traces (the same traces on each allocator)")
    sec.meta = {"ops": first[0].get("ops"), "cpl": first[0].get("cpl"), "traces": len(first),
                "seeds": [f.get("seed") for f in first], "live_bytes": [_int(f, "live_bytes") for f in first]}

    def figures(fs: list[dict]) -> dict[str, dict]:
        ratios = [_int(f, "free_bytes") / _int(f, "largest_free") if _int(f, "largest_free") else 0.0 for f in fs]
        return {
            "pages": summarize([_int(f, "pages") for f in fs], "pages"),
            "free_over_largest": summarize(ratios, "x"),
            "free_bytes": summarize([_int(f, "free_bytes") for f in fs], "bytes"),
            "largest_free": summarize([_int(f, "largest_free") for f in fs], "bytes"),
            "free_blocks": summarize([_int(f, "free_blocks") for f in fs], "blocks"),
        }

    labels = {"pages": "heap pages in use (high-water mark)", "free_over_largest": "free bytes / largest free block",
              "free_bytes": "free bytes", "largest_free": "largest free block", "free_blocks": "free blocks"}
    base = figures(by["list"]) if "list" in by else None
    for name in sorted(by, key=lambda n: (n != "tlsf", n)):
        fs = by[name]
        ok = all(f.get("check") == "ok" and not _int(f, "failed") for f in fs)
        sec.add(f"frag/{name}", f"{name} ({'check ok' if ok else 'CORRUPT or failed allocations'})", None)
        for key, value in figures(fs).items():
            baseline = base[key] if base is not None and name != "list" else None
            sec.add(f"frag/{name}/{key}", labels[key], value, indent=1, cpl=_int(fs[0], "cpl"),
                    baseline=baseline, baseline_label="first fit" if baseline else "")
    sec.message = (f"{len(first)} traces of {first[0].get('ops')} operations, "
                   f"{min(_int(f, 'live_bytes') for f in first)}-{max(_int(f, 'live_bytes') for f in first)} B live "
                   f"at the end; lower is better")
    return sec


def instruction_counts(result) -> list[tuple[str, str, int]]:
    """(name, impl, instructions) for each path the host single-stepped (pure)."""
    out = []
    for r in result.reports_of(ReportKind.BENCH):
        ident = r.int("icount_id")
        if r.get("unit") == "instructions" and ident is not None and ident in result.instruction_counts:
            out.append((r.get("name") or f"id {ident}", r.get("impl") or "", result.instruction_counts[ident]))
    return out


def icount_section(counts: list[tuple[str, str, int]]) -> Section | None:
    """Instructions per operation, counted by single-stepping (pure; any backend)."""
    if not counts:
        return None
    sec = Section("guest_icount", "Instructions per operation (the host single-steps the guest; same on every backend)")
    for name, impl, n in counts:
        label = f"{name} ({impl})" if impl else name
        sec.add(f"icount/{name}/{impl}", label, {"median": float(n), "min": float(n), "max": float(n), "n": 1,
                                                  "unit": "instructions"}, cpl=0)
    sec.message = ("what CPL0 emulation multiplies on KVM-PVM; a REP string instruction counts once per "
                   "iteration, as single-stepping traps after each")
    return sec


@dataclass
class BenchBoot:
    """What one boot with the guest's benchmarks on gave."""

    benches: list[GuestBench]
    tsc_khz: float
    problem: str  # '' when the guest exited cleanly
    icounts: list[tuple[str, str, int]]  # (path, implementation, instructions)
    frags: list[dict]  # fragmentation trace reports


def boot_benchmarks(image, cmdline: str, timeout: float, backend=None) -> BenchBoot:
    """One boot with the guest's benchmarks on: decoded BENCH reports, TSC kHz,
    instruction counts and fragmentation traces."""
    with Vm(image, VmConfig(memory=GUEST_RAM, cmdline=cmdline, timeout=timeout), backend=backend) as vm:
        tsc_khz = vm.tsc_khz
        result = vm.run()
    benches = [b for r in result.reports_of(ReportKind.BENCH) if (b := decode(r)) is not None]
    problem = "" if result.exit_code == 0 else f"guest stopped: {result.message} (exit {result.exit_code})"
    return BenchBoot(benches, tsc_khz, problem, instruction_counts(result), frag_reports(result))


def cpl_agreement(benches: list[GuestBench], backend: str, nested_under: str | None = None) -> str:
    """Compare each benchmark measured at both CPL0 and CPL3 (pure).

    On VMX/SVM both run natively, so the two should agree; on KVM-PVM CPL0 is
    emulated and the CPL3 figures are the hardware-speed ones. Says which.
    """
    pairs: dict[tuple, dict[int, float]] = {}
    for b in benches:
        if b.cpl in (0, 3) and b.figure.get("median"):
            key = (b.name, b.impl, b.size, b.freelist_len)
            pairs.setdefault(key, {})[b.cpl] = b.figure["median"]
    ratios = {k: v[0] / v[3] for k, v in pairs.items() if 0 in v and 3 in v and v[3] > 0}
    if not ratios:
        return ""
    lo, hi = min(ratios.values()), max(ratios.values())
    if backend == "PVM":
        return (f"CPL0 is emulated on this KVM-PVM host: CPL0 figures are x{lo:,.0f}-x{hi:,.0f} the CPL3 ones "
                f"({len(ratios)} benchmarks run both ways); the CPL3 rows show hardware speed")
    off = sorted((k[0] for k, r in ratios.items() if not 0.75 <= r <= 1.33))
    if nested_under:
        agree = sorted({k[0] for k, r in ratios.items() if 0.75 <= r <= 1.33})
        return (f"{backend} nested under {nested_under}: every figure is emulated, not hardware speed; "
                f"CPL0 and CPL3 agree within 25 % on {len(ratios) - len(off)} of {len(ratios)} benchmarks run both ways"
                + (f" ({', '.join(agree)})" if agree else "") + (f", not on {', '.join(off)}" if off else ""))
    if not off:
        return f"CPL0 and CPL3 agree within 25 % on all {len(ratios)} benchmarks run both ways ({backend})"
    return f"CPL0 and CPL3 disagree by more than 25 % on {', '.join(off)} ({backend}): look into it"


def list_allocator_cmdline(cmdline: str) -> str | None:
    """The extra boot that measures the first-fit list beside TLSF, if ``cmdline`` runs the heap benchmarks (pure)."""
    words = dict(w.split("=", 1) for w in cmdline.split() if "=" in w)
    if "allocator" in words:
        return None
    bench = set(words.get("bench", "").split(","))
    if not bench & {"all", "cpl3", "heap"}:
        return None
    extra = ",icount" if bench & {"all", "icount"} else ""
    rest = " ".join(w for w in cmdline.split() if not w.startswith("bench="))
    return f"bench=heap{extra} allocator=list" + (f" {rest}" if rest else "")


def run(image, runs: int, *, quick: bool, cmdline: str = "bench=all", timeout: float = 300.0,
        backend=None) -> list[Section]:
    all_runs, problems, tsc_khz = [], [], 0.0
    icounts: dict[tuple[str, str], int] = {}  # by (name, impl), the last boot's winning (they are exact)
    frags: list[dict] = []  # the last boot's that traced
    list_cmdline = list_allocator_cmdline(cmdline)
    for _ in range(runs):
        boots = [boot_benchmarks(image, cmdline, timeout, backend)]
        tsc_khz = boots[0].tsc_khz
        if boots[0].problem:
            problems.append(boots[0].problem)
        if not boots[0].benches:
            break  # a guest without benchmarks will not grow them on the next boot
        if list_cmdline:
            boots.append(boot_benchmarks(image, list_cmdline, timeout, backend))
            if boots[1].problem:
                problems.append(f"allocator=list: {boots[1].problem}")
        for boot in boots:
            icounts.update(((name, impl), n) for name, impl, n in boot.icounts)
            frags = boot.frags or frags
        all_runs.append([b for boot in boots for b in boot.benches])
    merged = merge_runs(all_runs)
    requests = baseline_requests(merged) if merged else {
        ("malloc", SMALL_DEFAULT, 0), ("malloc", LARGE_DEFAULT, 0), ("fault",), ("map",)}
    baselines, err = measure_baselines(requests, quick)
    agreement = cpl_agreement(merged, getattr(backend, "name", "UNKNOWN"), getattr(backend, "nested_under", None)) if merged else ""
    msgs = [m for m in (problems[0] if problems else "", err, agreement) if m]
    if not merged:
        msgs.insert(0, NO_BENCHMARKS)
    main = section_from(merged, tsc_khz, baselines, message="; ".join(msgs),
                        meta={"cmdline": cmdline, "boots": len(all_runs), "memory": GUEST_RAM})
    growth = growth_section(merged, tsc_khz, baselines)
    icount_sec = icount_section([(n, i, c) for (n, i), c in icounts.items()])
    frag = frag_section(frags)
    return [s for s in (main, growth, icount_sec, frag) if s is not None]
