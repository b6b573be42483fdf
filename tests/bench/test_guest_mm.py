"""Guest BENCH reports: decoding, name patterns, pairing with host baselines (pure)."""

import pytest

from vmm.abi import ReportKind
from vmm.bench import guest_mm as G
from vmm.reports import Report


def bench(name, p50=2600, cpl=0, **kw):
    fields = {"name": name, "unit": "cycles", "n": "100", "p50": str(p50), "p99": str(2 * p50),
              "min": str(p50 // 2), "max": str(4 * p50), "cpl": str(cpl)}
    fields.update({k: str(v) for k, v in kw.items()})
    return Report(ReportKind.BENCH, fields)


@pytest.mark.parametrize("name,size,kind", [
    ("alloc_free_64", 64, "small_alloc"),
    ("heap_small", None, "small_alloc"),
    ("alloc_free_4k", 4096, "large_alloc"),
    ("kmalloc_page", None, "large_alloc"),
    ("demand_fault", None, "demand_fault"),
    ("map_unmap_4k", 4096, "map_unmap"),
    ("invlpg", None, "invlpg"),
    ("cr3_reload", None, "cr3_flush"),
    ("frame_alloc_free", None, "frame_alloc"),
    ("pte_build", None, "other"),
])
def test_classify_by_name_pattern(name, size, kind):
    assert G.classify(name, size) == kind


@pytest.mark.parametrize("name,size", [("alloc_free_64", 64), ("alloc_free_4k", 4096), ("alloc_free_64k", 65536),
                                       ("map_unmap_2m", 2 << 20), ("invlpg", None), ("x86_thing", None)])
def test_size_from_name(name, size):
    assert G.size_from_name(name) == size


def test_decode_keeps_keys_and_extras():
    b = G.decode(bench("alloc_free_64", cpl=3, impl="list", freelist_len=1024, id="a.list.fl1024.cpl3", batch=16))
    assert (b.kind, b.cpl, b.size, b.freelist_len, b.impl, b.bench_id) == (
        "small_alloc", 3, 64, 1024, "list", "a.list.fl1024.cpl3")
    assert dict(b.extra) == {"batch": "16"}
    assert b.figure["unit"] == "cycles" and b.figure["p99"] == 5200


def test_decode_ignores_reports_without_name_or_p50():
    assert G.decode(Report(ReportKind.BENCH, {"name": "x"})) is None
    assert G.decode(Report(ReportKind.BENCH, {"p50": "1"})) is None


def test_size_key_wins_over_name():
    assert G.decode(bench("alloc_free_64", size=8192)).kind == "large_alloc"


def test_to_ns_uses_tsc_khz():
    fig = G.to_ns({"median": 2600.0, "min": 2600.0, "max": 2600.0, "n": 1, "unit": "cycles"}, 2_600_000)
    assert fig["unit"] == "ns" and fig["median"] == pytest.approx(1000)
    same = G.to_ns({"median": 1.0, "min": 1.0, "max": 1.0, "n": 1, "unit": "cycles"}, 0)
    assert same["unit"] == "cycles"


def test_merge_runs_by_identity():
    runs = [[G.decode(bench("invlpg", p50=100)), G.decode(bench("invlpg", p50=100, cpl=3))],
            [G.decode(bench("invlpg", p50=300))]]
    merged = G.merge_runs(runs)
    assert len(merged) == 2
    cpl0 = next(b for b in merged if b.cpl == 0)
    assert cpl0.figure["median"] == 200 and cpl0.figure["runs"] == 2


def test_baseline_requests():
    benches = [G.decode(bench(n, **kw)) for n, kw in [
        ("alloc_free_64", {"freelist_len": 64}), ("alloc_free_4k", {}), ("demand_fault", {}),
        ("map_unmap_4k", {}), ("invlpg", {}), ("mystery", {})]]
    assert G.baseline_requests(benches) == {("malloc", 64, 64), ("malloc", 4096, 0), ("fault",), ("map",)}


def test_empty_guest_section_says_update_the_guest():
    base = {("fault",): {"median": 1000.0, "min": 900.0, "max": 2000.0, "n": 10, "unit": "ns", "p99": 1500.0}}
    sec = G.section_from([], 2_600_000, base)
    assert sec.status == "empty"
    assert sec.message == G.NO_BENCHMARKS
    assert [r.label for r in sec.rows] == ["host: Linux minor fault (mmap + first touch)"]


def test_section_pairs_guest_with_host_and_keeps_cpl():
    benches = [G.decode(r) for r in [
        bench("alloc_free_64", p50=26000, cpl=0, freelist_len=1, impl="list"),
        bench("alloc_free_64", p50=26, cpl=3, freelist_len=1, impl="list"),
        bench("cr3_reload", p50=2600),
        bench("weird_new_thing", p50=2600),
    ]]
    malloc = {"median": 10.0, "min": 8.0, "max": 50.0, "n": 1000, "unit": "ns", "p50": 10.0, "p99": 12.0}
    sec = G.section_from(benches, 2_600_000, {("malloc", 64, 1): malloc})
    assert sec.status == "ok"
    headers = [r.label for r in sec.rows if r.figure is None]
    assert headers == [G.KIND_TITLES["small_alloc"], G.KIND_TITLES["cr3_flush"], G.KIND_TITLES["other"]]
    cpl0, cpl3 = [r for r in sec.rows if r.extra.get("guest_name") == "alloc_free_64"]
    assert (cpl0.cpl, cpl3.cpl) == (0, 3)
    assert cpl0.ratio == pytest.approx(1000) and cpl3.ratio == pytest.approx(1)
    assert "1 free chunk" in cpl0.baseline_label
    other = next(r for r in sec.rows if r.extra.get("guest_name") == "weird_new_thing")
    assert other.label == "weird_new_thing" and other.baseline is None
    j = sec.to_json()
    assert j["meta"]["tsc_khz"] == 2_600_000


def test_growth_section_compares_each_length_with_the_shortest():
    benches = [G.decode(bench("alloc_free_64", p50=p50, cpl=cpl, freelist_len=n, impl="list"))
               for n, p50 in [(1, 100), (64, 500), (1024, 8000)] for cpl in (0, 3)]
    benches.append(G.decode(bench("alloc_free_4k")))
    fig = {"median": 10.0, "min": 8.0, "max": 50.0, "n": 1000, "unit": "ns", "p50": 10.0, "p99": 12.0}
    base = {("malloc", 64, n): dict(fig) for n in (1, 64, 1024)}
    sec = G.growth_section(benches, 2_600_000, base)
    headers = [r.label for r in sec.rows if r.figure is None]
    assert headers == ["alloc_free_64 (list), CPL 0", "alloc_free_64 (list), CPL 3", "host: glibc malloc+free 64 B"]
    row = next(r for r in sec.rows if r.key == "alloc_free_64/list/cpl0/fl1024")
    assert row.ratio == pytest.approx(80) and row.baseline_label == "free list 1"
    assert next(r for r in sec.rows if r.key == "glibc/64/fl64").ratio == pytest.approx(1)


def test_no_growth_section_without_free_list_lengths():
    assert G.growth_section([G.decode(bench("alloc_free_64"))], 2_600_000, {}) is None


def test_cpl_agreement_messages():
    from vmm.bench.guest_mm import GuestBench, cpl_agreement

    def b(cpl, median, name="alloc_free_64"):
        return GuestBench(name, "small_alloc", cpl, 64, 64, "fast", {"median": median})

    assert "emulated" in cpl_agreement([b(0, 100000.0), b(3, 30.0)], "PVM")
    assert "agree within 25 %" in cpl_agreement([b(0, 31.0), b(3, 30.0)], "VMX")
    assert "disagree" in cpl_agreement([b(0, 90.0), b(3, 30.0)], "SVM")
    assert cpl_agreement([b(3, 30.0)], "VMX") == ""
    nested = cpl_agreement([b(0, 31.0), b(3, 30.0)], "SVM", "QEMU TCG")
    assert "nested under QEMU TCG" in nested and "not hardware speed" in nested and "1 of 1" in nested


def test_icount_section_from_a_result():
    from vmm.abi import ReportKind
    from vmm.bench.guest_mm import icount_section, instruction_counts
    from vmm.reports import Report

    class Result:
        reports = [Report(ReportKind.BENCH, {"name": "alloc_free_64", "unit": "instructions", "icount_id": "1",
                                             "impl": "fast"}),
                   Report(ReportKind.BENCH, {"name": "translate", "unit": "instructions", "icount_id": "6"}),
                   Report(ReportKind.BENCH, {"name": "lost", "unit": "instructions", "icount_id": "9"})]
        instruction_counts = {1: 99, 6: 63}

        def reports_of(self, kind):
            return [r for r in self.reports if r.kind == kind]

    counts = instruction_counts(Result())
    assert counts == [("alloc_free_64", "fast", 99), ("translate", "", 63)]
    sec = icount_section(counts)
    assert [r.figure["median"] for r in sec.rows] == [99.0, 63.0]
    assert icount_section([]) is None


def test_aligned_shapes_get_an_aligned_glibc_baseline():
    b = G.decode(bench("alloc_free_64_a512", cpl=3, impl="tlsf", freelist_len=64))
    assert b.size == 64 and b.align == 512 and b.kind == "small_alloc"
    assert G.baseline_requests([b]) == {("malloc", 64, 64, 512)}
    assert G.baseline_label(("malloc", 64, 64, 512)) == "glibc aligned_alloc(512)+free 64 B, 64 free chunks"
    plain = G.decode(bench("alloc_free_3k", cpl=3, impl="tlsf", freelist_len=1))
    assert plain.size == 3072 and plain.align == 0
    assert G.baseline_requests([plain]) == {("malloc", 3072, 1)}
    assert "aligned 512" in G.label(b)


@pytest.mark.parametrize("cmdline,extra", [
    ("bench=all", "bench=heap,icount allocator=list"),
    ("bench=cpl3 rng=seed", "bench=heap allocator=list rng=seed"),
    ("bench=all allocator=list", None),
    ("bench=invlpg", None),
])
def test_list_allocator_boot_only_when_the_heap_is_measured(cmdline, extra):
    assert G.list_allocator_cmdline(cmdline) == extra


def frag(allocator, seed, pages, free, largest, check="ok"):
    return {"event": "heap_frag", "allocator": allocator, "seed": seed, "ops": "200000", "cpl": "3",
            "live_bytes": "1000", "live_blocks": "10", "pages": str(pages), "free_bytes": str(free),
            "largest_free": str(largest), "free_blocks": "5", "failed": "0", "check": check}


def test_frag_section_medians_over_traces_beside_first_fit():
    sec = G.frag_section([frag("tlsf", 1, 330, 1000, 500), frag("list", 1, 340, 3000, 1000),
                          frag("tlsf", 2, 332, 900, 100), frag("list", 2, 338, 1000, 100),
                          frag("tlsf", 3, 331, 800, 400), frag("list", 3, 341, 2000, 1000, check="corrupt")])
    rows = {r.key: r for r in sec.rows}
    pages = rows["frag/tlsf/pages"]
    assert pages.figure["median"] == 331 and pages.figure["n"] == 3 and pages.figure["unit"] == "pages"
    assert pages.baseline["median"] == 340 and pages.baseline_label == "first fit"
    assert rows["frag/tlsf/free_over_largest"].figure["median"] == 2.0
    assert rows["frag/list/pages"].baseline is None
    assert "CORRUPT" in rows["frag/list"].label and "check ok" in rows["frag/tlsf"].label
    assert G.frag_section([]) is None
