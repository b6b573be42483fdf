"""Rendering: the sections as rich tables, and as one JSON document.

Pure functions of the data ``stats.Section`` holds; nothing here measures.
Every report starts with the KVM backend and the CPU model (JSON: ``env``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
COLUMNS = ("what", "CPL", "median", "min", "max", "p99", "n", "baseline (same run)", "ratio")


def section_table(sec: Section) -> Table:
    title = f"{sec.title}"
    t = Table(title=title, title_justify="left", title_style="bold", show_lines=False, pad_edge=False, expand=False)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("what", "baseline (same run)") else "right",
                     no_wrap=col != "baseline (same run)", overflow="fold")
    show_cpl = any(r.cpl is not None for r in sec.rows)
    if not show_cpl:
        t.columns[1].visible = False
    show_p99 = any(r.figure and r.figure.get("p99") is not None for r in sec.rows)
    if not show_p99:
        t.columns[5].visible = False
    for row in sec.rows:
        label = "  " * row.indent + row.label
        fig = row.figure
        if fig is None:
            t.add_row(Text(label, style="bold cyan"), *[""] * (len(COLUMNS) - 1))
            continue
        du = _display_unit(fig)
        n = f"{fig['n']}" + (f"x{fig['runs']}" if fig.get("runs", 1) > 1 else "")
        base = ""
        if row.baseline is not None:
            base = f"{fmt(row.baseline['median'], row.baseline['unit'], _display_unit(row.baseline))}  {row.baseline_label}"
        t.add_row(
            label,
            "" if row.cpl is None else str(row.cpl),
            fmt(fig["median"], fig["unit"], du),
            fmt(fig["min"], fig["unit"], du),
            fmt(fig["max"], fig["unit"], du),
            fmt(fig.get("p99"), fig["unit"], du) if fig.get("p99") is not None else "",
            n,
            base,
            fmt_ratio(row.ratio),
        )
    return t


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
