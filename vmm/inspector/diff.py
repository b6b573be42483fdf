"""What changed in the page tables between two snapshots.

Both snapshots' coalesced runs are cut at every boundary either of them has;
each piece is classified, and adjacent pieces of the same kind are merged:

- ``mapped``: unmapped before, mapped now;
- ``unmapped``: mapped before, not now;
- ``moved``: mapped both times, to another physical frame;
- ``flags``: same frame, different effective flags or page size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mm.flags import PteFlags
from mm.walker import RunArrays

KINDS = ("mapped", "unmapped", "moved", "flags")


@dataclass(frozen=True)
class Change:
    kind: str
    virt: int
    size: int
    old_phys: int | None
    new_phys: int | None
    old_flags: int | None
    new_flags: int | None

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "virt": self.virt,
            "size": self.size,
            "old_phys": self.old_phys,
            "new_phys": self.new_phys,
            "old_flags": _flag_names(self.old_flags),
            "new_flags": _flag_names(self.new_flags),
        }


def _flag_names(flags: int | None) -> list[str] | None:
    if flags is None:
        return None
    return [f.name for f in PteFlags if f.name and flags & f.value and f.value & (f.value - 1) == 0]


def _locate(runs: RunArrays, points: np.ndarray) -> np.ndarray:
    """Index of the run containing each point, or -1."""
    if len(runs) == 0:
        return np.full(points.shape, -1, dtype=np.int64)
    virt = runs.virt.astype(np.uint64)
    idx = np.searchsorted(virt, points, side="right").astype(np.int64) - 1
    ok = idx >= 0
    safe = np.where(ok, idx, 0)
    inside = ok & (points < virt[safe] + runs.size.astype(np.uint64)[safe])
    return np.where(inside, idx, -1)


def diff_runs(old: RunArrays, new: RunArrays) -> list[Change]:
    bounds = np.unique(
        np.concatenate(
            [
                old.virt.astype(np.uint64),
                (old.virt + old.size).astype(np.uint64),
                new.virt.astype(np.uint64),
                (new.virt + new.size).astype(np.uint64),
            ]
        )
    )
    if bounds.size < 2:
        return []
    starts, ends = bounds[:-1], bounds[1:]
    oi, ni = _locate(old, starts), _locate(new, starts)
    o_ok, n_ok = oi >= 0, ni >= 0
    o_safe, n_safe = np.where(o_ok, oi, 0), np.where(n_ok, ni, 0)

    def phys_at(runs: RunArrays, safe: np.ndarray) -> np.ndarray:
        if len(runs) == 0:
            return np.zeros(starts.shape, dtype=np.uint64)
        return runs.phys.astype(np.uint64)[safe] + (starts - runs.virt.astype(np.uint64)[safe])

    def col(runs: RunArrays, name: str, safe: np.ndarray) -> np.ndarray:
        if len(runs) == 0:
            return np.zeros(starts.shape, dtype=np.uint64)
        return getattr(runs, name).astype(np.uint64)[safe]

    o_phys, n_phys = phys_at(old, o_safe), phys_at(new, n_safe)
    o_flags, n_flags = col(old, "flags", o_safe), col(new, "flags", n_safe)
    o_ps, n_ps = col(old, "page_size", o_safe), col(new, "page_size", n_safe)

    kind = np.full(starts.shape, -1, dtype=np.int8)
    kind[n_ok & ~o_ok] = 0
    kind[o_ok & ~n_ok] = 1
    both = o_ok & n_ok
    kind[both & (o_phys != n_phys)] = 2
    kind[both & (o_phys == n_phys) & ((o_flags != n_flags) | (o_ps != n_ps))] = 3

    changes: list[Change] = []
    sel = np.nonzero(kind >= 0)[0]
    for i in sel.tolist():
        k = KINDS[kind[i]]
        start, end = int(starts[i]), int(ends[i])
        op = int(o_phys[i]) if o_ok[i] else None
        np_ = int(n_phys[i]) if n_ok[i] else None
        of = int(o_flags[i]) if o_ok[i] else None
        nf = int(n_flags[i]) if n_ok[i] else None
        if changes:
            last = changes[-1]
            contiguous = last.virt + last.size == start and last.kind == k
            same_flags = last.old_flags == of and last.new_flags == nf
            phys_follow = (last.old_phys is None or op == last.old_phys + last.size) and (
                last.new_phys is None or np_ == last.new_phys + last.size
            )
            if contiguous and same_flags and phys_follow:
                changes[-1] = Change(k, last.virt, last.size + end - start, last.old_phys, last.new_phys, of, nf)
                continue
        changes.append(Change(k, start, end - start, op, np_, of, nf))
    return changes


def summarize(changes: list[Change]) -> dict[str, dict[str, int]]:
    out = {k: {"ranges": 0, "bytes": 0} for k in KINDS}
    for c in changes:
        out[c.kind]["ranges"] += 1
        out[c.kind]["bytes"] += c.size
    return out
