"""The session's summary line of how test VMs started (vmm.start_tally):
the pure text here; what the plugin prints, through pytest itself."""

import json
import os
import re
from pathlib import Path

import pytest

from vmm.start_tally import COLD, FORK, RESET, StartTally


def test_no_vm_no_line():
    assert StartTally().summary() is None


def test_line_names_each_kind_its_median_and_why_vms_booted_cold():
    t = StartTally()
    t.add_zygote_boot(70.0)
    for ms in (0.2, 0.3, 0.4):
        t.add(RESET, ms, cold_equivalent_ms=72.0)
    t.add(FORK, 1.5, cold_equivalent_ms=72.0)
    t.add(COLD, 60.0, "fresh=True")
    t.add(COLD, 80.0, "fresh=True")
    t.add(COLD, 65.0, "a kernel of the test's own")
    line = t.summary()
    assert line.startswith("vmm: 7 test VMs: 4 from 1 zygote (3 resets median 0.30 ms, 1 fork median 1.50 ms)")
    assert "3 booted cold median 65.00 ms (2 fresh=True, 1 a kernel of the test's own)" in line
    # 0.9 + 1.5 + 205 + the zygote's 70
    assert "; 0.28 s to booted guests (zygote boots 0.07 s of it)" in line
    assert line.endswith("; about 0.49 s if all booted cold")  # 4 x 72 (the zygote config cold) + the cold ones' 205


def test_no_estimate_without_every_start_s_cold_equivalent():
    t = StartTally()
    t.add(FORK, 1.0)
    t.add(COLD, 60.0, "fresh=True")
    assert "if all booted cold" not in t.summary()


def test_only_cold_starts_make_no_estimate():
    t = StartTally()
    t.add(COLD, 50.0, "--vmm-cold")
    assert t.summary() == "vmm: 1 test VMs: 1 booted cold median 50.00 ms (1 --vmm-cold); 0.05 s to booted guests"


def test_tallies_merge_as_an_xdist_controller_adds_its_workers():
    a, b = StartTally(), StartTally()
    a.add_zygote_boot(70.0)
    a.add(RESET, 0.2, cold_equivalent_ms=70.0)
    b.add_zygote_boot(75.0)
    b.add(FORK, 1.0, cold_equivalent_ms=75.0)
    b.add(COLD, 60.0, "fresh=True")
    total = StartTally()
    for t in (a, b):
        total.merge(json.loads(json.dumps(t.to_json())))  # what crosses from worker to controller
    line = total.summary()
    assert line.startswith("vmm: 3 test VMs: 2 from 2 zygotes (1 reset median 0.20 ms, 1 fork median 1.00 ms); "
                           "1 booted cold median 60.00 ms (1 fresh=True)")
    assert line.endswith("about 0.20 s if all booted cold")  # 70 + 75 + 60


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown start kind"):
        StartTally().add("teleport", 1.0)


pytest_plugins = ["pytester"]

_LINE = re.compile(r"^vmm: (\d+) test VMs: (.*)$", re.M)


@pytest.mark.kvm
@pytest.mark.parametrize("cold", [False, True], ids=["zygotes", "vmm-cold"])
def test_the_session_ends_with_how_its_vms_started(pytester, guest_kernel_path, cold):
    # Two in-guest tests of one zygote (listing + 2 runs: a fork, then resets)
    # and one vmm_boot(fresh=True): the summary counts each the way it started.
    pytester.makefile(".ktest", kernel="memory = 32M\nselect = frames::alloc_free_single,frames::only_conventional\n")
    pytester.makepyfile(
        """
        def test_fresh(vmm_boot):
            assert vmm_boot("", memory=32 << 20, fresh=True).exit_code == 0
        """
    )
    args = ["-p", "vmm.pytest_plugin", f"--vmm-kernel={guest_kernel_path}", "-q"] + (["--vmm-cold"] if cold else [])
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=3)
    found = _LINE.search(result.stdout.str())
    assert found, result.stdout.str()
    total, rest = int(found.group(1)), found.group(2)
    assert total == 4  # the listing boot, two test items, the fresh boot
    if cold:
        assert "4 booted cold" in rest and "(4 --vmm-cold)" in rest and "zygote" not in rest
    else:
        assert "3 from 1 zygote" in rest and "1 booted cold" in rest and "(1 fresh=True)" in rest
        assert "if all booted cold" in rest


@pytest.mark.kvm
def test_under_xdist_the_controller_prints_every_worker_s_starts(pytester, guest_kernel_path, monkeypatch):
    # Each of the 2 workers collects the .ktest (its own zygote and listing
    # boot); the 3 tests run wherever xdist sends them: 5 VMs in one line.
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))))
    pytester.makefile(".ktest", kernel="memory = 32M\nselect = frames::alloc_free_single,frames::only_conventional\n")
    pytester.makepyfile(
        """
        def test_fresh(vmm_boot):
            assert vmm_boot("", memory=32 << 20, fresh=True).exit_code == 0
        """
    )
    result = pytester.runpytest("-p", "vmm.pytest_plugin", "-p", "xdist", "-p", "no:benchmark", "-n", "2",
                                f"--vmm-kernel={guest_kernel_path}", "-q")
    result.assert_outcomes(passed=3)
    found = _LINE.search(result.stdout.str())
    assert found, result.stdout.str()
    assert int(found.group(1)) == 5
    assert "4 from 2 zygotes" in found.group(2) and "1 booted cold" in found.group(2)
