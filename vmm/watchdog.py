"""The run's watchdog: fires after a budget of *running* time.

``hold()``/``release()`` stop and restart its clock, so a guest that a
debugger holds stopped is not killed for the time a user spends at a gdb
prompt; ``--timeout`` keeps meaning "this long in the guest".
"""

from __future__ import annotations

import heapq
import threading
import time


class _Timers:
    """One daemon thread serves every watchdog of the process: arming one is
    a heap push, not a thread start (threading.Timer costs about 1 ms per
    run with its start-up handshake, the largest host cost of a test VM
    started from a zygote snapshot)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list = []  # (deadline, seq, entry); entry = [fire, done]
        self._seq = 0
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, fire) -> list:
        entry = [fire, False]
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + delay, self._seq, entry))
            if self._thread is None or not self._thread.is_alive():  # first use, or after fork()
                self._thread = threading.Thread(target=self._loop, name="vmm-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[1] = True  # like Timer.cancel: no effect once it has fired

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2][1]:
                        heapq.heappop(self._heap)  # cancelled
                    if not self._heap:
                        self._cv.wait()
                        continue
                    deadline = self._heap[0][0]
                    now = time.monotonic()
                    if deadline <= now:
                        entry = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(deadline - now)
            if not entry[1]:
                entry[1] = True
                entry[0]()  # outside the lock: it may take its time


_TIMERS = _Timers()


class Watchdog:
    def __init__(self, seconds: float, fire):
        self.remaining = seconds
        self._fire = fire
        self._timer: list | None = None  # an entry of _TIMERS
        self._since: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._arm()

    def _arm(self) -> None:
        self._since = time.monotonic()
        self._timer = _TIMERS.schedule(max(self.remaining, 0.0), self._fire)

    def hold(self) -> None:
        with self._lock:
            if self._timer is None:
                return
            _TIMERS.cancel(self._timer)
            self._timer = None
            self.remaining -= time.monotonic() - self._since

    def release(self) -> None:
        with self._lock:
            if self._timer is None and self._since is not None:
                self._arm()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                _TIMERS.cancel(self._timer)
            self._timer = None
            self._since = None
