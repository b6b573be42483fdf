"""The run's watchdog: fires after a budget of *running* time.

``hold()``/``release()`` stop and restart its clock, so a guest that a
debugger holds stopped is not killed for the time a user spends at a gdb
prompt; ``--timeout`` keeps meaning "this long in the guest".
"""

from __future__ import annotations

import threading
import time


class Watchdog:
    def __init__(self, seconds: float, fire):
        self.remaining = seconds
        self._fire = fire
        self._timer: threading.Timer | None = None
        self._since: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._arm()

    def _arm(self) -> None:
        self._since = time.monotonic()
        self._timer = threading.Timer(max(self.remaining, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def hold(self) -> None:
        with self._lock:
            if self._timer is None:
                return
            self._timer.cancel()
            self._timer = None
            self.remaining -= time.monotonic() - self._since

    def release(self) -> None:
        with self._lock:
            if self._timer is None and self._since is not None:
                self._arm()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._since = None
