"""Rendering: the sections as rich tables, and as one JSON document.

Pure functions of the data ``stats.Section`` holds; nothing here measures.
Every report starts with the KVM backend and the CPU model (JSON: ``env``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .stats import TIME_UNITS, Section

SCHEMA = "vmm-bench/1"


# --- numbers ---------------------------------------------------------------------------
def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.2f}"
    return f"{v:.2g}"


def time_unit_for(value_ns: float) -> str:
    """The largest time unit in which ``value_ns`` is at least 1 (ns at the bottom)."""
    for unit in ("s", "ms", "us"):
        if abs(value_ns) >= TIME_UNITS[unit]:
            return unit
    return "ns"


def fmt(value: float | None, unit: str, display_unit: str | None = None) -> str:
    """A value with its unit; time values in ``display_unit`` (default: the best fit)."""
    if value is None:
        return "-"
    if unit in TIME_UNITS:
        ns = value * TIME_UNITS[unit]
        target = display_unit or time_unit_for(ns)
        return f"{_num(ns / TIME_UNITS[target])} {target}"
    if unit in ("/s", "Hz"):
        for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= factor:
                return f"{_num(value / factor)}{suffix}{unit if unit == 'Hz' else '/s'}"
        return f"{_num(value)} {unit}" if unit == "Hz" else f"{_num(value)}/s"
    return f"{_num(value)} {unit}"


def _display_unit(fig: dict) -> str | None:
    if fig["unit"] in TIME_UNITS:
        return time_unit_for(fig["median"] * TIME_UNITS[fig["unit"]])
    return None


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    if math.isinf(r):
        return "inf"
    return f"x{_num(r)}"


# --- rich ----------------------------------------------------------------------------------
COLUMNS = ("what", "CPL", "median", "min", "max", "p99", "n", "baseline", "ratio")
WHAT_WIDTH = 52  # the label column wraps here: a report fits 120 columns
# A p99 needs at least 100 samples in a run: with fewer, the nearest-rank
# 99th percentile is just the maximum.
P99_MIN_SAMPLES = 100


def p99_supported(fig: dict) -> bool:
    """True if the figure's p99 rests on enough samples per run to mean something."""
    if fig.get("p99") is None:
        return False
    per_run = fig.get("n", 0) / max(1, fig.get("runs", 1))
    return per_run >= P99_MIN_SAMPLES


def _bare(value: float | None, unit: str, display_unit: str | None) -> str:
    """A value without its unit (min/max share the median's unit)."""
    text = fmt(value, unit, display_unit)
    return text.rsplit(" ", 1)[0] if " " in text else text


def section_table(sec: Section) -> Group:
    """The section as a table that fits 120 columns, then its footnotes: what
    each baseline is and how derived figures (differences, rates) are made."""
    hidden = set()
    if not any(r.cpl is not None for r in sec.rows):
        hidden.add("CPL")
    if not any(r.figure and p99_supported(r.figure) for r in sec.rows):
        hidden.add("p99")
    if not any(r.baseline is not None for r in sec.rows):
        hidden |= {"baseline", "ratio"}
    shown = [c for c in COLUMNS if c not in hidden]
    t = Table(title=sec.title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
              pad_edge=False, expand=False, collapse_padding=True)
    for col in shown:
        if col == "what":
            t.add_column(col, justify="left", max_width=WHAT_WIDTH, overflow="fold")
        else:
            t.add_column(col, justify="right", no_wrap=True)
    notes: list[str] = []

    def mark(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    for row in sec.rows:
        label = "  " * row.indent + row.label
        fig = row.figure
        if fig is None:
            t.add_row(Text(label, style="bold cyan"), *[""] * (len(shown) - 1))
            continue
        if row.note:
            label += " " + mark(row.note)
        du = _display_unit(fig)
        n = f"{fig['n']}" + (f"x{fig['runs']}" if fig.get("runs", 1) > 1 else "")
        base = ""
        if row.baseline is not None:
            base = fmt(row.baseline["median"], row.baseline["unit"], _display_unit(row.baseline))
            if row.baseline_label:
                base += " " + mark(f"baseline: {row.baseline_label}")
        cells = {
            "what": label,
            "CPL": "" if row.cpl is None else str(row.cpl),
            "median": fmt(fig["median"], fig["unit"], du),
            "min": _bare(fig["min"], fig["unit"], du),
            "max": _bare(fig["max"], fig["unit"], du),
            "p99": fmt(fig.get("p99"), fig["unit"], du) if p99_supported(fig) else "",
            "n": n,
            "baseline": base,
            "ratio": fmt_ratio(row.ratio),
        }
        t.add_row(*(cells[c] for c in shown))
    footer = Text("\n".join(f"  [{i + 1}] {note}" for i, note in enumerate(notes)), style="dim")
    return Group(t, footer) if notes else Group(t)


def banner(env: dict) -> Text:
    b = env.get("backend", {})
    text = Text()
    text.append(f"KVM backend: {b.get('backend', '?')}", style="bold")
    if b.get("detail"):
        text.append(f" ({b['detail']})")
    text.append(f"; CPU: {env.get('cpu_model', '?')}", style="bold")
    extra = [f"{env.get('cpus', '?')} CPUs", f"Python {env.get('python', '?')}", f"Linux {env.get('kernel_release', '?')}"]
    if env.get("tsc_khz"):
        extra.append(f"TSC {env['tsc_khz'] / 1e6:.2f} GHz")
    text.append("\n" + ", ".join(extra))
    if env.get("guest_kernel"):
        text.append(f"\nguest kernel: {env['guest_kernel']}")
        if env.get("guest_kernel_sha256"):
            text.append(f" (sha256 {env['guest_kernel_sha256'][:12]})")
        if env.get("guest_kernel_note"):
            text.append(f" ({env['guest_kernel_note']})", style="yellow")
    opts = env.get("options", {})
    if opts:
        text.append(f"\n{'quick mode, ' if opts.get('quick') else ''}{opts.get('runs')} runs per figure; "
                    "medians with min and max; figures are reported, never asserted")
    text.append(f"\nn: samples (x runs); min, max in the median's unit; p99 where a run has {P99_MIN_SAMPLES}+ "
                "samples; ratio: median / baseline's")
    return text


def render(env: dict, sections: list[Section]) -> Group:
    parts: list = [banner(env)]
    for sec in sections:
        if sec.rows:
            parts.append(section_table(sec))
        else:
            parts.append(Text(sec.title, style="bold"))
        if sec.message:
            style = {"error": "red", "empty": "yellow", "skipped": "dim"}.get(sec.status, "yellow")
            parts.append(Text(f"  {sec.message}", style=style))
    return Group(*parts)


# --- JSON -----------------------------------------------------------------------------------
def _clean(obj):
    """JSON-safe: no NaN/inf (null instead), dict keys as strings."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(env: dict, sections: list[Section], elapsed_s: float) -> dict:
    return _clean({
        "schema": SCHEMA,
        "backend": env.get("backend", {}).get("backend"),
        "cpu_model": env.get("cpu_model"),
        "env": env,
        "elapsed_s": round(elapsed_s, 3),
        "sections": {s.name: s.to_json() for s in sections},
    })


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
