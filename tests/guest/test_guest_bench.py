"""In-guest benchmarks (`bench=`): BENCH reports and their keys."""

from __future__ import annotations

import pytest

from vmm.abi import ReportKind

pytestmark = pytest.mark.kvm

KEYS = ("name", "id", "unit", "n", "p50", "p99", "min", "max", "cpl", "overhead", "backend")


def benches(r):
    return {b.get("id"): b for b in r.reports_of(ReportKind.BENCH)}


def check_keys(b):
    for k in KEYS:
        assert b.get(k) is not None, (k, b.fields)
    assert b.get("unit") == "cycles"
    assert b.int("min") <= b.int("p50") <= b.int("p99") <= b.int("max")
    assert b.int("n") > 0


def test_selected_cpl0_benchmarks(boot):
    r = boot("bench=invlpg,cr3_reload,pte_build,alloc_free_4k", timeout=30)
    assert r.exit_code == 0, r.serial.decode()[-2000:]
    got = benches(r)
    assert {"invlpg", "cr3_reload", "alloc_free_4k", "pte_build.cpl0"} <= set(got)
    for b in got.values():
        check_keys(b)
        assert b.int("cpl") == 0
    assert got["invlpg"].int("batch") == 16
    lines = r.serial.decode().splitlines()
    assert sum(line.startswith("BENCH ") for line in lines) == len(got)
    # bench runs after READY
    assert lines.index("kernel: READY") < next(i for i, line in enumerate(lines) if line.startswith("BENCH "))


def test_small_alloc_reports_free_list_length(boot):
    r = boot("bench=alloc_free_64", timeout=30)
    assert r.exit_code == 0, r.serial.decode()[-2000:]
    got = benches(r)
    for imp in ("list", "fast"):
        for fl in (1, 64):
            b = got[f"alloc_free_64.{imp}.fl{fl}.cpl0"]
            check_keys(b)
            assert b.get("impl") == imp and b.int("freelist_target") == fl
            assert b.int("freelist_len") >= fl
    # The list allocator walks the fragments; the fast path does not.
    assert got["alloc_free_64.list.fl64.cpl0"].int("p50") > 2 * got["alloc_free_64.fast.fl64.cpl0"].int("p50")
