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
    assert "11.7 us" in text and "7.90 us [1]" in text and "[1] baseline: C loop" in text and "x1.48" in text
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


def _text(sections, width=120):
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(report.render(ENV, sections))
    return console.export_text()


def test_fits_120_columns_with_long_labels_and_baselines():
    sec = Section("boot", "Boot")
    long_base = "minimal C VMM doing the same KVM syscalls, built with gcc -O2 in this run"
    for i in range(5):
        sec.add(f"k{i}", "host setup: all of it (RAM, boot data, KVM_CREATE_VM, vCPU, slots) -> first guest instruction",
                {"median": 1.5, "min": 1.2, "max": 2.0, "n": 10, "unit": "ms", "p50": 1.5, "p99": 1.9, "runs": 1},
                baseline={"median": 0.2, "min": 0.1, "max": 0.3, "n": 10, "unit": "ms"}, baseline_label=long_base, cpl=0)
    lines = _text([sec]).splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 120
    rows = [line for line in lines if "1.50 ms" in line]
    assert len(rows) == 5
    # every row takes at most three lines (only the label wraps), the baseline is a footnote
    body = lines[lines.index(next(line for line in lines if "───" in line)) + 1 :]
    body = body[: next(i for i, line in enumerate(body) if "[1] baseline" in line)]
    assert len([line for line in body if line.strip()]) <= 5 * 3
    assert sum(long_base in line for line in lines) == 1


def test_p99_only_where_n_supports_it():
    sec = Section("guest", "Guest")
    sec.add("few", "few samples", {"median": 10.0, "min": 9.0, "max": 30.0, "n": 5, "unit": "ns", "p50": 10.0, "p99": 30.0})
    text = _text([sec])
    assert "p99" not in text.split("Guest", 1)[1].splitlines()[2]  # no p99 column at all
    sec.add("many", "many samples", {"median": 10.0, "min": 9.0, "max": 90.0, "n": 400, "unit": "ns", "p50": 10.0,
                                     "p99": 12.0, "runs": 2})
    text = _text([sec])
    few = next(line for line in text.splitlines() if "few samples" in line)
    many = next(line for line in text.splitlines() if "many samples" in line)
    assert "12.0 ns" in many and "30.0 ns" not in few


def test_derived_figures_are_explained():
    from vmm.bench.exits import section_from

    samples = {"python": [11.0, 12.0, 11.5], "c": [8.0, 12.5, 8.1], "profiled": [0.7, 0.8, 0.7],
               "bare": [10.0, 10.5, 10.2]}
    sec = section_from(samples, 1000)
    diff = sec.figure("python_minus_c")
    assert diff["min"] < 0  # a noisy run: the report must say why
    text = _text([sec])
    assert "difference of two loops timed in each run" in text and "(read the median)" in text
    assert "1 / round trip per run" in text
