"""The SVM test VM's pieces that run on the host: initramfs format, file list, markers, errors.

Booting QEMU itself is the SVM pass of .ci/run (scripts/svm_tests.sh), not a test here.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.svm.cpio import CpioWriter
from vmm.svm.image import Manifest, SvmError, base_manifest, find_linux
from vmm.svm.qemu import _marker_overlap

REPO = Path(__file__).resolve().parents[2]


def parse_newc(blob: bytes) -> list[tuple[str, int, bytes]]:
    """An independent reader of the format, as the kernel's unpacker reads it."""
    out, pos = [], 0
    while True:
        assert blob[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = blob[pos + 110 : pos + 110 + namesize - 1].decode()
        assert blob[pos + 110 + namesize - 1] == 0
        pos = (pos + 110 + namesize + 3) & ~3
        data = blob[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            assert len(blob) % 4 == 0
            return out
        out.append((name, mode, data))


def test_cpio_round_trip():
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("a")
    w.file("a/odd", b"xyz", 0o755, mtime=1234)
    w.file("a/empty", b"")
    w.symlink("b", "a/odd")
    w.directory("a")  # repeated directories are written once
    w.close()
    entries = parse_newc(buf.getvalue())
    assert [(n, stat.S_IFMT(m)) for n, m, _ in entries] == [
        ("a", stat.S_IFDIR), ("a/odd", stat.S_IFREG), ("a/empty", stat.S_IFREG), ("b", stat.S_IFLNK)]
    assert entries[1][2] == b"xyz" and stat.S_IMODE(entries[1][1]) == 0o755
    assert entries[3][2] == b"a/odd"


def test_manifest_recreates_symlinked_ancestors(tmp_path):
    real = tmp_path / "real" / "lib"
    real.mkdir(parents=True)
    (real / "libx.so.1.0").write_bytes(b"\x7fELF")
    (real / "libx.so.1").symlink_to("libx.so.1.0")
    (tmp_path / "lib64").symlink_to("real")
    m = Manifest()
    m.host_path(str(tmp_path / "lib64" / "lib" / "libx.so.1"))
    kinds = {k: (e.kind, e.target) for k, e in m.entries.items()}
    assert kinds[str(tmp_path / "lib64")] == ("link", "real")
    assert kinds[str(real / "libx.so.1")] == ("link", "libx.so.1.0")
    assert kinds[str(real / "libx.so.1.0")][0] == "file"
    buf = io.BytesIO()
    m.write(buf)
    names = [n for n, _, _ in parse_newc(buf.getvalue())]
    # every parent directory comes before its children
    for i, n in enumerate(names):
        parent = n.rsplit("/", 1)[0]
        assert "/" not in n or parent in names[:i] or parent == str(tmp_path / "lib64").lstrip("/")


def test_fingerprint_follows_content(tmp_path):
    f = tmp_path / "f"
    f.write_text("1")
    m = Manifest()
    m.host_path(str(f))
    first = m.fingerprint()
    assert m.fingerprint() == first
    os.utime(f, ns=(1, 2_000_000_000))
    assert m.fingerprint() != first


@pytest.mark.parametrize(
    "data, keep",
    [(b"hello", 0), (b"hello PYV", 3), (b"PYVMM-SVM-EXIT-ab", 17), (b"x PYVMM-SVM-EXIT-ab 0", 19), (b"", 0)],
)
def test_exit_marker_is_never_split_or_forged_by_partial_lines(data, keep):
    assert _marker_overlap(data, b"PYVMM-SVM-EXIT-ab") == keep


def _run_cli(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "vmm.py", "svm", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)


def test_cli_without_qemu_is_one_line_host_error():
    p = _run_cli("--", "true", env={"PATH": "/nonexistent"})
    assert p.returncode == 70
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "qemu-system-x86_64 is not installed" in p.stderr


def test_cli_without_kernel_package_is_one_line_host_error(tmp_path):
    p = _run_cli("--", "true", env={"PYVMM_CACHE": str(tmp_path)})
    if "qemu-system-x86_64 is not installed" in p.stderr:
        pytest.skip("QEMU is not installed (setup.sh installs it)")
    assert p.returncode == 70 and "no unpacked linux-image-cloud-amd64" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--memory", "3X", "--", "true"], ["--smp", "0", "--", "true"], [], ["--timeout", "-1", "--", "x"]])
def test_cli_bad_usage_exits_2(args):
    p = _run_cli(*args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_base_image_holds_exactly_what_the_vm_needs():
    try:
        layer = base_manifest(REPO)
    except SvmError as exc:
        pytest.skip(f"SVM backend not set up here: {exc}")
    names = set(layer.manifest.entries)
    assert {"/init", "/pyvmm/bin/busybox"} <= names
    modules = sorted(n for n in names if n.startswith("/pyvmm/modules/"))
    assert [m.split("/")[-1] for m in modules] == ["0-irqbypass.ko", "1-kvm.ko", "2-kvm-amd.ko"]  # load order
    assert os.path.abspath(sys.executable) in names
    for pkg in ("numpy", "rich", "elftools", "pytest", "hypothesis"):
        mod = __import__(pkg)
        assert os.path.abspath(mod.__file__) in names, pkg
    assert not any("/numpy/" in n and "/tests/" in n for n in names), "numpy's own tests are left out"
    assert not any(n.endswith("/python3.11/test/__init__.py") for n in names), "the stdlib's tests are left out"
    assert layer.fingerprint == base_manifest(REPO).fingerprint
    assert find_linux().vmlinuz.is_file()


def test_guest_kernel_found_without_toolchain_when_built_from_these_sources(tmp_path):
    """Inside the SVM VM there is no Rust: build_guest() takes the kernel the host built from the same sources."""
    from vmm.guest_build import GuestBuildError, _built_from_these_sources, build_guest

    try:
        kernel = build_guest(quiet=True)
    except GuestBuildError as exc:
        pytest.skip(f"no guest toolchain here: {exc}")
    assert _built_from_these_sources(kernel, True)
    copy = tmp_path / kernel.name
    copy.write_bytes(kernel.read_bytes() + b"\0")  # a kernel that does not match its stamp
    (tmp_path / (kernel.name + ".stamp")).write_bytes(kernel.with_name(kernel.name + ".stamp").read_bytes())
    assert not _built_from_these_sources(copy, True)
