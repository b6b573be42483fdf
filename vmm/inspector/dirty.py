"""Dirty pages per interval, from KVM's dirty log (KVM_GET_DIRTY_LOG).

Each call to ``DirtyTracker.sample()`` fetches (and clears) the log: the pages
the guest wrote since the previous call, as a rate and per memory-map region.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

PAGE = 4096


def dirty_pages(vm) -> np.ndarray:
    """Pages the guest wrote since the last call, as a bool array over all of
    RAM (from ``Vm.dirty_log``, which clears KVM's log)."""
    out = np.zeros(vm.memory.size // PAGE, dtype=bool)
    for first, pages, bitmap in vm.dirty_log():
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[:pages]
        out[first : first + pages] = bits.astype(bool)
    return out


@dataclass
class DirtySample:
    interval_s: float
    pages: int
    per_region: list[dict]

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.interval_s if self.interval_s > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "interval_s": round(self.interval_s, 6),
            "pages": self.pages,
            "pages_per_s": round(self.pages_per_s, 1),
            "per_region": self.per_region,
        }


class DirtyTracker:
    def __init__(self, fetch, memmap: list[dict]):
        """``fetch()`` returns a bool array (one per page of RAM) and clears the log."""
        self.fetch = fetch
        self.memmap = memmap
        fetch()  # start a fresh interval
        self.last = time.perf_counter()

    def sample(self) -> DirtySample:
        dirty: np.ndarray = self.fetch()
        now = time.perf_counter()
        interval, self.last = now - self.last, now
        regions = []
        for d in self.memmap:
            a, b = d["phys_start"] // PAGE, d["end"] // PAGE
            n = int(np.count_nonzero(dirty[a:b]))
            if n:
                regions.append({"type": d.get("type"), "phys_start": d["phys_start"], "pages": n})
        return DirtySample(interval, int(np.count_nonzero(dirty)), regions)
