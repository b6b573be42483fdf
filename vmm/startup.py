"""Timestamps along the way from process start to READY, for ``vmm bench``.

With ``VMM_STARTUP_TRACE=FILE`` in the environment, ``vmm run`` writes one
JSON object to FILE when it ends: CLOCK_MONOTONIC timestamps in ns
(``time.monotonic_ns()`` and ``perf_counter_ns()`` read the same clock on
Linux, so the parent that spawned the process can subtract its own spawn
time). Without the variable, marking costs a dict store and nothing is
written. Imported first by the CLI, so ``t_first`` is the first moment our
code runs: everything before it is the interpreter starting.
"""

from __future__ import annotations

import json
import os
import time

ENV = "VMM_STARTUP_TRACE"
T_FIRST = time.monotonic_ns()
_marks: dict[str, int] = {"t_first": T_FIRST}


def mark(name: str, ns: int | None = None) -> None:
    _marks[name] = time.monotonic_ns() if ns is None else ns


def write(**extra) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({**_marks, **extra}, f)
    except OSError:
        pass
