"""The data every measurement returns: figures, rows, sections.

Measurements produce data only; ``report.py`` renders it. A *figure* is a
plain dict so it goes to JSON unchanged:

    {"median": 1.2, "min": 1.1, "max": 1.5, "n": 20, "unit": "ms"}

optionally with ``p50``/``p99`` (distributions measured inside one run, e.g.
the guest's own percentiles) and ``runs`` (how many runs the median is over,
when ``n`` counts iterations instead).

A *row* is one line of the report: a figure with its label, optionally the
baseline it is compared with (measured in the same run) and their ratio. A
*section* is one area (boot, exits, guest, inspector, scale) with its rows, a
status (``ok``, ``empty``, ``skipped``, ``error``) and a message.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: Units a figure may carry, smallest time unit first; rendering converts
#: between them. Anything else (``/s``, ``MiB``, ``cycles``) is shown as is.
TIME_UNITS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}

STATUSES = ("ok", "empty", "skipped", "error")


def summarize(values: Iterable[float], unit: str) -> dict:
    """Median, min and max of ``values`` (at least one) as a figure."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize() needs at least one value")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "unit": unit}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest rank."""
    if not sorted_values:
        raise ValueError("percentile() of nothing")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def distribution(values: Iterable[float], unit: str) -> dict:
    """A figure from per-iteration samples: median (= p50), p99, min, max."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("distribution() needs at least one value")
    p50 = percentile(vals, 50)
    return {"median": p50, "min": vals[0], "max": vals[-1], "n": len(vals), "unit": unit,
            "p50": p50, "p99": percentile(vals, 99)}


def merge_distributions(figs: Sequence[dict]) -> dict:
    """Several runs of one in-run distribution (each with p50/p99) as one figure.

    The median is the median of the runs' p50s, p99 the median of their p99s,
    min and max the extremes over all runs, ``n`` the total iterations and
    ``runs`` the number of runs.
    """
    if not figs:
        raise ValueError("merge_distributions() needs at least one figure")
    units = {f["unit"] for f in figs}
    if len(units) != 1:
        raise ValueError(f"cannot merge figures in different units: {sorted(units)}")
    p50s = [f.get("p50", f["median"]) for f in figs]
    p99s = [f["p99"] for f in figs if f.get("p99") is not None]
    out = {
        "median": statistics.median(p50s),
        "min": min(f["min"] for f in figs),
        "max": max(f["max"] for f in figs),
        "n": sum(int(f["n"]) for f in figs),
        "unit": units.pop(),
        "p50": statistics.median(p50s),
        "runs": len(figs),
    }
    if p99s:
        out["p99"] = statistics.median(p99s)
    return out


def scale(fig: dict, factor: float, unit: str) -> dict:
    """The same figure with every value multiplied by ``factor``, in ``unit``."""
    out = dict(fig)
    for key in ("median", "min", "max", "p50", "p99"):
        if out.get(key) is not None:
            out[key] = out[key] * factor
    out["unit"] = unit
    return out


def rate(per_op: dict, ops_unit: str = "/s") -> dict:
    """Per-operation time (a time figure) as operations per second; min/max swap."""
    to_s = TIME_UNITS[per_op["unit"]] / 1e9
    inv = lambda v: 1.0 / (v * to_s) if v else math.inf  # noqa: E731
    return {"median": inv(per_op["median"]), "min": inv(per_op["max"]), "max": inv(per_op["min"]),
            "n": per_op["n"], "unit": ops_unit}


def in_unit(value: float, unit: str, target: str) -> float:
    """Convert a time value between ``TIME_UNITS``."""
    return value * TIME_UNITS[unit] / TIME_UNITS[target]


def ratio(fig: dict | None, base: dict | None) -> float | None:
    """fig / base on their medians (time units converted); None if not comparable."""
    if not fig or not base:
        return None
    a, b = fig.get("median"), base.get("median")
    if a is None or b is None or b <= 0:
        return None
    ua, ub = fig["unit"], base["unit"]
    if ua == ub:
        return a / b
    if ua in TIME_UNITS and ub in TIME_UNITS:
        return in_unit(a, ua, "ns") / in_unit(b, ub, "ns")
    return None


@dataclass
class Row:
    """One line of the report."""

    key: str
    label: str
    figure: dict | None
    baseline: dict | None = None
    baseline_label: str = ""
    note: str = ""
    indent: int = 0
    cpl: int | None = None  # guest privilege level, when the figure is the guest's
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return ratio(self.figure, self.baseline)

    def to_json(self) -> dict:
        out = {"key": self.key, "label": self.label, "figure": self.figure}
        if self.cpl is not None:
            out["cpl"] = self.cpl
        if self.baseline is not None:
            out["baseline"] = {"label": self.baseline_label, "figure": self.baseline}
            r = self.ratio
            out["ratio"] = None if r is None or math.isinf(r) else r
        if self.note:
            out["note"] = self.note
        if self.extra:
            out.update(self.extra)
        return out


@dataclass
class Section:
    """One area of the report."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    status: str = "ok"
    message: str = ""
    meta: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown section status {self.status!r}")

    def add(self, key: str, label: str, figure: dict | None, **kw) -> Row:
        row = Row(key, label, figure, **kw)
        self.rows.append(row)
        return row

    def figure(self, key: str) -> dict | None:
        for row in self.rows:
            if row.key == key:
                return row.figure
        return None

    def to_json(self) -> dict:
        return {
            "title": self.title,
            "status": self.status,
            "message": self.message,
            "elapsed_s": round(self.elapsed_s, 3),
            "meta": self.meta,
            "rows": [r.to_json() for r in self.rows],
        }
