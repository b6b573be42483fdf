"""Command line: ``vmm run``, ``vmm memmap``, ``vmm build``.

Bad input gets one line naming the problem and a non-zero exit code, never a
traceback: every error type the VMM raises on purpose is caught here.
"""

from __future__ import annotations

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
  100-106  the guest stopped abnormally (100 triple fault, 101 emulation
           failure, 102 entry failure, 103 halted, 104 unknown port,
           105 unbacked MMIO)
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

    mm = sub.add_parser(
        "memmap",
        help="print the memory map the guest would be given",
        description="Print the UEFI-like memory map the guest receives for these options.",
    )
    _add_guest_options(mm)
    mm.add_argument("--json", action="store_true", help="print JSON instead of a table")

    build = sub.add_parser("build", help="build the guest kernel (cached) and print its path")
    build.add_argument("--force", action="store_true", help="rebuild even if sources are unchanged")
    build.add_argument("--quiet", "-q", action="store_true")
    return parser


def _kernel(args, quiet: bool):
    from .elf import load_kernel_file

    path = args.kernel
    if path is None:
        from .guest_build import build_guest

        path = build_guest(quiet=quiet)
    return load_kernel_file(path)


def _memory(args) -> int:
    from .layout import DEFAULT_RAM
    from .memory import check_ram_size

    size = DEFAULT_RAM if args.memory is None else args.memory
    check_ram_size(size)
    return size


def cmd_memmap(args) -> int:
    from .boot import build_memory_map

    size = _memory(args)
    image = _kernel(args, quiet=True)
    memmap = build_memory_map(size, image)
    if args.json:
        print(json.dumps({"ram_size": size, "descriptors": memmap.to_json(), "usable_frames": memmap.usable_frames()}, indent=2))
    else:
        from rich.console import Console

        from mm.render import memmap_table

        Console().print(memmap_table(memmap))
    return 0


def cmd_build(args) -> int:
    from .guest_build import build_guest

    print(build_guest(force=args.force, quiet=args.quiet))
    return 0


def cmd_run(args) -> int:
    from .backend import detect_backend
    from .vm import Vm, VmConfig

    t_start = time.perf_counter_ns()
    size = _memory(args)
    image = _kernel(args, quiet=args.quiet or args.json)
    backend = detect_backend()
    stream = sys.stderr.buffer if args.json else sys.stdout.buffer
    console = None
    if not args.quiet:
        def console(data: bytes) -> None:
            stream.write(data)
            if b"\n" in data:
                stream.flush()

    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"vmm: {msg}", file=sys.stderr, flush=True))
    slide = 0 if args.no_kaslr else args.slide
    config = VmConfig(memory=size, cmdline=args.cmdline, slide=slide, timeout=args.timeout)
    with Vm(image, config, backend=backend, console=console) as vm:
        say(
            f"{backend.banner} | RAM {size >> 20} MiB | kernel {image.path} | "
            f"slide {vm.slide:#x} | setup {vm.timings_ms['setup_total']:.2f} ms"
        )
        result = vm.run()
    stream.flush()
    result.timings_ms["process_total"] = (time.perf_counter_ns() - t_start) / 1e6
    if args.json:
        out = result.to_json()
        out["kernel"] = image.path
        out["cpu_model"] = backend.cpu_model
        print(json.dumps(out))
    else:
        say(f"{result.message} (exit code {result.exit_code}, {result.timings_ms['run']:.1f} ms, {result.exits} exits)")
        for err in result.report_errors[:5]:
            say(f"bad report: {err}")
        if result.registers is not None and not args.quiet:
            print(f"  RIP: {result.rip_symbol}", file=sys.stderr)
            print(_indent(Vm.format_registers(result.registers)), file=sys.stderr)
    return result.exit_code


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    from .boot import BootError
    from .elf import KernelImageError
    from .kvm import KvmError
    from .memory import GuestMemoryError

    try:
        from .guest_build import GuestBuildError
    except ImportError:  # pragma: no cover
        GuestBuildError = RuntimeError  # type: ignore[misc,assignment]
    try:
        from mm.errors import MMError
    except ImportError:  # pragma: no cover
        MMError = RuntimeError  # type: ignore[misc,assignment]

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return ExitCode.USAGE
    handlers = {"run": cmd_run, "memmap": cmd_memmap, "build": cmd_build}
    try:
        return handlers[args.command](args)
    except (KernelImageError, GuestMemoryError, BootError, UsageError) as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (KvmError, GuestBuildError) as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return ExitCode.HOST_ERROR
    except MMError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(ExitCode.HOST_ERROR)


def entry_point() -> None:
    sys.exit(main())
