"""Command-line side of snapshots: the plan that saves a running guest at the
requested point, and opening the snapshot ``--restore`` names.

The options themselves are in ``vmm.snapshot.options`` (light: ``vmm.cli``
adds them to its parser); the run command wires this in.
"""

from __future__ import annotations

import threading

from ..abi import ReportKind
from .format import SnapshotError
from .machine import check_compatible, open_snapshot, save_vm
from .options import SAVE_AT_HELP, SaveAt, add_run_arguments, check_run_arguments, parse_save_at

__all__ = ["SAVE_AT_HELP", "SaveAt", "SavePlan", "add_run_arguments", "check_run_arguments", "open_for_run",
           "parse_save_at", "plan_for_run"]


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

