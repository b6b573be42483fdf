"""`vmm run --gdb ...`: the options and starting the stub for a run."""

from __future__ import annotations

import contextlib


def add_run_arguments(p) -> None:
    g = p.add_argument_group("debugging with gdb")
    g.add_argument("--gdb", metavar="PORT|HOST:PORT|unix:PATH",
                   help="serve the guest to gdb (remote serial protocol); TCP listens on 127.0.0.1 unless "
                        "--gdb-allow-remote; a UNIX socket is created mode 0600")
    g.add_argument("--gdb-wait", action="store_true",
                   help="stop before the first guest instruction until gdb continues (like qemu -s -S)")
    g.add_argument("--gdb-allow-remote", action="store_true",
                   help="allow --gdb on a non-loopback address (the stub has no authentication)")


def check_run_arguments(args, usage_error) -> None:
    """Validate before anything boots: bad --gdb text is a one-line usage error."""
    if args.gdb is None:
        if args.gdb_wait or args.gdb_allow_remote:
            raise usage_error("--gdb-wait and --gdb-allow-remote need --gdb")
        return
    from .server import GdbAddressError, parse_address

    try:
        addr = parse_address(args.gdb, allow_remote=args.gdb_allow_remote)
    except GdbAddressError as exc:
        raise usage_error(str(exc)) from None
    args.gdb_address = addr


@contextlib.contextmanager
def serving(vm, args, say, warn, kernel_path: str, usage_error):
    """The debugger for ``vm`` while the block runs (nothing without --gdb)."""
    if getattr(args, "gdb", None) is None:
        yield None
        return
    from .debugger import Debugger
    from .server import GdbAddressError

    addr = args.gdb_address
    if not addr.is_loopback:
        warn(f"gdb stub listening on {addr} without authentication: anyone who can connect controls the guest")
    try:
        dbg = Debugger(vm, addr, wait=args.gdb_wait, say=say)
    except GdbAddressError as exc:
        raise usage_error(str(exc)) from None
    with dbg:
        say(f"gdb: listening on {dbg.address}; attach with: {dbg.connect_hint(kernel_path)}")
        yield dbg
