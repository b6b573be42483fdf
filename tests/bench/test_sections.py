"""Boot, exits, inspector and scale sections from synthetic samples (pure)."""

import pytest

from vmm.bench import boot, exits, inspector, scale


def test_exits_section_with_c_baseline():
    samples = {"python": [12.0, 11.0, 13.0], "profiled": [1.7, 1.8, 1.6], "bare": [10.0, 10.5, 10.2],
               "c": [8.0, 8.1, 7.9], "c_error": ""}
    sec = exits.section_from(samples, 5000)
    rt = next(r for r in sec.rows if r.key == "round_trip")
    assert rt.figure["median"] == 12.0 and rt.baseline["median"] == 8.0
    assert rt.ratio == pytest.approx(1.5)
    assert sec.figure("python_minus_c")["median"] == pytest.approx(4.0)
    assert sec.figure("exits_per_s")["median"] == pytest.approx(1e6 / 12.0)
    assert sec.meta == {"exits_per_run": 5000, "runs": 3}


def test_exits_section_without_gcc_says_why():
    samples = {"python": [12.0], "profiled": [1.7], "bare": [10.0], "c": [], "c_error": "no C compiler"}
    sec = exits.section_from(samples, 100)
    assert sec.figure("python_minus_c") is None
    assert "no C compiler" in sec.message


def _child(t0=0):
    ms = 1_000_000
    return {"t_spawn": t0, "t_main": t0 + 25 * ms, "t_imports": t0 + 110 * ms, "t_kernel": t0 + 130 * ms,
            "t_vm": t0 + 131 * ms, "t_exit": t0 + 220 * ms,
            "timings_ms": {"setup_total": 2.0, "to_ready": 60.0, "page_tables": 0.3},
            "rss_before_kib": {"VmRSS": 32 * 1024}, "rss_after_kib": {"VmRSS": 33 * 1024},
            "guest_resident_bytes": 256 * 1024}


def _trace(t0=0):
    """What `vmm run` writes with VMM_STARTUP_TRACE, plus the parent's spawn/exit times."""
    ms = 1_000_000
    return {"t_spawn": t0, "t_first": t0 + 25 * ms, "t_imports": t0 + 45 * ms, "t_built": t0 + 46 * ms,
            "t_kernel": t0 + 48 * ms, "t_vm": t0 + 49 * ms, "t_exit": t0 + 115 * ms,
            "timings_ms": {"setup_total": 2.0, "to_ready": 60.0, "page_tables": 0.3}}


def test_process_figures():
    f = boot.process_figures(_trace())
    assert f["proc_to_python"] == pytest.approx(25)
    assert f["proc_imports"] == pytest.approx(20)
    assert f["proc_build_check"] == pytest.approx(1)
    assert f["proc_kernel_load"] == pytest.approx(2)
    assert f["proc_to_first_insn"] == pytest.approx(51)
    assert f["proc_to_ready"] == pytest.approx(111)
    assert f["proc_ratio"] == pytest.approx(111 / 60)
    assert f["proc_total"] == pytest.approx(115)


def test_import_groups_count_only_after_site():
    err = """import time: self [us] | cumulative | imported package
import time:       300 |        300 |   posix
import time:      9000 |       9500 |   certifi
import time:      1200 |      26000 | site
import time:       800 |        800 |     argparse
import time:      2000 |       2800 |   vmm.cli
import time:     50000 |      50000 |       numpy.core
import time:      1000 |      51000 |     numpy
import time:       500 |      51500 |   mm.walker
"""
    g = boot.import_groups(err)
    assert g == {"stdlib and others": pytest.approx(0.8), "vmm.cli": pytest.approx(2.0), "numpy": pytest.approx(51.0),
                 "mm": pytest.approx(0.5), "rich": 0.0, "pyelftools": 0.0}


def test_import_rows_sum_the_small_ones():
    rows = boot._import_rows({"vmm.exits": [5.0, 6.0], "vmm.gdt": [0.1, 0.2], "vmm.layout": [0.1, 0.1],
                              "numpy": [0.0, 0.0], "vmm.vm": [2.0, 2.0]})
    names = [name for name, _ in rows]
    assert names[:2] == ["vmm.exits", "vmm.vm"] and "numpy" in names  # a heavy package always has its row
    assert rows[-1][0].startswith("modules under") and rows[-1][1] == pytest.approx([0.2, 0.3])


