"""`vmm run --gdb ...`: checking the options and starting the stub for a run
(the options themselves are in ``vmm.gdbstub.options``). The debugger (mm's
walker, numpy, the inspector's views) is imported only when --gdb is given:
every `vmm run` with a feature option checks these options."""

from __future__ import annotations

import contextlib

from .options import add_run_arguments
from .server import GdbAddressError, parse_address

__all__ = ["add_run_arguments", "check_run_arguments", "serving"]


def check_run_arguments(args, usage_error) -> None:
    """Validate before anything boots: bad --gdb text is a one-line usage error."""
    if args.gdb is None:
        if args.gdb_wait or args.gdb_allow_remote:
            raise usage_error("--gdb-wait and --gdb-allow-remote need --gdb")
        return
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
    from .debugger import Debugger  # heavy: only with --gdb (see the module's docstring)

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
