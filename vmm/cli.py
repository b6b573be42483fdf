"""Command line: ``vmm run``, ``vmm memmap``, ``vmm build``.

Bad input gets one line naming the problem and a non-zero exit code, never a
traceback: every error type the VMM raises on purpose is caught here.
"""

from __future__ import annotations

from . import startup  # first: its clock reading is where the interpreter's start ends

import argparse
import json
import os
import re
import sys
import time

from .abi import ExitCode

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

EPILOG = """\
exit codes:
  0-5      the guest's own status (0 success, 1 test failure, 3 panic,
           4 stack overflow, 5 unexpected fault)
  2        bad input or options
  70       host problem (no /dev/kvm, no Rust toolchain, ...)
  100-107  the guest stopped abnormally (100 triple fault, 101 emulation
           failure, 102 entry failure, 103 halted, 104 unknown port,
           105 unbacked MMIO, 107 write to read-only kernel memory)
  124      the watchdog (--timeout) stopped the guest
"""


class UsageError(ValueError):
    pass


def parse_size(text: str) -> int:
    """'64M', '2G', '128MiB', '16777216' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse memory size {text!r} (examples: 64M, 2G, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"timeout must be a positive number of seconds, got {text!r}")
    return value


def parse_slide(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"slide {text!r} is not an integer (e.g. 0x200000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("slide must not be negative")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _add_guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="PATH", help="ELF64 x86-64 kernel (default: build and use guest/)")
    p.add_argument(
        "--memory", "-m", metavar="SIZE", type=parse_size, default=None,
        help="guest RAM, 16M..64G, a multiple of 4 KiB (default 128M)",
    )


def parse_page_size(text: str) -> int:
    sizes = {"4k": 4096, "2m": 2 << 20, "1g": 1 << 30}
    try:
        return sizes[text.strip().lower().removesuffix("ib").removesuffix("b")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"page size {text!r} is not one of 4K, 2M, 1G") from None


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x, 0) for x in text.split(":", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"range {text!r} is not START:END (e.g. 0xffff800000000000:0xffff800040000000)") from None
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"range {text!r} is empty")
    return lo, hi


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combine freely)")
    g.add_argument("--writable", dest="writable", action="store_const", const=True, help="only writable runs")
    g.add_argument("--readonly", dest="writable", action="store_const", const=False, help="only read-only runs")
    g.add_argument("--executable", dest="executable", action="store_const", const=True, help="only executable runs")
    g.add_argument("--nx", dest="executable", action="store_const", const=False, help="only no-execute runs")
    g.add_argument("--user", dest="user", action="store_const", const=True, help="only user-accessible runs")
    g.add_argument("--supervisor", dest="user", action="store_const", const=False, help="only supervisor runs")
    g.add_argument("--kernel-half", dest="kernel_half", action="store_const", const=True, help="only the upper half")
    g.add_argument("--user-half", dest="kernel_half", action="store_const", const=False, help="only the lower half")
    g.add_argument("--page-size", type=parse_page_size, metavar="4K|2M|1G", help="only runs of this page size")
    g.add_argument("--range", type=parse_range, metavar="START:END", help="only runs overlapping this virtual range")
    g.add_argument("--label", metavar="TEXT", help="only runs whose label contains TEXT (heap, stack, text, ...)")


def _filter_from(args):
    from .inspector.snapshot import RunFilter

    lo, hi = args.range if args.range else (None, None)
    return RunFilter(
        writable=args.writable, executable=args.executable, user=args.user, kernel_half=args.kernel_half,
        page_size=args.page_size, start=lo, end=hi, label=args.label,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vmm",
        description="A Python VMM on Linux KVM that boots a Rust guest kernel straight into 64-bit long mode.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="boot a guest and stream its serial console",
        description="Boot a guest kernel and stream its serial console. The exit code is the guest's.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_guest_options(run)
    run.add_argument("--timeout", "-t", type=parse_timeout, metavar="SECONDS", help="watchdog: stop the guest after this long")
    run.add_argument("--quiet", "-q", action="store_true", help="do not print the serial console or the banner")
    run.add_argument("--json", action="store_true", help="print one JSON object with the result on stdout")
    run.add_argument("--cmdline", "-c", default="", metavar="TEXT", help="guest command line, e.g. 'tests=all'")
    run.add_argument("--slide", type=parse_slide, metavar="BYTES", help="KASLR slide (2 MiB multiple; default random)")
    run.add_argument("--no-kaslr", action="store_true", help="load the kernel at its link address (slide 0)")
    run.add_argument("--inspect", action="store_true", help="show a live view of the guest's memory management beside its console")
    run.add_argument("--hz", type=float, default=10.0, help="refresh rate of --inspect (default 10)")
    run.add_argument("--control", metavar="SOCKET", help="serve this VM on a UNIX socket for `vmm inspect` / `vmm pt`")
    run.add_argument("--screenshot", metavar="FILE.png", help="save the guest's framebuffer as PNG when it stops")
    from .snapshot.commands import add_run_arguments as _snapshot_args

    _snapshot_args(run)
    from .gdbstub.cli import add_run_arguments as _gdb_args

    _gdb_args(run)

    mm = sub.add_parser(
        "memmap",
        help="print the memory map the guest would be given",
        description="Print the UEFI-like memory map the guest receives for these options.",
    )
    _add_guest_options(mm)
    mm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mm.add_argument("--snapshot", metavar="FILE", help="print the memory map a saved guest was given (from its RAM)")

    pt = sub.add_parser(
        "pt",
        help="print one consistent snapshot of the guest's page tables",
        description=(
            "Print one consistent snapshot of a guest's page tables, audits, physical memory and heap. "
            "With SOCKET, attach to a VM started with `vmm run --control SOCKET`; without, boot the "
            "default guest, stop it at its READY point, print, and shut it down."
        ),
    )
    pt.add_argument("socket", nargs="?", metavar="SOCKET", help="control socket of a running VM")
    pt.add_argument("--snapshot", metavar="FILE", help="inspect a snapshot file (vmm run --save) instead of a guest")
    pt.add_argument("--diff", metavar="FILE", help="with --snapshot: compare with this later snapshot")
    _add_guest_options(pt)
    pt.add_argument("--cmdline", "-c", default="", metavar="TEXT", help="guest command line (when booting)")
    pt.add_argument("--json", action="store_true", help="print the inspection as JSON (schema in docs/INSPECT.md)")
    pt.add_argument("--all", action="store_true", help="print every run (default: the first 200)")
    pt.add_argument("--png", metavar="FILE.png", help="save a picture of physical memory by owner")
    pt.add_argument("--screenshot", metavar="FILE.png", help="save the guest's framebuffer")
    pt.add_argument("--diff-after", type=parse_timeout, metavar="S", help="take a second snapshot S seconds later and show the diff")
    _add_filters(pt)

    insp = sub.add_parser(
        "inspect",
        help="attach a live view to a VM started with --control",
        description="Attach to a VM started with `vmm run --control SOCKET` and show the live view.",
    )
    insp.add_argument("socket", metavar="SOCKET")
    insp.add_argument("--hz", type=float, default=10.0, help="refresh rate (default 10)")
    insp.add_argument("--duration", type=parse_timeout, metavar="S", help="stop after S seconds")
    _add_filters(insp)

    snap = sub.add_parser(
        "snapshot",
        help="save a running guest (vmm run --control SOCKET) to an ELF core file",
        description="Save a guest started with `vmm run --control SOCKET` to FILE; the vCPU is parked only "
        "while its state and touched RAM are copied. Resume it with `vmm run --restore FILE`.",
    )
    snap.add_argument("socket", metavar="SOCKET")
    snap.add_argument("file", metavar="FILE")

    bench = sub.add_parser(
        "bench",
        help="measure the whole system beside host baselines",
        description="Measure boot, exits, guest memory management and the inspector, each beside a baseline "
        "measured in the same run; medians of N runs with min and max, always with the KVM backend.",
    )
    try:
        from .bench.cli import add_arguments as _bench_args
    except ImportError:  # the bench package is optional at this layer
        _bench_args = None
    if _bench_args is not None:
        _bench_args(bench)

    svm = sub.add_parser(
        "svm",
        help="run a command inside KVM-SVM nested in QEMU TCG (the tests' second backend)",
        description="Boot Linux with kvm-amd in qemu-system-x86_64 -accel tcg -cpu max and run CMD there in the "
        "project directory; CMD's output streams out and its exit status is returned (70: VM unavailable).",
    )
    from .svm.cli import add_arguments as _svm_args

    _svm_args(svm)

    build = sub.add_parser("build", help="build the guest kernel (cached) and print its path")
    build.add_argument("--force", action="store_true", help="rebuild even if sources are unchanged")
    build.add_argument("--quiet", "-q", action="store_true")
    return parser


def _kernel(args, quiet: bool):
    """The kernel of --kernel, or the built guest with its cache (vmm.kernel_cache)."""
    if args.kernel is not None:
        from .elf import load_kernel_file

        startup.mark("t_built")
        image = load_kernel_file(args.kernel)
    else:
        from .guest_build import build_guest, built_kernel_sha256
        from .kernel_cache import load_cached_kernel

        path = build_guest(quiet=quiet)
        startup.mark("t_built")
        image = load_cached_kernel(path, built_kernel_sha256(path))
    startup.mark("t_kernel")
    return image


def _memory(args) -> int:
    from .layout import DEFAULT_RAM
    from .memory import check_ram_size

    size = DEFAULT_RAM if args.memory is None else args.memory
    check_ram_size(size)
    return size


def cmd_memmap(args) -> int:
    if args.snapshot:
        from .snapshot.commands import memmap_of_snapshot

        size, memmap = memmap_of_snapshot(args.snapshot)
    else:
        from mm.memmap import MemoryMap

        from .boot import memory_map_bytes

        size = _memory(args)
        image = _kernel(args, quiet=True)
        # From the kernel's cached boot plan when it has one: no mapper, no numpy.
        memmap = MemoryMap.parse(memory_map_bytes(image, size), ram_size=size)
    if args.json:
        print(json.dumps({"ram_size": size, "descriptors": memmap.to_json(), "usable_frames": memmap.usable_frames()}, indent=2))
    else:
        from mm.render import memmap_table

        _console().print(memmap_table(memmap))
    return 0


def cmd_build(args) -> int:
    from .guest_build import build_guest

    print(build_guest(force=args.force, quiet=args.quiet))
    return 0


def cmd_run(args) -> int:
    import threading

    from .backend import detect_backend
    from .vm import Vm, VmConfig

    from .gdbstub.cli import check_run_arguments as check_gdb_arguments, serving
    from .snapshot import commands as snapshot_cli

    startup.mark("t_imports")
    t_start = time.perf_counter_ns()
    snapshot_cli.check_run_arguments(args)
    check_gdb_arguments(args, UsageError)
    image = _kernel(args, quiet=args.quiet or args.json)
    restore = snapshot_cli.open_for_run(args, image) if args.restore else None
    size = restore.memory_size if restore is not None else _memory(args)
    saver = snapshot_cli.plan_for_run(args, say=None) if args.save else None
    backend = detect_backend()
    stream = sys.stderr.buffer if args.json else sys.stdout.buffer
    tail = None
    console = None
    if args.inspect and sys.stdout.isatty():
        from .inspector.live import ConsoleTail

        tail = ConsoleTail()
        console = tail.feed  # shown inside the live view
    elif not args.quiet:
        def console(data: bytes) -> None:
            stream.write(data)
            if b"\n" in data:
                stream.flush()

    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"vmm: {msg}", file=sys.stderr, flush=True))
    slide = 0 if args.no_kaslr else args.slide
    watched = bool(args.inspect or args.control)
    config = VmConfig(memory=size, cmdline=args.cmdline, slide=slide, timeout=args.timeout, dirty_log=watched)
    startup.mark("t_vm")
    on_report = saver.on_report if saver is not None else None
    if restore is not None:
        from .snapshot.machine import restore_vm

        with restore:
            vm = restore_vm(restore, image, config, backend=backend, console=console, on_report=on_report)
    else:
        vm = Vm(image, config, backend=backend, console=console, on_report=on_report)
    if saver is not None:
        saver.say = say
        saver.attach(vm)
    with vm:
        say(
            f"{backend.banner} | RAM {size >> 20} MiB | kernel {image.path} | "
            f"slide {vm.slide:#x} | setup {vm.timings_ms['setup_total']:.2f} ms"
            + (f" | resumed from {args.restore} (saved at {restore.meta['saved_at']})" if restore is not None else "")
        )
        server = None
        viewer = None
        stop_view = threading.Event()
        try:
            if args.control:
                from .inspector.control import ControlServer

                server = ControlServer(vm, args.control)
                say(f"control socket: {args.control} (attach with `vmm inspect {args.control}`)")
            if args.inspect:
                from .inspector.live import live_view
                from .inspector.target import LocalTarget

                target = LocalTarget(vm)

                def _view():
                    while not vm.running and not stop_view.is_set():  # wait for the vCPU to start
                        time.sleep(0.001)
                    live_view(target, console_tail=tail, is_running=lambda: vm.running, stop=stop_view, hz=args.hz)

                viewer = threading.Thread(target=_view, name="vmm-live-view", daemon=True)
                viewer.start()
            if saver is not None:
                saver.start()
            warn = lambda msg: print(f"vmm: warning: {msg}", file=sys.stderr, flush=True)  # noqa: E731
            with serving(vm, args, say, warn, image.path, UsageError):
                result = vm.run()
            if saver is not None:
                saver.finish(result)
        finally:
            stop_view.set()
            if viewer is not None:
                viewer.join(timeout=5)
            if server is not None:
                server.close()
        if args.screenshot:
            _screenshot(vm.memory.physmem, size, args.screenshot)
            say(f"framebuffer saved to {args.screenshot}")
    stream.flush()
    result.timings_ms["process_total"] = (time.perf_counter_ns() - t_start) / 1e6
    startup.mark("t_done")
    startup.write(timings_ms=result.timings_ms, exit_code=result.exit_code, symbols_loaded=image.symbols_loaded,
                  kernel=image.path, cache_hit=bool(getattr(image.cache, "loaded", False)))
    if args.json:
        out = result.to_json()
        out["kernel"] = image.path
        out["cpu_model"] = backend.cpu_model
        if saver is not None:
            out["snapshot"] = saver.info
        if restore is not None:
            out["restored_from"] = {"path": args.restore, "saved_at": restore.meta["saved_at"],
                                    "serial_offset": restore.meta.get("serial_offset", 0)}
        print(json.dumps(out))
    else:
        say(f"{result.message} (exit code {result.exit_code}, {result.timings_ms['run']:.1f} ms, {result.exits} exits)")
        for err in result.report_errors[:5]:
            say(f"bad report: {err}")
        fault = result.fault
        if fault is not None:
            say(
                f"guest fault ({fault.get('kind', '?')}): {fault.get('name') or ''} at {fault.get('rip_symbol') or fault.get('rip')}"
                f", address {fault.get('addr', '?')}, error {fault.get('error', '?')} ({fault.get('error_bits', '')})"
                + (f", task {fault['task_name'] if 'task_name' in fault else fault.get('task')}" if "task" in fault else "")
            )
        if result.registers is not None and not args.quiet:
            print(f"  RIP: {result.rip_symbol}", file=sys.stderr)
            print(_indent(Vm.format_registers(result.registers)), file=sys.stderr)
    return result.exit_code


def _screenshot(physmem, ram_size: int, path: str) -> None:
    from .inspector.physical import write_framebuffer_png
    from .layout import FB_HEIGHT, FB_STRIDE, FB_WIDTH, framebuffer_phys

    try:
        write_framebuffer_png(physmem, framebuffer_phys(ram_size), FB_WIDTH, FB_HEIGHT, FB_STRIDE, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def cmd_pt(args) -> int:
    flt = _filter_from(args)
    if args.diff and not args.snapshot:
        raise UsageError("--diff FILE compares two snapshots: give the earlier one with --snapshot")
    if args.snapshot:
        if args.socket:
            raise UsageError("give either SOCKET or --snapshot FILE, not both")
        from .snapshot.offline import SnapshotTarget

        with SnapshotTarget.open(args.snapshot) as target:
            if args.diff:
                with SnapshotTarget.open(args.diff) as later:
                    return _print_inspection(args, later, flt, earlier=target)
            return _print_inspection(args, target, flt)
    if args.socket:
        from .inspector.control import RemoteTarget

        with RemoteTarget(args.socket) as target:
            return _print_inspection(args, target, flt)
    from .abi import ReportKind
    from .devices import Stop
    from .inspector.target import LocalTarget
    from .vm import Vm, VmConfig

    size = _memory(args)
    image = _kernel(args, quiet=True)

    def at_ready(report):
        if report.kind == ReportKind.READY:
            return Stop(0, "ready", "stopped at the guest's READY point for inspection")
        return None

    with Vm(image, VmConfig(memory=size, cmdline=args.cmdline, timeout=60), on_report=at_ready) as vm:
        result = vm.run()
        if result.stop_reason != "ready":
            raise UsageError(f"the guest stopped before its READY point: {result.message}")
        return _print_inspection(args, LocalTarget(vm), flt)


def _print_inspection(args, target, flt, earlier=None) -> int:
    from .inspector.physical import write_png
    from .inspector.snapshot import take_snapshot
    from .inspector.views import inspect

    snap = take_snapshot(target)
    previous = take_snapshot(earlier) if earlier is not None else None
    if args.diff_after:
        time.sleep(args.diff_after)
        previous, snap = snap, take_snapshot(target)
    view = inspect(snap, target.physmem, flt=flt, previous=previous)
    if args.png:
        if view.physical is None:
            raise UsageError("the guest did not report its frame bitmap: no physical-memory picture")
        write_png(view.physical, args.png)
    if args.screenshot:
        _screenshot(target.physmem, snap.facts.ram_size, args.screenshot)
    if args.json:
        print(json.dumps(view.to_json()))
    else:
        _console().print(view.render(max_rows=len(view.runs) if args.all else 200))
    return 0


def cmd_snapshot(args) -> int:
    from .inspector.control import RemoteTarget

    with RemoteTarget(args.socket) as target:
        info = target.save(args.file)
    print(f"vmm: saved {args.file}: {info['segments']} segments, {info['stored_bytes'] >> 10} KiB of RAM, "
          f"vCPU parked {info['pause_ms']:.2f} ms", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench.cli import run as bench_run

    return bench_run(args)


def cmd_inspect(args) -> int:
    from .inspector.control import ControlError, RemoteTarget
    from .inspector.live import ConsoleTail, live_view

    import threading

    with RemoteTarget(args.socket) as target:
        tail = ConsoleTail()
        pos = [0]

        def poll():
            data, pos[0] = target.serial(pos[0])
            tail.feed(data)

        def running() -> bool:
            try:
                return bool(target.get_status().get("running"))
            except (ControlError, OSError):
                return False

        stop = threading.Event()
        if args.duration:
            threading.Timer(args.duration, stop.set).start()
        stats = live_view(target, console_tail=tail, poll_serial=poll, is_running=running, stop=stop,
                          hz=args.hz, flt=_filter_from(args))
        stop.set()
    print(f"vmm: {stats['refreshes']} refreshes, {stats['changes']} mapping changes seen", file=sys.stderr)
    return 0


def _console():
    """A rich console; wide enough for full addresses when output is not a terminal."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