def test_boot_section_orders_steps_and_pairs_c():
    vm = {"kvm_create_vm": [0.3, 0.35], "guest_memory": [0.05, 0.06], "vcpu_create": [0.36, 0.37],
          "page_tables": [0.26, 0.27], "setup_total": [2.0, 2.1], "to_ready": [60.0, 61.0],
          "to_first_serial_byte": [0.5, 0.6], "run": [61, 62], "brand_new_step": [0.01, 0.02]}
    proc = {k: [v, v] for k, v in boot.process_figures(_trace()).items()}
    samples = {"vm": vm, "proc": proc, "c": {"kvm_create_vm": [0.15, 0.2]}, "bare_python": [24.0, 25.0],
               "imports": {"vmm.exits": [10.0, 11.0], "numpy": [0.5, 0.4]}, "errors": []}
    sec = boot.section_from(samples)
    keys = [r.key for r in sec.rows]
    # From process start, in the order a run takes them; then the VM's own steps.
    order = ["proc_to_ready", "proc_ratio", "proc_to_python", "proc_imports", "imports_vmm.exits", "imports_numpy",
             "proc_build_check", "proc_kernel_load", "proc_setup", "proc_guest_to_ready", "setup_total",
             "kvm_create_vm", "page_tables", "proc_to_first_insn", "to_ready"]
    assert [k for k in keys if k in order] == order
    assert sec.figure("proc_ratio")["unit"] == "x"
    ready = next(r for r in sec.rows if r.key == "proc_to_ready")
    assert ready.ratio == pytest.approx(111 / 60)
    assert "brand_new_step" in keys and "run" not in keys
    kvm = next(r for r in sec.rows if r.key == "kvm_create_vm")
    assert kvm.baseline["median"] == pytest.approx(0.175)
    assert next(r for r in sec.rows if r.key == "guest_memory").baseline is None


def test_scale_figures_subtract_guest_ram():
    f = scale.figures(_child())
    assert f["rss_overhead_mib"] == pytest.approx(1 - 0.25)
    assert f["touched_mib"] == pytest.approx(0.25)
    assert f["to_ready"] == 60.0


def test_scale_section_groups_by_size():
    per = {k: [v] for k, v in scale.figures(_child()).items()}
    sec = scale.section_from({"sizes": {16 << 20: per, 64 << 30: per}, "errors": []})
    headers = [r.label for r in sec.rows if r.figure is None]
    assert headers == ["16 MiB guest", "64 GiB guest"]
    assert sec.figure(f"{64 << 30}/rss_overhead_mib")["unit"] == "MiB"


def test_scale_section_error_when_nothing_booted():
    sec = scale.section_from({"sizes": {}, "errors": ["16 MiB: boom"]})
    assert sec.status == "error" and "boom" in sec.message


def test_inspector_section():
    samples = {"park_ms": [0.1, 0.2], "pause_ms": [0.8, 0.9], "entries_per_s_live": [7e6, 8e6],
               "refresh_ms": [10.0, 12.0], "walk_ms": [0.3, 0.4], "tables": 12, "runs": 9, "error": ""}
    sec = inspector.section_from(samples)
    eps = sec.figure("walker_entries_per_s")
    assert eps["unit"] == "/s" and eps["median"] == pytest.approx(12 * 512 / 0.35e-3)
    assert sec.figure("refresh_hz")["median"] == pytest.approx(1000 / 11)
    pause = next(r for r in sec.rows if r.key == "snapshot_pause")
    assert pause.ratio == pytest.approx(0.85 / 0.15)


def test_inspector_section_error_without_samples():
    empty = {"park_ms": [], "pause_ms": [], "entries_per_s_live": [], "refresh_ms": [], "walk_ms": [],
             "tables": 0, "runs": 0, "error": "the guest sent no INSPECT report within 60 s"}
    sec = inspector.section_from(empty)
    assert sec.status == "error" and not sec.rows


def test_pair_slowdowns_compare_each_watched_window_with_its_neighbours():
    from vmm.bench.watch import Window, pair_slowdowns

    # A drifting host: the guest speeds up over the run; each watched window
    # is judged against the unwatched windows on either side of it only.
    ws = [Window(False, 100, 1.0, 0.5), Window(True, 95, 1.0, 0.5), Window(False, 120, 1.0, 0.5),
          Window(True, 114, 1.0, None), Window(False, 130, 1.0, 0.5), Window(True, 0, 1.0, 0.5)]
    assert pair_slowdowns(ws) == pytest.approx([110 / 95 - 1, 125 / 114 - 1])  # the last: no window after it
    assert pair_slowdowns(ws, cpu=True) == pytest.approx([220 / 190 - 1])  # the second: CPU time not known
    assert pair_slowdowns([Window(False, 100, 1.0), Window(True, 100, 1.0)]) == []


