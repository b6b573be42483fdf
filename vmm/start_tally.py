"""How a test session's VMs got to a booted guest: the pytest plugin's summary line.

Snapshots change one thing in a test run: how a test VM reaches the point
after READY where its work starts. Reset in place to a zygote, forked from
one, or booted cold; the zygotes' own boots are paid once each. The plugin
records each start here and prints one line at the end of the session, so a
suite's author sees what zygotes saved and which VMs still boot cold, and
why (``fresh=True``, a kernel of the test's own, VmConfig fields, a boot that
never reaches READY, ``--vmm-cold``): the ones to convert.

Times are the host's from asking for a VM to the guest being past READY:
a reset's ``Zygote.reset`` total, a fork's machine setup and vCPU load, a
cold boot's setup plus its run to the READY report.
"""

from __future__ import annotations

import statistics
from collections import Counter

#: The ways a test VM starts, in the order the summary names them.
RESET, FORK, COLD = "reset", "fork", "cold"


class StartTally:
    """Per kind, the milliseconds each start took; cold boots also counted by reason."""

    def __init__(self):
        self.ms: dict[str, list[float]] = {RESET: [], FORK: [], COLD: []}
        self.cold_reasons: Counter[str] = Counter()
        self.zygote_boots_ms: list[float] = []
        #: what each start would have cost booted cold: a cold boot its own
        #: time, a VM from a zygote the zygote's own boot to READY (the same
        #: kernel, memory and boot words); None where a caller did not say
        self.cold_equivalent_ms: list[float | None] = []

    def add(self, kind: str, ms: float, reason: str | None = None, cold_equivalent_ms: float | None = None) -> None:
        """A start of ``kind`` that took ``ms``; a cold one with why it was
        cold, one from a zygote with what it would have cost cold."""
        if kind not in self.ms:
            raise ValueError(f"unknown start kind {kind!r} (one of {', '.join(self.ms)})")
        self.ms[kind].append(ms)
        if kind == COLD:
            self.cold_reasons[reason or "unknown"] += 1
            cold_equivalent_ms = ms
        self.cold_equivalent_ms.append(cold_equivalent_ms)

    def add_zygote_boot(self, ms: float) -> None:
        self.zygote_boots_ms.append(ms)

    def to_json(self) -> dict:
        """Everything recorded, as JSON types (an xdist worker hands it to the controller)."""
        return {"ms": self.ms, "cold_reasons": dict(self.cold_reasons), "zygote_boots_ms": self.zygote_boots_ms,
                "cold_equivalent_ms": self.cold_equivalent_ms}

    def merge(self, data: dict) -> None:
        """Add another tally's ``to_json()`` (a worker's, at the end of its session)."""
        for kind, values in data["ms"].items():
            self.ms[kind].extend(values)
        self.cold_reasons.update(data["cold_reasons"])
        self.zygote_boots_ms.extend(data["zygote_boots_ms"])
        self.cold_equivalent_ms.extend(data["cold_equivalent_ms"])

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.ms.values())

    def summary(self) -> str | None:
        """One line for the end of the session, or None if no VM started."""
        if not self.total:
            return None
        from_zygote = len(self.ms[RESET]) + len(self.ms[FORK])
        parts = []
        if from_zygote:
            how = ", ".join(f"{_count(len(self.ms[k]), k)} {_median(self.ms[k])}" for k in (RESET, FORK) if self.ms[k])
            n = len(self.zygote_boots_ms)
            parts.append(f"{from_zygote} from {_count(n, 'zygote')} ({how})")
        cold = self.ms[COLD]
        if cold:
            why = ", ".join(f"{count} {reason}" for reason, count in self.cold_reasons.most_common())
            parts.append(f"{len(cold)} booted cold {_median(cold)} ({why})")
        spent = sum(sum(v) for v in self.ms.values()) + sum(self.zygote_boots_ms)
        line = f"vmm: {self.total} test VMs: " + "; ".join(parts) + f"; {spent / 1e3:.2f} s to booted guests"
        if self.zygote_boots_ms:
            line += f" (zygote boots {sum(self.zygote_boots_ms) / 1e3:.2f} s of it)"
        if from_zygote and None not in self.cold_equivalent_ms:
            all_cold = sum(self.cold_equivalent_ms)
            line += f"; about {all_cold / 1e3:.2f} s if all booted cold"
        return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _median(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} ms"
