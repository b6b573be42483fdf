"""Command-line side of snapshots: `vmm run --save/--restore` options and
the plan that saves a running guest at the requested point.

Kept out of ``vmm.cli`` so that the run command only wires it in.
"""

from __future__ import annotations

import argparse
import math
import threading
from dataclasses import dataclass

from ..abi import ReportKind
from .format import SnapshotError

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


class SavePlan:
    """Saves ``vm`` once, at the point ``when`` names."""

    def __init__(self, path: str, when: SaveAt, say=lambda msg: None, layout: str = "compact"):
        self.path = path
        self.layout = layout
        self.when = when
        self.say = say
        self.vm = None
        self.info: dict | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def attach(self, vm) -> None:
        self.vm = vm

    def _save(self) -> None:
        from .machine import save_vm

        with self._lock:
            if self.info is not None:
                return
            self.info = save_vm(self.vm, self.path, str(self.when), self.layout)
        i = self.info
        self.say(
            f"saved {self.path} at {self.when}: {i['segments']} segments, {i['stored_bytes'] >> 10} KiB of RAM, "
            f"file {i['file_bytes'] >> 10} KiB ({i['disk_bytes'] >> 10} KiB on disk, {i['layout']}), {i['save_ms']:.1f} ms"
        )

    # Called by the Vm for every report, in the vCPU thread (the vCPU is out of KVM_RUN).
    def on_report(self, report):
        if self.info is None and (
            (self.when.kind == "ready" and report.kind == ReportKind.READY)
            or (self.when.kind == "report" and report.kind == self.when.report)
        ):
            self._save()
        return None

    def start(self) -> None:
        if self.when.kind == "seconds":
            self._timer = threading.Timer(self.when.seconds, self._save_paused)
            self._timer.daemon = True
            self._timer.start()

    def _save_paused(self) -> None:
        try:
            with self.vm.paused() as parked:
                if parked:
                    self._save()
        except BaseException as exc:  # reported by finish() in the main thread
            self.error = exc

    def finish(self, result) -> None:
        """After the run: save at exit, or say why nothing was saved."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self.error is not None:
            raise self.error
        if self.info is None and self.when.kind == "exit" and result.stop_reason != "interrupted":
            self._save()
        if self.info is None:
            raise SnapshotError(
                f"nothing saved: the guest stopped before --save-at {self.when} ({result.message}, exit code {result.exit_code})"
            )


def open_for_run(args, image):
    """The snapshot ``--restore`` names, checked against the kernel and --memory."""
    from .machine import check_compatible, open_snapshot

    snap = open_snapshot(args.restore)
    try:
        check_compatible(snap, image, memory=args.memory, kernel_mismatch_ok=args.kernel_mismatch_ok)
    except BaseException:
        snap.close()
        raise
    return snap


def plan_for_run(args, say=None) -> SavePlan:
    when = args.save_at or SaveAt("exit" if args.restore else "ready")
    return SavePlan(args.save, when, say or (lambda msg: None), layout=args.save_layout)


def memmap_of_snapshot(path: str):
    """(RAM size, the memory map the guest was given), read from the saved RAM
    where BootInfo says it is, like the guest itself read it."""
    from mm.errors import MMError
    from mm.memmap import MemoryMap

    from ..abi import BOOT_INFO_MAGIC
    from .offline import SnapshotTarget

    with SnapshotTarget.open(path) as target:
        info = target.snap.state.boot_info
        size = target.snap.memory_size
        if info is None or info.magic != BOOT_INFO_MAGIC:
            raise SnapshotError(f"snapshot {path}: no valid BootInfo note")
        n = info.memmap_count * info.memmap_desc_size
        if not info.memmap_desc_size or not target.memory.contains(info.memmap_phys, n):
            raise SnapshotError(f"snapshot {path}: the BootInfo's memory map lies outside RAM")
        try:
            return size, MemoryMap.parse(target.memory.read(info.memmap_phys, n), info.memmap_desc_size, ram_size=size)
        except MMError as exc:
            raise SnapshotError(f"snapshot {path}: saved memory map: {exc}") from None