#: The errors the VMM raises on purpose, by module, and the exit code each gives.
#: Looked up in sys.modules when one is raised: an exception of a class means
#: its module was imported, so mapping errors never imports anything (the
#: inspector's module alone would pull in numpy).
EXPECTED_ERRORS = (
    ("vmm.elf", "KernelImageError", ExitCode.USAGE),
    ("vmm.memory", "GuestMemoryError", ExitCode.USAGE),
    ("vmm.boot", "BootError", ExitCode.USAGE),
    ("vmm.inspector.control", "ControlError", ExitCode.USAGE),
    ("vmm.snapshot.format", "SnapshotError", ExitCode.USAGE),
    ("mm.errors", "MMError", ExitCode.USAGE),
    ("vmm.kvm", "KvmError", ExitCode.HOST_ERROR),
    ("vmm.guest_build", "GuestBuildError", ExitCode.HOST_ERROR),
)


def expected_error_code(exc: BaseException) -> int | None:
    """The exit code for an error the VMM raises on purpose, else None."""
    if isinstance(exc, UsageError):
        return ExitCode.USAGE
    for module, name, code in EXPECTED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return ExitCode.USAGE
    if args.command == "svm":  # its own errors and exit codes (vmm/svm/cli.py)
        from .svm.cli import run_from_args

        return run_from_args(args)
    handlers = {"run": cmd_run, "memmap": cmd_memmap, "build": cmd_build, "pt": cmd_pt, "inspect": cmd_inspect, "bench": cmd_bench, "snapshot": cmd_snapshot}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(ExitCode.HOST_ERROR)
    except Exception as exc:
        code = expected_error_code(exc)
        if code is None:
            raise
        print(f"vmm: error: {exc}", file=sys.stderr)
        return code


def entry_point() -> None:
    sys.exit(main())
