"""``vmm run``: boot a guest and stream its serial console; the exit code is the guest's.

This module is the plain path: nothing of the inspector, of snapshots,
numpy, ``mm`` or rich is loaded. ``--inspect``, ``--control``,
``--screenshot``, ``--save`` and ``--restore`` go through
``vmm.commands.run_full``, which adds to :func:`run` through ``RunExtras``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Callable, ContextManager

from .. import startup
from ..backend import detect_backend
from ..diagnostics import stop_report
from ..vm import RunResult, Vm, VmConfig
from .common import kernel_image, memory_size

Say = Callable[[str], None]


class RunExtras:
    """What a run adds beyond the plain boot; every hook does nothing here."""

    #: replaces the serial stream when set (a live view shows the console itself)
    console: Callable[[bytes], None] | None = None
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
    console = extras.console
    if console is None and not args.quiet:
        def console(data: bytes) -> None:
            stream.write(data)
            if b"\n" in data:
                stream.flush()

    say: Say = (lambda msg: None) if args.quiet else (lambda msg: print(f"vmm: {msg}", file=sys.stderr, flush=True))
    slide = 0 if args.no_kaslr else args.slide
    watched = bool(args.inspect or args.control)
    config = VmConfig(memory=size, cmdline=args.cmdline, slide=slide, timeout=args.timeout, dirty_log=watched)
    startup.mark("t_vm")
    vm = extras.make_vm(image, config, backend=backend, console=console, on_report=extras.on_report)
    with vm:
        say(
            f"{backend.banner} | RAM {size >> 20} MiB | kernel {image.path} | "
            f"slide {vm.slide:#x} | setup {vm.timings_ms['setup_total']:.2f} ms" + extras.banner()
        )
        with extras.attach(vm, say):
            result = vm.run()
        extras.finish(vm, result, say)
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
