"""``vmm bench``: the driver that runs the sections in order.

Each section runs on its own: one that fails is reported (status ``error``
with the reason) and the others still run. Progress goes to stderr, one line
per section; the table to stdout. The options are in ``vmm.bench.options``.
"""

from __future__ import annotations

import sys
import time

from ..abi import ExitCode
from ..backend import detect_backend
from ..elf import load_kernel_file
from ..render import console as rich_console
from ..units import human_size
from . import boot as boot_section
from . import exits as exits_section
from . import gdb as gdb_section
from . import guest_mm as guest_section
from . import inspector as inspector_section
from . import report
from . import scale as scale_section
from . import snapshot as snapshot_section
from .env import environment
from .kernel import pin, resolve_kernel
from .options import SECTIONS, TITLES, Plan
from .stats import Section


def main(args) -> int:
    return run(args)


def _say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    t_start = time.perf_counter()
    plan = Plan.from_args(args)
    only = args.only if args.only else list(SECTIONS)
    backend = detect_backend()
    env = environment(backend)
    env["options"] = {**plan.to_json(), "only": only}
    _say(f"{backend.banner}")
    image = kernel = None
    if set(only) & {"boot", "guest", "inspector", "gdb", "snapshot", "scale"}:
        kernel = pin(resolve_kernel(args.kernel))
        image = load_kernel_file(kernel.path)
        env["guest_kernel"] = str(kernel.source)
        env["guest_kernel_sha256"] = kernel.sha256
        env["guest_kernel_note"] = kernel.note
        if kernel.note:
            _say(f"guest kernel: {kernel.note}")

    def boot() -> Section:
        _say(f"boot: {plan.runs} boots in this process, {plan.process_runs} in fresh processes ...")
        # The fresh processes run `vmm run` as a user does: the built guest through its
        # build-cache check and kernel cache, or --kernel as given.
        return boot_section.run(image, str(kernel.path), plan.runs, plan.process_runs, backend, args.memory,
                                cli_kernel=args.kernel)

    def exits() -> Section:
        _say(f"exits: {plan.exit_runs} runs of a {plan.exits}-exit storm (Python, profiled, bare, C) ...")
        return exits_section.run(plan.exits, plan.exit_runs, backend)

    def guest() -> list[Section]:
        _say(f"guest: {plan.guest_boots} boot(s) with '{args.guest_cmdline}', then host baselines ...")
        return guest_section.run(image, plan.guest_boots, quick=plan.quick, cmdline=args.guest_cmdline, backend=backend)

    def inspector() -> Section:
        _say(f"inspector: {plan.inspector_iterations} snapshots and refreshes of a running guest, then "
             f"each workload in one guest, {plan.watch_pairs} windows of {plan.watch_window:g} s watched at 10 Hz "
             f"between unwatched ones ...")
        return inspector_section.run(image, plan.inspector_iterations, backend, watch_pairs=plan.watch_pairs,
                                     watch_window=plan.watch_window)

    def gdb() -> Section:
        runs = 2 if plan.quick else min(plan.runs, 5)
        _say(f"gdb: {runs} runs of m 4 KiB, stepi and continue-to-breakpoint against a held guest ...")
        return gdb_section.run(image, runs, backend)

    def snapshot() -> Section:
        sizes = args.snapshot_sizes or snapshot_section.SAVE_SIZES
        _say(f"snapshot: reset/fork of a zygote, test VMs per second (1 and 2 processes), save/load at "
             f"{', '.join(f'{s >> 20} MiB' for s in sizes)} ...")
        return snapshot_section.run(image, str(kernel.path), plan.runs, backend, quick=plan.quick, sizes=sizes)

    def scale() -> Section:
        sizes = args.sizes or scale_section.SIZES
        _say(f"scale: {plan.scale_runs} boot(s) of each of {', '.join(human_size(s) for s in sizes)} ...")
        return scale_section.run(str(kernel.path), plan.scale_runs, sizes)

    runners = {"boot": boot, "exits": exits, "guest": guest, "inspector": inspector, "gdb": gdb, "snapshot": snapshot, "scale": scale}
    sections: list[Section] = []
    for name in only:
        t0 = time.perf_counter()
        try:
            got = runners[name]()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one section failing must not lose the others
            got = Section(name, TITLES[name], status="error", message=f"{type(exc).__name__}: {exc}")
        got = got if isinstance(got, list) else [got]
        sec = got[0]  # the area's own section; others (e.g. guest_freelist) follow it
        sec.elapsed_s = time.perf_counter() - t0
        sections.extend(got)
        tail = f" ({sec.message})" if sec.status != "ok" and sec.message else ""
        _say(f"{name}: {sec.status} in {sec.elapsed_s:.1f} s{tail}")
        if name == "guest" and sec.meta.get("tsc_khz"):
            env["tsc_khz"] = sec.meta["tsc_khz"]

    elapsed = time.perf_counter() - t_start
    console = rich_console(width=120)
    console.print(report.render(env, sections))
    console.print(f"({elapsed:.1f} s)")
    if args.json:
        report.write_json(args.json, report.to_json(env, sections, elapsed))
        _say(f"JSON written to {args.json}")
    if sections and all(s.status == "error" for s in sections):
        return ExitCode.HOST_ERROR
    return 0
