"""`vmm snapshot SOCKET FILE`: save a running guest through its control
socket; the saved guest resumes and finishes like the original."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vmm.snapshot.machine import open_snapshot

pytestmark = pytest.mark.kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vmm(*args, **kw):
    return [sys.executable, os.path.join(ROOT, "vmm.py"), *args]


def test_snapshot_through_the_control_socket(tmp_path, vmm_kernel_path):
    sock, path = tmp_path / "vm.sock", tmp_path / "live.core"
    k = ["--kernel", str(vmm_kernel_path)]
    # Long enough that the save arrives before the end on any machine; where
    # the guest is when it arrives does not matter (boot or workload): the
    # resumed run must finish exactly like the original.
    vm = subprocess.Popen(_vmm("run", *k, "--control", str(sock), "-c", "workload=mm workload_iters=150 rng=seed"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120  # a Python start takes seconds under QEMU TCG (the SVM pass)
        while not sock.exists() and vm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        snap = subprocess.run(_vmm("snapshot", str(sock), str(path)), capture_output=True, text=True, timeout=60, cwd=ROOT)
        if snap.returncode != 0 and vm.poll() is not None and "no VM control socket" in snap.stderr:
            from vmm.backend import detect_backend

            b = detect_backend()
            if b.emulated:  # the guest runs natively while every Python start is emulated
                pytest.skip(f"{b.name} nested under {b.nested_under}: the guest finished before `vmm snapshot` started")
        assert snap.returncode == 0, snap.stderr
        assert "parked" in snap.stderr
        out, _err = vm.communicate(timeout=120)
    finally:
        vm.kill()
        vm.wait()
    assert vm.returncode == 0
    with open_snapshot(str(path)) as s:
        offset = s.meta["serial_offset"]
        assert s.meta["saved_at"] == "socket"
    resumed = subprocess.run(_vmm("run", *k, "--restore", str(path)), capture_output=True, timeout=120, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == out[offset:]


def test_snapshot_bad_socket_is_one_line(tmp_path, vmm_cli):
    proc = vmm_cli("snapshot", tmp_path / "none.sock", tmp_path / "x.core")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.core").exists()