def test_pooled_slowdown_weighs_every_second_and_brackets_itself():
    from vmm.bench.watch import Window, pooled_slowdown

    # Three pairs: watched at 90, 100 and 80 % of the unwatched speed around them.
    ws = [Window(False, 100, 1.0, 0.5), Window(True, 90, 1.0, 0.5), Window(False, 100, 1.0, 0.5),
          Window(True, 200, 2.0, 1.0), Window(False, 100, 1.0, 0.5), Window(True, 80, 1.0, 0.5),
          Window(False, 100, 1.0, 0.5)]
    mid, lo, hi = pooled_slowdown(ws)
    assert mid == pytest.approx(100 / ((90 + 200 + 80) / 4.0) - 1)  # sums: the 2 s window weighs double
    assert lo <= mid <= hi and lo >= 100 / 100 - 1 - 1e-12 and hi <= 100 / 80 - 1 + 1e-12
    assert pooled_slowdown(ws) == (mid, lo, hi)  # a fixed seed: the same windows, the same interval
    # The same run timed by the vCPU thread's CPU: half of every window, so the same ratios.
    assert pooled_slowdown(ws, cpu=True)[0] == pytest.approx(mid)
    steady = [Window(i % 2 == 1, 100, 1.0) for i in range(9)]
    assert pooled_slowdown(steady) == pytest.approx((0.0, 0.0, 0.0))
    assert pooled_slowdown([Window(False, 100, 1.0)]) is None


def test_watch_rows_per_workload():
    from vmm.bench.watch import WORKLOADS, WatchSamples, Window

    # off 100 it/s, on 98, off 100, on 90 (1 s of wall each; the vCPU thread had 0.9 s of each watched one)
    windows = [Window(False, 100, 1.0, 1.0), Window(True, 98, 1.0, 0.9), Window(False, 100, 1.0, 1.0),
               Window(True, 90, 1.0, 0.9), Window(False, 100, 1.0, 1.0)]
    s = WatchSamples(WORKLOADS[3], windows=windows, refresh_cpu_ms=[3.0, 4.0, 5.0], pause_ms=[0.3, 0.5, 2.0],
                     held_ms=[0.3, 1.5, 2.0], work_ms=[0.1, 0.2, 1.5], attempts=[1, 3, 7], stopped=1, retried=2,
                     snapshots=3, round_trip_ms=[0.4, 0.6, 2.2],
                     copy_phases_ms=[(0.02, 0.005, 0.07, 0.1, 0.004)] * 3, pause_cpu_ms=[0.2, 0.3, 0.4],
                     held_cpu_ms=[0.25, 1.2, 1.8])
    quiet = WatchSamples(WORKLOADS[0], error="guest failed")
    sec = inspector.section_from({"park_ms": [], "pause_ms": [], "entries_per_s_live": [], "refresh_ms": [],
                                  "walk_ms": [], "tables": 0, "runs": 0, "error": ""})
    inspector.add_watch_rows(sec, [s, quiet])
    pause = sec.figure("watch_frag16k_pause")
    assert pause["p50"] == 0.5 and pause["p99"] == 2.0 and pause["n"] == 3
    slow = sec.figure("watch_frag16k_slowdown")
    assert slow["unit"] == "%" and slow["median"] == pytest.approx((100 / 98 - 1 + 100 / 90 - 1) / 2 * 100)
    slow_note = next(r for r in sec.rows if r.key == "watch_frag16k_slowdown").note
    assert slow["n"] == 2 and "2 watched windows" in slow_note
    assert f"pooled {100 * (200 / 188 - 1):+.1f} %" in slow_note
    cpu = sec.figure("watch_frag16k_slowdown_cpu")
    assert cpu["median"] == pytest.approx((100 / (98 / 0.9) - 1 + 100 / (90 / 0.9) - 1) / 2 * 100)
    assert "100 % of a CPU unwatched, 90 % watched" in next(r for r in sec.rows if r.key == "watch_frag16k_slowdown_cpu").note
    assert sec.figure("watch_frag16k_refresh_cpu")["p50"] == 4.0
    note = next(r for r in sec.rows if r.key == "watch_frag16k_pause").note
    assert "p99 2.000 ms" in note and "max 2.000 ms" in note and "1 stopped" in note and "2 retried" in note
    assert sec.figure("watch_frag16k_round_trip")["p99"] == 2.2
    assert sec.figure("watch_frag16k_pause_cpu")["p99"] == 0.4
    assert sec.figure("watch_frag16k_held_cpu")["p99"] == 1.8
    assert "tables 70/70; heap 100/100" in next(r for r in sec.rows if r.key == "watch_frag16k_work").note
    assert sec.figure("watch_compute_pause") is None and "guest failed" in sec.message
