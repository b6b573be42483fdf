"""``vmm run``: boot a guest and stream its serial console; the exit code is the guest's.

This module is the plain path: nothing of the inspector, of snapshots,
numpy, ``mm`` or rich is loaded. ``--inspect``, ``--control``,
``--screenshot``, ``--save`` and ``--restore`` go through
``vmm.commands.run_full``, which adds to :func:`run` through ``RunExtras``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Callable, ContextManager

from .. import startup
from ..abi import ExitCode
from ..devices import Stop
from ..backend import detect_backend
from ..diagnostics import stop_report
from ..run_result import RunResult
from ..vm import Vm, VmConfig
from .common import kernel_image, memory_size

Say = Callable[[str], None]


class RunExtras:
    """What a run adds beyond the plain boot; every hook does nothing here."""

    def make_console(self, stream) -> Callable[[bytes], None] | None:
        """Replaces the serial stream when it returns one (a live view shows the console itself)."""
        return None

    #: called with every report (vmm.vm.Vm's on_report)
    on_report = None

    def prepare(self, args, image) -> int | None:
        """Before the VM exists; may return the RAM size (a restored guest's)."""
        return None

    def make_vm(self, image, config: VmConfig, **kw) -> Vm:
        return Vm(image, config, **kw)

    def banner(self) -> str:
        return ""

    def attach(self, vm: Vm, say: Say) -> ContextManager:
        """Entered around ``vm.run()`` (a live view, a control socket, a timed save)."""
        return contextlib.nullcontext()

    def finish(self, vm: Vm, result: RunResult, say: Say) -> None:
        """After the run, while the guest's memory still exists."""

    def add_json(self, out: dict) -> None:
        pass


@contextlib.contextmanager
def stop_on_sigterm(vm: Vm):
    """SIGTERM stops the guest like Ctrl-C does, so the run unwinds (a control
    socket is removed, the stop is reported) instead of dying mid-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(_signum, _frame):
        vm.request_stop(Stop(ExitCode.TERMINATED, "terminated", "terminated by SIGTERM"))

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def discard_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null so that the interpreter's
    final flush does not complain about the broken pipe."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(args) -> int:
    return run(args, RunExtras())


def run(args, extras: RunExtras) -> int:
    """Boot, run to the end, print the result."""
    startup.mark("t_imports")
    t_start = time.perf_counter_ns()
    image = kernel_image(args, quiet=args.quiet or args.json)
    size = extras.prepare(args, image) or memory_size(args)
    backend = detect_backend()
    stream = sys.stderr.buffer if args.json else sys.stdout.buffer
    pipe_closed = threading.Event()
    running: list[Vm] = []

    def guarded(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def console(data: bytes) -> None:
            if pipe_closed.is_set():
                return
            try:
                write(data)
            except BrokenPipeError:  # `vmm run | head`: end the run, quietly
                pipe_closed.set()
                if running:
                    running[0].request_stop(Stop(ExitCode.BROKEN_PIPE, "broken-pipe", "stdout was closed"))

        return console

    def raw_console(data: bytes) -> None:
        stream.write(data)
        if b"\n" in data:
            stream.flush()

    console = extras.make_console(stream)
    if console is None and not args.quiet:
        console = raw_console
    if console is not None:
        console = guarded(console)

    say: Say = (lambda msg: None) if args.quiet else (lambda msg: print(f"vmm: {msg}", file=sys.stderr, flush=True))
    slide = 0 if args.no_kaslr else args.slide
    watched = bool(args.inspect or args.control)
    config = VmConfig(memory=size, cmdline=args.cmdline, slide=slide, timeout=args.timeout, dirty_log=watched)
    startup.mark("t_vm")
    vm = extras.make_vm(image, config, backend=backend, console=console, on_report=extras.on_report)
    with vm, stop_on_sigterm(vm):
        running.append(vm)
        say(
            f"{backend.banner} | RAM {size >> 20} MiB | kernel {image.path} | "
            f"slide {vm.slide:#x} | setup {vm.timings_ms['setup_total']:.2f} ms" + extras.banner()
        )
        with extras.attach(vm, say):
            result = vm.run()
        extras.finish(vm, result, say)
    if pipe_closed.is_set() or result.stop_reason == "broken-pipe":
        discard_stdout()
        return ExitCode.BROKEN_PIPE
    stream.flush()
    result.timings_ms["process_total"] = (time.perf_counter_ns() - t_start) / 1e6
    startup.mark("t_done")
    startup.write(timings_ms=result.timings_ms, exit_code=result.exit_code, symbols_loaded=image.symbols_loaded,
                  kernel=image.path, cache_hit=bool(getattr(image.cache, "loaded", False)))
    if args.json:
        out = result.to_json()
        out["kernel"] = image.path
        out["cpu_model"] = backend.cpu_model
        extras.add_json(out)
        print(json.dumps(out))
    else:
        # Never hidden by -q: the stop message and the fault report say why.
        print("\n".join(stop_report(result)), file=sys.stderr, flush=True)
    return result.exit_code
