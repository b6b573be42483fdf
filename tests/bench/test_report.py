"""Rendering and JSON (pure)."""

import json
import math

import pytest
from rich.console import Console

from vmm.bench import report
from vmm.bench.stats import Section

ENV = {"backend": {"backend": "PVM", "detail": "CPL0 guest code emulated, CPL3 native", "cpu_model": "Test CPU"},
       "cpu_model": "Test CPU", "cpus": 2, "python": "3.11", "kernel_release": "6.1", "tsc_khz": 2_600_000,
       "options": {"quick": True, "runs": 3}}


@pytest.mark.parametrize("value,unit,text", [
    (0.5, "us", "500 ns"), (1500.0, "ns", "1.50 us"), (2.5, "ms", "2.50 ms"), (2500.0, "ms", "2.50 s"),
    (85_600.0, "/s", "85.6k/s"), (19e6, "/s", "19.0M/s"), (108.0, "Hz", "108 Hz"), (0.59, "MiB", "0.59 MiB"),
    (12345.0, "cycles", "12,345 cycles"), (None, "ms", "-"),
])
def test_fmt(value, unit, text):
    assert report.fmt(value, unit) == text


def test_fmt_in_a_fixed_unit():
    assert report.fmt(61551.0, "ns", "ns") == "61,551 ns"


def test_fmt_ratio():
    assert report.fmt_ratio(None) == ""
    assert report.fmt_ratio(1.476) == "x1.48"
    assert report.fmt_ratio(math.inf) == "inf"


def _sections():
    a = Section("exits", "Exits")
    a.add("rt", "round trip", {"median": 11.7, "min": 11.6, "max": 11.8, "n": 3, "unit": "us"},
          baseline={"median": 7.9, "min": 7.9, "max": 8.0, "n": 3, "unit": "us"}, baseline_label="C loop")
    a.add("rate", "per second", {"median": math.inf, "min": 1.0, "max": math.inf, "n": 3, "unit": "/s"})
    g = Section("guest", "Guest", status="empty", message="guest reports no benchmarks (update the guest)")
    c = Section("guest2", "Guest CPL")
    c.add("h", "group", None)
    c.add("x", "alloc", {"median": 10.0, "min": 9.0, "max": 90.0, "n": 500, "unit": "ns", "p50": 10.0, "p99": 12.0,
                         "runs": 2}, cpl=3, indent=1)
    return [a, g, c]


def test_render_names_backend_cpu_and_every_section():
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(report.render(ENV, _sections()))
    text = console.export_text()
    assert "KVM backend: PVM" in text and "CPU: Test CPU" in text
    assert "TSC 2.60 GHz" in text
    assert "11.7 us" in text and "7.90 us  C loop" in text and "x1.48" in text
    assert "guest reports no benchmarks (update the guest)" in text
    assert "500x2" in text  # iterations x runs


def test_json_document_is_strict_json(tmp_path):
    doc = report.to_json(ENV, _sections(), 1.23456)
    path = tmp_path / "b.json"
    report.write_json(path, doc)
    back = json.loads(path.read_text())
    assert back["schema"] == report.SCHEMA
    assert back["backend"] == "PVM" and back["cpu_model"] == "Test CPU"
    assert list(back["sections"]) == ["exits", "guest", "guest2"]
    rows = back["sections"]["exits"]["rows"]
    assert rows[0]["ratio"] == pytest.approx(11.7 / 7.9)
    assert rows[1]["figure"]["median"] is None  # inf is not JSON
    assert back["sections"]["guest"]["status"] == "empty"
    assert back["sections"]["guest2"]["rows"][1]["cpl"] == 3
