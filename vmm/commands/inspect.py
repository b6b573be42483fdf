"""``vmm inspect``: the live view of a VM started with ``vmm run --control``:
full screen with keys on a terminal, one status line a second otherwise."""

from __future__ import annotations

import sys
import threading

from ..inspector.control import ControlError, RemoteTarget
from ..inspector.live import live_view
from ..inspector.tui import ConsoleHistory, run_tui
from .filters import run_filter


def main(args) -> int:
    with RemoteTarget(args.socket) as target:
        pos = [0]

        def running() -> bool:
            try:
                return bool(target.get_status().get("running"))
            except (ControlError, OSError):
                return False

        stop = threading.Event()
        if args.duration:
            threading.Timer(args.duration, stop.set).start()
        if sys.stdout.isatty() and sys.stdin.isatty():
            history = ConsoleHistory()

            def poll():
                data, pos[0] = target.serial(pos[0])
                history.feed(data)

            stats = run_tui(target, history=history, poll_serial=poll, is_running=running, stop=stop, hz=args.hz,
                            flt=run_filter(args))
        else:
            stats = live_view(target, is_running=running, stop=stop, hz=args.hz, flt=run_filter(args))
        stop.set()
    print(f"vmm: {stats['refreshes']} refreshes, {stats['changes']} mapping changes seen", file=sys.stderr)
    return 0
