"""``vmm bench``: options and the driver that runs the sections in order.

``vmm.cli`` calls ``add_arguments(parser)`` when it builds its parser and
``run(args)`` to execute. Each section runs on its own: one that fails is
reported (status ``error`` with the reason) and the others still run.
Progress goes to stderr, one line per section; the table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module to build its parser: no statistics until a bench runs
    from .stats import Section

SECTIONS = ("boot", "exits", "guest", "inspector", "gdb", "snapshot", "scale")
TITLES = {
    "boot": "Boot",
    "exits": "Exits",
    "guest": "Guest memory management",
    "inspector": "Host inspector",
    "gdb": "gdb stub",
    "snapshot": "Snapshots, reset and fork",
    "scale": "Scale",
}


def parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(bad) or '(none)'}: choose from {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]  # report order, not typing order


def parse_sizes(text: str) -> list[int]:
    from ..cli import parse_size

    return [parse_size(part) for part in text.split(",") if part.strip()]


def _size(text: str) -> int:
    from ..cli import parse_size

    return parse_size(text)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=positive_int, metavar="N",
                        help="runs per figure: medians with min and max (default 10, --quick 3)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs and iterations: the whole report in under a minute (for CI)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    parser.add_argument("--only", type=parse_only, metavar="LIST", default=list(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--kernel", metavar="PATH", help="guest kernel ELF (default: build guest/)")
    parser.add_argument("--memory", type=_size, metavar="SIZE", default=128 << 20,
                        help="guest RAM of the boot section (default 128M)")
    parser.add_argument("--exits", type=positive_int, metavar="N",
                        help="port writes per exit storm (default 20000, --quick 5000)")
    parser.add_argument("--sizes", type=parse_sizes, metavar="LIST",
                        help="guest RAM sizes for the scale section (default 16M,1G,16G,64G)")
    parser.add_argument("--snapshot-sizes", type=parse_sizes, metavar="LIST",
                        help="guest RAM sizes saved and loaded by the snapshot section (default 128M,16G,64G)")
    parser.add_argument("--guest-cmdline", default="bench=all", metavar="TEXT",
                        help="command line that turns the guest's benchmarks on (default bench=all)")


@dataclass(frozen=True)
class Plan:
    """How much of each section to run, from the options."""

    quick: bool
    runs: int
    process_runs: int
    exit_runs: int
    exits: int
    guest_boots: int
    inspector_iterations: int
    scale_runs: int

    @classmethod
    def from_args(cls, args) -> "Plan":
        quick = bool(args.quick)
        runs = args.runs or (3 if quick else 10)
        return cls(
            quick=quick,
            runs=runs,
            process_runs=min(runs, 3 if quick else 5),
            exit_runs=runs,
            exits=args.exits or (5000 if quick else 20000),
            guest_boots=1 if quick else min(runs, 3),
            inspector_iterations=10 if quick else max(10, 3 * runs),
            scale_runs=1 if quick else min(runs, 3),
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from ..abi import ExitCode
    from ..backend import detect_backend
    from . import report
    from .env import environment
    from .stats import Section

    t_start = time.perf_counter()
    plan = Plan.from_args(args)
    only = args.only if args.only else list(SECTIONS)
    backend = detect_backend()
    env = environment(backend)
    env["options"] = {**plan.to_json(), "only": only}
    _say(f"{backend.banner}")
    image = kernel = None
    if set(only) & {"boot", "guest", "inspector", "gdb", "snapshot", "scale"}:
        from ..elf import load_kernel_file
        from .kernel import pin, resolve_kernel

        kernel = pin(resolve_kernel(args.kernel))
        image = load_kernel_file(kernel.path)
        env["guest_kernel"] = str(kernel.source)
        env["guest_kernel_sha256"] = kernel.sha256
        env["guest_kernel_note"] = kernel.note
        if kernel.note:
            _say(f"guest kernel: {kernel.note}")

    def boot() -> Section:
        from . import boot as m

        _say(f"boot: {plan.runs} boots in this process, {plan.process_runs} in fresh processes ...")
        # The fresh processes run `vmm run` as a user does: the built guest through its
        # build-cache check and kernel cache, or --kernel as given.
        return m.run(image, str(kernel.path), plan.runs, plan.process_runs, backend, args.memory, cli_kernel=args.kernel)

    def exits() -> Section:
        from . import exits as m

        _say(f"exits: {plan.exit_runs} runs of a {plan.exits}-exit storm (Python, profiled, bare, C) ...")
        return m.run(plan.exits, plan.exit_runs, backend)

    def guest() -> list[Section]:
        from . import guest_mm as m

        _say(f"guest: {plan.guest_boots} boot(s) with '{args.guest_cmdline}', then host baselines ...")
        return m.run(image, plan.guest_boots, quick=plan.quick, cmdline=args.guest_cmdline, backend=backend)

    def inspector() -> Section:
        from . import inspector as m

        _say(f"inspector: {plan.inspector_iterations} snapshots and refreshes of a running guest ...")
        return m.run(image, plan.inspector_iterations, backend)

    def gdb() -> Section:
        from . import gdb as m

        runs = 2 if plan.quick else min(plan.runs, 5)
        _say(f"gdb: {runs} runs of m 4 KiB, stepi and continue-to-breakpoint against a held guest ...")
        return m.run(image, runs, backend)

    def snapshot() -> Section:
        from . import snapshot as m

        sizes = args.snapshot_sizes or m.SAVE_SIZES
        _say(f"snapshot: reset/fork of a zygote, test VMs per second (1 and 2 processes), save/load at "
             f"{', '.join(f'{s >> 20} MiB' for s in sizes)} ...")
        return m.run(image, str(kernel.path), plan.runs, backend, quick=plan.quick, sizes=sizes)

    def scale() -> Section:
        from . import scale as m

        sizes = args.sizes or m.SIZES
        _say(f"scale: {plan.scale_runs} boot(s) of each of {', '.join(m.human(s) for s in sizes)} ...")
        return m.run(str(kernel.path), plan.scale_runs, sizes)

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
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=180)
    console.print(report.render(env, sections))
    console.print(f"({elapsed:.1f} s)")
    if args.json:
        report.write_json(args.json, report.to_json(env, sections, elapsed))
        _say(f"JSON written to {args.json}")
    if sections and all(s.status == "error" for s in sections):
        return ExitCode.HOST_ERROR
    return 0
