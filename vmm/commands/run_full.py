"""``vmm run`` with the inspector, snapshots or the gdb stub: ``--inspect``,
``--control``, ``--screenshot``, ``--save``/``--save-at``, ``--restore`` and
``--gdb``. The plain run of ``vmm.commands.run`` with these attached through
its ``RunExtras``.

The inspector (numpy, rich) and the PNG writer are imported when their
option is given, as the gdb stub is (``vmm.gdbstub.cli``): a ``--save`` or
``--restore`` run starts as light as a plain one."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from ..errors import UsageError
from ..gdbstub.cli import check_run_arguments as check_gdb_arguments
from ..gdbstub.cli import serving
from ..snapshot.commands import check_run_arguments, open_for_run, plan_for_run
from ..snapshot.machine import restore_vm
from ..run_result import RunResult
from ..vm import Vm, VmConfig
from .run import RunExtras, Say, run


class FullRun(RunExtras):
    def __init__(self, args):
        self.args = args
        self.viewed = None  # full screen (inspector.live.ViewedConsole): the console goes into the view
        self.sink = None  # piped --inspect (inspector.live.LineSink): status lines between whole console lines
        self.restore = None
        self.saver = None

    def prepare(self, args, image) -> int | None:
        check_run_arguments(args)
        check_gdb_arguments(args, UsageError)
        self.kernel_path = image.path
        self.restore = open_for_run(args, image) if args.restore else None
        self.saver = plan_for_run(args, say=None) if args.save else None
        self.on_report = self.saver.on_report if self.saver is not None else None
        return self.restore.memory_size if self.restore is not None else None

    def make_console(self, stream):
        args = self.args
        if not args.inspect:
            return None
        from ..inspector.live import LineSink, ViewedConsole
        from ..inspector.tui import ConsoleHistory

        if sys.stdout.isatty() and sys.stdin.isatty():
            # out again when the view closes (q), as if there had been no view
            self.viewed = ViewedConsole(None if args.quiet else stream, ConsoleHistory())
            return self.viewed.feed
        if args.quiet:
            return None
        self.sink = LineSink(stream)
        return self.sink.feed

    def make_vm(self, image, config: VmConfig, **kw) -> Vm:
        if self.restore is not None:
            with self.restore:
                vm = restore_vm(self.restore, image, config, **kw)
        else:
            vm = Vm(image, config, **kw)
        if self.saver is not None:
            self.saver.attach(vm)
        return vm

    def banner(self) -> str:
        if self.restore is None:
            return ""
        return f" | resumed from {self.args.restore} (saved at {self.restore.meta['saved_at']})"

    @contextlib.contextmanager
    def attach(self, vm: Vm, say: Say):
        args = self.args
        server = viewer = None
        stop_view = threading.Event()
        errors: list[str] = []
        try:
            if args.control:
                from ..inspector.control import ControlServer

                server = ControlServer(vm, args.control)
                say(f"control socket: {args.control} (attach with `vmm inspect {args.control}`)")
            if args.inspect:
                viewer = self._start_view(vm, stop_view, errors)
            if self.saver is not None:
                self.saver.say = say
                self.saver.start()
            warn = lambda msg: print(f"vmm: warning: {msg}", file=sys.stderr, flush=True)  # noqa: E731
            with serving(vm, args, say, warn, self.kernel_path, UsageError):
                yield
        finally:
            stop_view.set()
            if viewer is not None:
                viewer.join(timeout=5)
            if server is not None:
                server.close()
            if self.viewed is not None:
                self.viewed.release()
            if self.sink is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.sink.close()
            for err in errors:
                print(f"vmm: live view: {err}", file=sys.stderr)

    def _start_view(self, vm: Vm, stop_view: threading.Event, errors: list[str]) -> threading.Thread:
        """The live view in its own thread (the vCPU runs in this one): full screen
        with keys on a terminal, one status line a second otherwise."""
        from ..inspector.live import live_view
        from ..inspector.target import LocalTarget
        from ..inspector.tui import run_tui

        target = LocalTarget(vm)
        args = self.args

        def view():
            while not vm.running and not stop_view.is_set():  # wait for the vCPU to start
                time.sleep(0.001)
            try:
                if self.viewed is not None:
                    run_tui(target, history=self.viewed.history, is_running=lambda: vm.running, stop=stop_view,
                            hz=args.hz)
                else:
                    live_view(target, is_running=lambda: vm.running, stop=stop_view, hz=args.hz,
                              emit=self.sink.line if self.sink is not None else None)
            except Exception as exc:  # reported after the run; the guest is not disturbed
                if vm.running:
                    errors.append(str(exc))
            finally:
                if self.viewed is not None:
                    self.viewed.release()  # q: the console streams on as without the view

        thread = threading.Thread(target=view, name="vmm-live-view", daemon=True)
        thread.start()
        return thread

    def finish(self, vm: Vm, result: RunResult, say: Say) -> None:
        if self.saver is not None:
            self.saver.finish(result)
        if self.args.screenshot:
            from .screenshot import save_screenshot

            save_screenshot(vm.memory, vm.memory.size, self.args.screenshot)
            say(f"framebuffer saved to {self.args.screenshot}")

    def add_json(self, out: dict) -> None:
        if self.saver is not None:
            out["snapshot"] = self.saver.info
        if self.restore is not None:
            out["restored_from"] = {"path": self.args.restore, "saved_at": self.restore.meta["saved_at"],
                                    "serial_offset": self.restore.meta.get("serial_offset", 0)}


def main(args) -> int:
    return run(args, FullRun(args))
