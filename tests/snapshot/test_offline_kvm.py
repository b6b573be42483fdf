"""Offline inspection: a snapshot file gives the same views and JSON as the
live guest it was saved from; `--diff` compares two saved moments; bad
files are one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vmm.abi import ReportKind
from vmm.devices import Stop
from vmm.inspector.snapshot import take_snapshot
from vmm.inspector.target import LocalTarget
from vmm.inspector.views import inspect
from vmm.snapshot.machine import save_vm
from vmm.snapshot.offline import SnapshotTarget

pytestmark = pytest.mark.kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# How long reads took, and how the snapshot got consistent (a file needs no pause).
TIMING_KEYS = {"taken_at", "pause_ms", "walk_ms", "timings_ms", "consistency"}


def _view_json(target) -> dict:
    out = inspect(take_snapshot(target), target.physmem).to_json()
    return {k: v for k, v in out.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("cmdline", ["", "tests=heap"])
def test_file_views_equal_live_views(tmp_path, vmm_vm, vmm_ready, cmdline):
    """Stopped at the same point, the live guest and its snapshot give the same JSON."""
    kinds = {"": ReportKind.READY, "tests=heap": ReportKind.TEST_RESULT}

    def stop_at(report):
        return Stop(0, "here") if report.kind == kinds[cmdline] else None

    path = tmp_path / "g.core"
    if cmdline:
        vm = vmm_vm(cmdline, timeout=30, on_report=stop_at)
        assert vm.run().stop_reason == "here"
    else:
        vm = vmm_ready()
    save_vm(vm, str(path), "test")
    live = _view_json(LocalTarget(vm))
    with SnapshotTarget.open(str(path)) as target:
        offline = _view_json(target)
    assert offline == live
    assert live["runs"] and live["physical"] is not None


def vmm(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "vmm.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_pt_diff_between_two_saved_moments(tmp_path, vmm_kernel_path):
    a, b = tmp_path / "a.core", tmp_path / "b.core"
    k = ["--kernel", str(vmm_kernel_path)]
    assert vmm("run", *k, "-q", "-c", "tests=frames,paging,heap::grows", "--save", str(a)).returncode == 0
    # Resume and save again when the tests are done: what they left mapped
    # (heap growth) shows up as changes. Save points are events, not times,
    # so the test does not depend on the machine's speed.
    proc = vmm("run", *k, "-q", "--restore", str(a), "--save", str(b), "--save-at", "exit")
    assert proc.returncode == 0, proc.stderr
    out = vmm("pt", "--snapshot", str(a), "--diff", str(b), "--json")
    assert out.returncode == 0, out.stderr
    diff = json.loads(out.stdout)["diff"]
    same = json.loads(vmm("pt", "--snapshot", str(a), "--diff", str(a), "--json").stdout)["diff"]
    assert same["changes"] == []
    assert diff["changes"], "the in-guest tests leave the heap bigger than at READY"
    text = vmm("pt", "--snapshot", str(a), "--writable", "--kernel-half")
    assert text.returncode == 0 and "heap" in text.stdout
    png = tmp_path / "phys.png"
    assert vmm("pt", "--snapshot", str(a), "--png", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mm = vmm("memmap", "--snapshot", str(a), "--json")
    assert mm.returncode == 0, mm.stderr
    fresh = vmm("memmap", *k, "--json")
    assert json.loads(mm.stdout)["descriptors"] == json.loads(fresh.stdout)["descriptors"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["pt", "--snapshot", "/nonexistent.core"], "no such file"),
        (["pt", "--snapshot", "/etc/hostname"], "ELF"),
        (["memmap", "--snapshot", "/etc/hostname"], "ELF"),
        (["pt", "--diff", "/etc/hostname"], "--snapshot"),
        (["pt", "/tmp/some.sock", "--snapshot", "/etc/hostname"], "not both"),
    ],
)
def test_offline_bad_input_is_one_line(vmm_cli, args, fragment):
    proc = vmm_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert fragment in proc.stderr
