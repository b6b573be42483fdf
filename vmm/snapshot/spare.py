"""A machine prepared ahead of a zygote's next fork.

Most of a fork's time is KVM's, not ours: KVM_CREATE_VM, KVM_CREATE_VCPU and
its CPUID, and one memory slot per RAM range (each slot change waits for an
SRCU grace period: ~70 us idle, milliseconds when the kworker that ends it
waits for a busy CPU). None of it depends on the guest's state, so a zygote
has the next fork's machine built on a worker thread (the ioctls release the
GIL, so the build runs beside the current guest): the fork then only loads
the vCPU state into it. One spare at a time, made for one configuration; a
fork with another configuration builds its own, and the spare is rebuilt
for whatever was asked last.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable


class SpareMachines:
    """Builds one machine ahead, on request, with ``build(spec)``; hands it
    out with ``take(key)`` to whoever asks with the same key (``spec`` is
    what to build, ``key`` the part of it a machine depends on). Thread-safe;
    ``close()`` waits for a build in flight and closes what is left."""

    def __init__(self, build: Callable[[object], object], name: str = "spare-machine"):
        self._build = build
        self._name = name
        self._cond = threading.Condition()
        self._spare: tuple[Hashable, object] | None = None
        self._pending: tuple[Hashable, object] | None = None  # (key, spec) to build next
        self._building: Hashable | None = None  # the key of the build in flight
        self._closed = False
        self._thread: threading.Thread | None = None
        #: How many forks got a spare, and how many builds failed (the fork then builds its own).
        self.taken = 0
        self.failed = 0

    def take(self, key: Hashable):
        """The spare for ``key`` (waiting for one being built: that is the
        quickest way to a machine now), or None. A spare made for another
        key is closed."""
        with self._cond:
            while self._building is not None or self._pending is not None:
                self._cond.wait()
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare[0] != key:
            spare[1].close()
            return None
        self.taken += 1
        return spare[1]

    def request(self, key: Hashable, spec: object = None) -> None:
        """Have a spare for ``key`` built in the background from ``spec``
        (``key`` itself if None): nothing to do if one is there or on its
        way; asked for during a build for another key, that one is dropped
        when done and ``key``'s built next."""
        with self._cond:
            if self._closed:
                return
            if self._building is not None or self._pending is not None:
                if self._building != key:
                    self._pending = (key, key if spec is None else spec)
                return
            if self._spare is not None:
                if self._spare[0] == key:
                    return
                self._spare[1].close()
                self._spare = None
            self._pending = (key, key if spec is None else spec)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                (key, spec), self._pending, self._building = self._pending, None, self._pending[0]
            try:
                machine = self._build(spec)
            except Exception:  # the fork builds its own and reports whatever fails there
                machine = None
                self.failed += 1
            with self._cond:
                self._building = None
                if machine is not None and (self._closed or self._pending is not None):
                    machine.close()  # closing, or another key was asked for meanwhile
                elif machine is not None:
                    self._spare = (key, machine)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare[1].close()
