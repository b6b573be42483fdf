"""``vmm pt``: one consistent snapshot of a guest's page tables, audits,
physical memory and heap: from a running VM's control socket, a snapshot
file (``--snapshot``, ``--diff``), or a guest booted to its READY point."""

from __future__ import annotations

import json
import sys
import time

from ..abi import ExitCode, ReportKind
from ..devices import Stop
from ..errors import UsageError
from ..inspector.control import RemoteTarget
from ..inspector.picture import write_png
from ..inspector.snapshot import take_snapshot
from ..inspector.target import LocalTarget
from ..inspector.views import inspect
from ..render import console
from ..snapshot.offline import SnapshotTarget
from ..vm import Vm, VmConfig
from .common import kernel_image, memory_size
from .filters import run_filter
from .screenshot import save_screenshot


def main(args) -> int:
    flt = run_filter(args)
    if args.diff and not args.snapshot:
        raise UsageError("--diff FILE compares two snapshots: give the earlier one with --snapshot")
    if args.snapshot:
        if args.socket:
            raise UsageError("give either SOCKET or --snapshot FILE, not both")
        with SnapshotTarget.open(args.snapshot) as target:
            if args.diff:
                with SnapshotTarget.open(args.diff) as later:
                    return _print_inspection(args, later, flt, earlier=target)
            return _print_inspection(args, target, flt)
    if args.socket:
        with RemoteTarget(args.socket) as target:
            return _print_inspection(args, target, flt)
    size = memory_size(args)
    image = kernel_image(args, quiet=True)

    def at_ready(report):
        if report.kind == ReportKind.READY:
            return Stop(ExitCode.SUCCESS, "ready", "stopped at the guest's READY point for inspection")
        return None

    with Vm(image, VmConfig(memory=size, cmdline=args.cmdline, timeout=60), on_report=at_ready) as vm:
        result = vm.run()
        if result.stop_reason != "ready":
            raise UsageError(f"the guest stopped before its READY point: {result.message}")
        return _print_inspection(args, LocalTarget(vm), flt)


def _print_inspection(args, target, flt, earlier=None) -> int:
    snap = take_snapshot(target)
    previous = take_snapshot(earlier) if earlier is not None else None
    if args.diff_after:
        time.sleep(args.diff_after)
        previous, snap = snap, take_snapshot(target)
    view = inspect(snap, target.physmem, flt=flt, previous=previous)
    if args.png:
        if view.physical is None:
            raise UsageError("the guest did not report its frame bitmap: no physical-memory picture")
        title = f"guest physical memory by owner | RAM {snap.facts.ram_size >> 20} MiB | KASLR slide {snap.facts.kaslr_slide:#x}"
        try:
            w, h = write_png(view.physical, args.png, title)
        except OSError as exc:
            raise UsageError(f"cannot write {args.png}: {exc.strerror}") from None
        print(f"vmm: wrote {args.png} ({w}x{h}, physical memory by owner)", file=sys.stderr)
    if args.screenshot:
        save_screenshot(target.physmem, snap.facts.ram_size, args.screenshot)
    if args.json:
        print(json.dumps(view.to_json()))
    else:
        console().print(view.render(max_rows=len(view.runs) if args.all else 200))
    return 0
