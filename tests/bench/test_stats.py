"""Statistics and the row/section data model (pure)."""

import math

import pytest

from vmm.bench.stats import (
    Row, Section, distribution, in_unit, merge_distributions, percentile, rate, ratio, scale, summarize,
)


def test_summarize_median_min_max():
    fig = summarize([3, 1, 2, 10], "ms")
    assert fig == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4, "unit": "ms"}


def test_summarize_refuses_nothing():
    with pytest.raises(ValueError):
        summarize([], "ms")


@pytest.mark.parametrize("q,expected", [(0, 1), (1, 1), (50, 50), (99, 99), (100, 100)])
def test_percentile_nearest_rank(q, expected):
    assert percentile(list(range(1, 101)), q) == expected


def test_percentile_refuses_out_of_range():
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_has_p50_p99():
    fig = distribution(range(1000, 0, -1), "cycles")
    assert fig["p50"] == fig["median"] == 500
    assert fig["p99"] == 990
    assert (fig["min"], fig["max"], fig["n"]) == (1, 1000, 1000)


def test_merge_distributions_medians_and_extremes():
    a = {"median": 10, "p50": 10, "p99": 20, "min": 5, "max": 30, "n": 100, "unit": "cycles"}
    b = {"median": 12, "p50": 12, "p99": 40, "min": 4, "max": 25, "n": 50, "unit": "cycles"}
    c = {"median": 11, "p50": 11, "p99": 30, "min": 6, "max": 90, "n": 10, "unit": "cycles"}
    m = merge_distributions([a, b, c])
    assert m["median"] == m["p50"] == 11
    assert m["p99"] == 30
    assert (m["min"], m["max"], m["n"], m["runs"]) == (4, 90, 160, 3)


def test_merge_refuses_mixed_units():
    with pytest.raises(ValueError):
        merge_distributions([{"median": 1, "min": 1, "max": 1, "n": 1, "unit": "ns"},
                             {"median": 1, "min": 1, "max": 1, "n": 1, "unit": "cycles"}])


def test_scale_converts_every_value():
    fig = scale({"median": 2600, "min": 2600, "max": 5200, "p50": 2600, "p99": 5200, "n": 3, "unit": "cycles"},
                1e6 / 2_600_000, "ns")
    assert fig["unit"] == "ns" and fig["n"] == 3
    assert fig["median"] == pytest.approx(1000) and fig["p99"] == pytest.approx(2000)


def test_rate_inverts_and_swaps_min_max():
    r = rate({"median": 10.0, "min": 5.0, "max": 20.0, "n": 3, "unit": "us"})
    assert r["unit"] == "/s"
    assert r["median"] == pytest.approx(100_000)
    assert r["min"] == pytest.approx(50_000) and r["max"] == pytest.approx(200_000)


def test_rate_of_zero_is_infinite():
    assert math.isinf(rate({"median": 0.0, "min": 0.0, "max": 0.0, "n": 1, "unit": "ms"})["median"])


def test_ratio_across_time_units():
    assert ratio({"median": 1.0, "unit": "us"}, {"median": 10.0, "unit": "ns"}) == pytest.approx(100)
    assert ratio({"median": 4.0, "unit": "MiB"}, {"median": 2.0, "unit": "MiB"}) == 2
    assert ratio({"median": 4.0, "unit": "MiB"}, {"median": 2.0, "unit": "ns"}) is None
    assert ratio({"median": 4.0, "unit": "ns"}, None) is None
    assert ratio({"median": 4.0, "unit": "ns"}, {"median": 0.0, "unit": "ns"}) is None
    assert in_unit(1.5, "ms", "us") == pytest.approx(1500)


def test_row_json_carries_baseline_and_ratio():
    row = Row("k", "label", {"median": 2.0, "min": 1, "max": 3, "n": 3, "unit": "us"},
              baseline={"median": 1.0, "min": 1, "max": 1, "n": 3, "unit": "us"}, baseline_label="C", cpl=3)
    j = row.to_json()
    assert j["ratio"] == 2 and j["cpl"] == 3 and j["baseline"]["label"] == "C"


def test_section_rejects_unknown_status_and_finds_figures():
    with pytest.raises(ValueError):
        Section("x", "X", status="fine")
    sec = Section("x", "X")
    sec.add("a", "A", {"median": 1, "min": 1, "max": 1, "n": 1, "unit": "ms"})
    assert sec.figure("a")["median"] == 1 and sec.figure("b") is None
    assert sec.to_json()["rows"][0]["key"] == "a"
