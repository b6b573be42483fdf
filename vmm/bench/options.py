"""Options of ``vmm bench`` and how much each section runs (pure, light).

``vmm.cli`` calls ``add_arguments(parser)`` when it builds its parser;
``vmm.bench.cli`` runs the sections.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..units import parse_size, parse_sizes, positive_int

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=positive_int, metavar="N",
                        help="runs per figure: medians with min and max (default 10, --quick 3)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs and iterations: the whole report in under a minute (for CI)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    parser.add_argument("--only", type=parse_only, metavar="LIST", default=list(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--kernel", metavar="PATH", help="guest kernel ELF (default: build guest/)")
    parser.add_argument("--memory", type=parse_size, metavar="SIZE", default=128 << 20,
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
    watch_pairs: int  # watched windows, each between two unwatched ones, per workload
    watch_window: float  # seconds
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
            watch_pairs=6 if quick else 24,
            watch_window=0.5,
            scale_runs=1 if quick else min(runs, 3),
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)
