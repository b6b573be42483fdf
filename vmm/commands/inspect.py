"""``vmm inspect``: the live view of a VM started with ``vmm run --control``."""

from __future__ import annotations

import sys
import threading

from ..inspector.control import ControlError, RemoteTarget
from ..inspector.live import ConsoleTail, live_view
from .filters import run_filter


def main(args) -> int:
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
                          hz=args.hz, flt=run_filter(args))
        stop.set()
    print(f"vmm: {stats['refreshes']} refreshes, {stats['changes']} mapping changes seen", file=sys.stderr)
    return 0
