"""Options of ``vmm run --save/--save-at/--restore`` (light: ``vmm.cli`` adds
them to its parser without loading the snapshot machinery)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..abi import ReportKind
from .errors import SnapshotError

SAVE_AT_HELP = "ready (the guest's READY report, default), exit (when the run ends), report:KIND (first report of KIND, e.g. report:TEST_RESULT) or SECONDS after the start"


@dataclass(frozen=True)
class SaveAt:
    kind: str  # "ready" | "exit" | "report" | "seconds"
    report: ReportKind | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.kind == "report":
            return f"report:{self.report.name}"
        if self.kind == "seconds":
            return f"{self.seconds:g}s"
        return self.kind


def parse_save_at(text: str) -> SaveAt:
    t = text.strip()
    low = t.lower()
    if low in ("ready", "exit"):
        return SaveAt(low)
    if low.startswith("report:"):
        name = t.split(":", 1)[1].strip().upper()
        try:
            return SaveAt("report", report=ReportKind[name])
        except KeyError:
            kinds = ", ".join(k.name for k in ReportKind)
            raise argparse.ArgumentTypeError(f"unknown report kind {name!r} (one of {kinds})") from None
    try:
        seconds = float(low.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--save-at {text!r}: expected {SAVE_AT_HELP}") from None
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"--save-at {text!r}: seconds must be a finite number >= 0")
    return SaveAt("seconds", seconds=seconds)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("snapshots")
    g.add_argument("--save", metavar="FILE", help="save the guest to FILE (an ELF core file) at --save-at; the run goes on")
    g.add_argument("--save-at", type=parse_save_at, metavar="WHEN", help=SAVE_AT_HELP)
    g.add_argument(
        "--save-layout", choices=("compact", "sparse"), default="compact",
        help="compact: one PT_LOAD per run of non-zero pages (default); sparse: one PT_LOAD over all RAM, "
        "zero pages as file holes (for tools such as Volatility that only see pages inside a segment)",
    )
    g.add_argument("--restore", metavar="FILE", help="resume a guest saved with --save instead of booting one")
    g.add_argument(
        "--kernel-mismatch-ok", action="store_true",
        help="resume even if the kernel's sha256 differs from the one saved",
    )


def check_run_arguments(args) -> None:
    """Combinations that make no sense, refused before anything starts."""
    if args.save_at is not None and not args.save:
        raise SnapshotError("--save-at needs --save FILE")
    if args.restore:
        for flag, value in (("--cmdline", args.cmdline), ("--slide", args.slide), ("--no-kaslr", args.no_kaslr)):
            if value:
                raise SnapshotError(f"{flag} cannot be combined with --restore (the snapshot holds the guest's own)")
