"""A visit: work done on the vCPU thread itself, with the guest out of KVM_RUN.

``Vm.paused()`` parks the vCPU and lets another thread work while it waits:
the guest is then held across two thread wake-ups (the parked vCPU waking
the worker, the worker waking the vCPU), each a scheduler latency that a
loaded 2-core host stretches to milliseconds. A visit instead hands the
vCPU thread a function: kicked out of KVM_RUN, it calls the function at its
park point and goes straight back into the guest. Nobody else's wake-up
sits inside the pause, which lasts exactly the exit path and the function.

A visit may ask to run on first: ``run_on(addr)`` says whether the guest
should be let run to the instruction at ``addr`` (an instruction
breakpoint, the way ``Vm.run_to`` does) before ``fn`` is called, as a
snapshot does for a guest parked inside a critical section. The guest
runs on at most once per visit; if it does not get there in time, the
requester kicks it again and ``fn`` runs wherever it stopped.

This module holds the request (data); ``Vm.visit`` and the run loop's park
point are the protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Stages of a visit.
PENDING = "pending"  # asked for, the vCPU not out of the guest yet
SERVING = "serving"  # the vCPU thread has taken it
RUNNING_ON = "running on"  # the guest runs to ``run_on``'s address
DONE = "done"
DROPPED = "dropped"  # the guest stopped first: ``fn`` never ran


@dataclass(eq=False)
class Visit:
    """One request, filled in by the vCPU thread."""

    fn: Callable[[], Any]
    #: Asked at the first stop: the address to run on to first, or None.
    run_on: Callable[[], int | None] | None = None
    realtime: bool = False  # served at SCHED_FIFO where the process may (a short fn only)
    stage: str = PENDING
    value: Any = None
    error: BaseException | None = None
    #: The guest held out of KVM_RUN for this visit (all its stops), from the
    #: run loop's park point to the end of ``fn`` and, for a real-time visit,
    #: the vCPU thread's return to SCHED_OTHER (the guest waits for that too).
    held_ns: int = 0
    #: The vCPU thread's CPU time in the visit (``time.thread_time_ns``): the
    #: hold without the time a loaded host's scheduler gave others meanwhile.
    cpu_ns: int = 0
    #: Stops: 1, or 2 when the guest ran on in between.
    stops: int = 0
    ran_on: bool = False  # it ran on and got there (not kicked out on the way)
    ran_ns: int = 0  # how long it ran on (not held)
    exit_ns: int = 0  # perf_counter_ns() at the park point of the last stop
    #: Set at the first stop (done, or running on); ``done`` at the end.
    progress: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def visited(self) -> bool:
        return self.stage == DONE
