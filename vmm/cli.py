"""Command line: the parser and a lazy table of per-command modules.

``vmm run``, ``memmap``, ``pt``, ``inspect``, ``bench``, ``build``: each
command is a module with a ``main(args) -> int`` that imports what it needs
at its top. The table below is the one place imports are deferred, so the
plain ``vmm run`` path never loads what only ``pt`` or ``bench`` need
(numpy-heavy views, rich tables).

Bad input gets one line naming the problem and exit code 2, never a
traceback: every error the VMM raises on purpose derives from
``vmm.errors.UsageError`` or ``HostError`` (``mm``'s own errors are bad
input too) and is mapped to its exit code here. Nothing imports this module.
"""

from __future__ import annotations

from . import startup  # first: its clock reading is where the interpreter's start ends

import argparse
import importlib
import os
import sys

from .abi import ExitCode
from .errors import HostError, UsageError
from .commands.options import add_filters, add_guest_options
from .commands.query_options import COMMANDS as QUERY_COMMANDS
from .commands.query_options import add_parsers as add_query_parsers
from .units import parse_slide, parse_timeout

EPILOG = """\
exit codes:
  0-5      the guest's own status (0 success, 1 test failure, 3 panic,
           4 stack overflow, 5 unexpected fault)
  2        bad input or options
  70       host problem (no /dev/kvm, no Rust toolchain, ...)
  100-107  the guest stopped abnormally (100 triple fault, 101 emulation
           failure, 102 entry failure, 103 halted, 104 unknown port,
           105 unbacked MMIO, 106 malformed report from the guest,
           107 write to read-only kernel memory)
  124      the watchdog (--timeout) stopped the guest
  130      interrupted (Ctrl-C); 143 terminated (SIGTERM); the control
           socket is removed either way
  137      killed from gdb (`kill` in a --gdb session)
  141      stdout was closed (e.g. `vmm run | head`): the run ends quietly
"""

CONTROL_HELP = """\
attaching to a running guest:
  The default guest boots, reports READY and exits within a second. To keep
  it running for `vmm inspect`, `vmm pt SOCKET` or `vmm regs SOCKET`, give it
  work: -c workload=mm (allocates, maps and switches tasks until stopped;
  workload_ms=N stops after N ms) or -c scenario=loop (spins). Stop it with
  Ctrl-C or SIGTERM; the socket file is removed.
    vmm run --control /tmp/vm.sock -c workload=mm &
    vmm inspect /tmp/vm.sock
"""


def _version() -> str:
    import importlib.metadata  # ~13 ms: only for --version

    try:
        return importlib.metadata.version("pyvmm")
    except importlib.metadata.PackageNotFoundError:  # a checkout that was not pip-installed
        return "0.1.0"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"vmm (pyvmm) {_version()}")  # on stdout, as argparse's own version action does
        parser.exit()


