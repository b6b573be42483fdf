"""Inspecting a booted guest: locally at its READY point and over the control socket."""

import json
import subprocess
import sys
import threading
import time

import pytest

from vmm.devices import Stop
from vmm.inspector.control import ControlServer, RemoteTarget
from vmm.inspector.snapshot import RunFilter, take_snapshot
from vmm.inspector.target import LocalTarget
from vmm.inspector.views import inspect
from vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


def test_snapshot_at_ready_labels_and_audits(guest_image, vmm_ready):
    vm = vmm_ready()
    view = inspect(take_snapshot(LocalTarget(vm)), vm.memory)
    labels = {label for _, label in view.runs}
    assert {"kernel .text", "kernel .rodata", "kernel .data/.bss", "direct map"} <= labels
    text = [r for r, label in view.runs if label == "kernel .text"][0]
    assert text.virt == (guest_image.entry & ~0xFFF) + vm.slide
    assert not [f for f in view.findings if f.severity.name == "ERROR"], view.findings
    assert view.physical is not None and view.physical.allocated > 0
    doc = view.to_json()
    json.dumps(doc)
    assert doc["schema"] == 1 and doc["kaslr_slide"] == vm.slide


def test_filters(vmm_ready):
    vm = vmm_ready()
    snap = take_snapshot(LocalTarget(vm))
    execs = inspect(snap, vm.memory, RunFilter(executable=True)).runs
    assert execs and all(label == "kernel .text" for _, label in execs)
    assert not inspect(snap, vm.memory, RunFilter(user=True)).runs
    big = inspect(snap, vm.memory, RunFilter(page_size=2 << 20)).runs
    assert big and all(label in ("direct map", "framebuffer (direct map)") for _, label in big)


def test_control_socket_snapshot_of_running_guest(guest_image, tmp_path):
    path = str(tmp_path / "vm.sock")
    with Vm(guest_image, VmConfig(memory=64 << 20, cmdline="scenario=loop", timeout=20)) as vm:
        with ControlServer(vm, path):
            t = threading.Thread(target=vm.run)
            t.start()
            try:
                deadline = time.time() + 10
                while not vm.running and time.time() < deadline:
                    time.sleep(0.01)
                with RemoteTarget(path) as target:
                    snap = take_snapshot(target)
                    assert snap.parked, "the vCPU was not parked for the snapshot"
                    view = inspect(snap, target.physmem)
                    assert any(label == "kernel .text" for _, label in view.runs)
                    again = take_snapshot(target)
                    assert again.registers.cr3 == snap.registers.cr3
                    assert vm.running, "the guest must keep running after a snapshot"
            finally:
                vm.request_stop(Stop(0, "test", "done"))
                t.join(10)
        assert not t.is_alive()


def test_cli_pt_json(guest_kernel_path):
    proc = subprocess.run(
        [sys.executable, "vmm.py", "pt", "--kernel", str(guest_kernel_path), "--json", "--executable"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["runs"] and all(r["executable"] for r in doc["runs"])


def test_cli_pt_missing_socket(vmm_cli):
    proc = vmm_cli("pt", "/nonexistent/vm.sock")
    assert proc.returncode != 0 and "no VM control socket" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_pt_pictures(guest_kernel_path, tmp_path):
    png, shot = tmp_path / "phys.png", tmp_path / "fb.png"
    proc = subprocess.run(
        [sys.executable, "vmm.py", "pt", "--kernel", str(guest_kernel_path), "--png", str(png),
         "--screenshot", str(shot), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import struct

    for path, size in ((png, None), (shot, (640, 480))):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", data[16:24])
        if size:
            assert (w, h) == size


def test_cli_run_inspect_without_a_terminal(guest_kernel_path):
    """Piped output: the console as usual plus one inspector summary line a second."""
    proc = subprocess.run(
        [sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "--inspect",
         "-c", "workload=mm workload_ms=1200"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "kernel: READY" in out and "inspect: refresh" in out
    assert "0 audit errors" in out


def _png_pixels(path):
    """Decode the PNGs we write (8-bit RGB, filter 0 on every row)."""
    import struct
    import zlib

    data = path.read_bytes()
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos : pos + 8])
        if tag == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = [raw[y * (3 * w + 1) + 1 : (y + 1) * (3 * w + 1)] for y in range(h)]
    return w, h, rows


def test_screenshot_shows_what_the_guest_drew(guest_kernel_path, tmp_path):
    """With fb=1 the guest draws its memory map as colour bands; the host's
    screenshot must show them (Conventional RAM is green 0x28A03C)."""
    shot = tmp_path / "fb.png"
    proc = subprocess.run(
        [sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "-q", "-c", "fb=1",
         "--screenshot", str(shot)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    w, h, rows = _png_pixels(shot)
    top = rows[4]
    pixels = {tuple(top[i : i + 3]) for i in range(0, len(top), 3)}
    assert (0x28, 0xA0, 0x3C) in pixels
    assert len(pixels) >= 4  # several memory types, several colours
    assert set(rows[h - 1]) == {0}  # below the strip: untouched