#: command -> "module" (its ``main(args) -> int``) or "module:function",
#: imported only when that command runs.
COMMANDS = {
    "run": "vmm.commands.run",
    "memmap": "vmm.commands.memmap",
    "pt": "vmm.commands.pt",
    "inspect": "vmm.commands.inspect",
    "bench": "vmm.bench.cli",
    "build": "vmm.commands.build",
    "snapshot": "vmm.commands.snapshot",
    **{name: "vmm.commands.query" for name in QUERY_COMMANDS},
    "svm": "vmm.svm.cli:run_from_args",  # its own errors and exit codes
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, every command is listed but
    only that one gets its arguments (their option modules are not all cheap
    to import, and a plain ``vmm run`` should not pay for ``bench``'s)."""

    def wants(name: str) -> bool:
        return command is None or command == name

    parser = _Parser(
        prog="vmm",
        description="A Python VMM on Linux KVM that boots a Rust guest kernel straight into 64-bit long mode.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="boot a guest and stream its serial console",
        description="Boot a guest kernel and stream its serial console. The exit code is the guest's.",
        epilog=EPILOG + "\n" + CONTROL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if wants("run"):
        _add_run_arguments(run)

    mm = sub.add_parser(
        "memmap",
        help="print the memory map the guest would be given",
        description="Print the UEFI-like memory map the guest receives for these options.",
    )
    add_guest_options(mm)
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
    add_guest_options(pt)
    pt.add_argument("--cmdline", "-c", default="", metavar="TEXT", help="guest command line (when booting)")
    pt.add_argument("--json", action="store_true", help="print the inspection as JSON (schema in docs/INSPECT.md)")
    pt.add_argument("--all", action="store_true", help="print every run (default: the first 200)")
    pt.add_argument("--png", metavar="FILE.png", help="save a picture of physical memory by owner")
    pt.add_argument("--screenshot", metavar="FILE.png", help="save the guest's framebuffer")
    pt.add_argument("--diff-after", type=parse_timeout, metavar="S", help="take a second snapshot S seconds later and show the diff")
    add_filters(pt)

    insp = sub.add_parser(
        "inspect",
        help="attach a live view to a VM started with --control",
        description="Attach to a VM started with `vmm run --control SOCKET` and show the live view "
        "(the same as `vmm run --inspect`, from another terminal). The VM keeps running when the view ends.",
        epilog=CONTROL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    insp.add_argument("socket", metavar="SOCKET", help="the control socket given to `vmm run --control`")
    insp.add_argument("--hz", type=float, default=10.0, help="refresh rate (default 10)")
    insp.add_argument("--duration", type=parse_timeout, metavar="S", help="stop after S seconds")
    add_filters(insp)

    bench = sub.add_parser(
        "bench",
        help="measure the whole system beside host baselines",
        description="Measure boot, exits, guest memory management and the inspector, each beside a baseline "
        "measured in the same run; medians of N runs with min and max, always with the KVM backend.",
    )
    if wants("bench"):
        from .bench.options import add_arguments as add_bench_arguments

        add_bench_arguments(bench)

    svm = sub.add_parser(
        "svm",
        help="run a command inside KVM-SVM nested in QEMU TCG (the tests' second backend)",
        description="Boot Linux with kvm-amd in qemu-system-x86_64 -accel tcg -cpu max and run CMD there in the "
        "project directory; CMD's output streams out and its exit status is returned (70: VM unavailable).",
    )
    if wants("svm"):
        from .svm.options import add_arguments as add_svm_arguments

        add_svm_arguments(svm)

    snap = sub.add_parser(
        "snapshot",
        help="save a running guest (vmm run --control SOCKET) to an ELF core file",
        description="Save a guest started with `vmm run --control SOCKET` to FILE; the vCPU is parked only "
        "while its state and touched RAM are copied. Resume it with `vmm run --restore FILE`.",
    )
    snap.add_argument("socket", metavar="SOCKET")
    snap.add_argument("file", metavar="FILE")

    add_query_parsers(sub)

    build = sub.add_parser(
        "build",
        help="build the guest kernel (cached) and print its path",
        description="Build the Rust guest kernel in guest/ and print the ELF's path. The build is cached by a "
        "hash of the guest's sources and the toolchain: unchanged sources print the path at once. Uses Debian's "
        "Rust (cargo-web rustc-web rust-web-src, offline) or rustup with the x86_64-unknown-none target; the "
        "first build takes about 40 s (core and alloc are compiled too) and shows cargo's progress.",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if sources are unchanged")
    build.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr, only the path")
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    from .gdbstub.options import add_run_arguments as add_gdb_arguments
    from .snapshot.options import add_run_arguments as add_snapshot_arguments

    add_guest_options(run)
    run.add_argument("--timeout", "-t", type=parse_timeout, metavar="SECONDS", help="watchdog: stop the guest after this long")
    run.add_argument("--quiet", "-q", action="store_true", help="do not print the serial console or the banner (the stop message is always printed)")
    run.add_argument("--json", action="store_true", help="print one JSON object with the result on stdout")
    run.add_argument("--cmdline", "-c", default="", metavar="TEXT", help="guest command line, e.g. 'tests=all'")
    run.add_argument("--slide", type=parse_slide, metavar="BYTES", help="KASLR slide (2 MiB multiple; default random)")
    run.add_argument("--no-kaslr", action="store_true", help="load the kernel at its link address (slide 0)")
    run.add_argument("--inspect", action="store_true", help="full-screen live view of the guest's memory management, its console at the bottom (keys: ? for help, q to close)")
    run.add_argument("--hz", type=float, default=10.0, help="refresh rate of --inspect (default 10)")
    run.add_argument("--control", metavar="SOCKET", help="serve this VM on a UNIX socket for `vmm inspect` / `vmm pt` "
                     "(keep the guest running with -c workload=mm; see below)")
    run.add_argument("--screenshot", metavar="FILE.png", help="save the guest's framebuffer as PNG when it stops")
    add_snapshot_arguments(run)
    add_gdb_arguments(run)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an error the VMM raises on purpose, else None (a bug: traceback)."""
    if isinstance(exc, UsageError):
        return ExitCode.USAGE
    if isinstance(exc, HostError):
        return ExitCode.HOST_ERROR
    # mm's errors are bad input (a size, an address); if mm was never
    # imported, none of its errors can have been raised.
    mm_errors = sys.modules.get("mm.errors")
    if mm_errors is not None and isinstance(exc, mm_errors.MMError):
        return ExitCode.USAGE
    return None


def discard_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null so that the interpreter's
    final flush does not complain about the broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass


def command_module(args) -> str:
    """The module that runs this command line: a run with the inspector,
    snapshots or the gdb stub attached loads them; a plain run loads none of
    them (nor numpy, mm, rich)."""
    extras = (args.inspect, args.control, args.screenshot, args.save, args.save_at, args.restore,
              args.gdb, args.gdb_wait, args.gdb_allow_remote) if args.command == "run" else ()
    if any(extras):
        return "vmm.commands.run_full"
    return COMMANDS[args.command]


def _command_in(argv: list[str]) -> str | None:
    """The command a command line names (its first word that is one), if any."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return ExitCode.USAGE
    try:
        module, _, function = command_module(args).partition(":")
        return getattr(importlib.import_module(module), function or "main")(args)
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away: nothing more to say
        discard_stdout()
        return ExitCode.BROKEN_PIPE
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"vmm: error: {exc}", file=sys.stderr)
        return code


def entry_point() -> None:
    sys.exit(main())
