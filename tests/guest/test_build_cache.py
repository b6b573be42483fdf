"""The guest build cache: a stat when nothing changed, the hash when something did.

Runs on a copy of guest/ (sources, built kernel, stamp) with cargo replaced
by a function that fails the test, so nothing here builds or touches the
real tree.
"""

from __future__ import annotations

import os
import shutil

import pytest

from vmm import guest_build


class CargoRan(Exception):
    pass


@pytest.fixture
def guest_copy(tmp_path, monkeypatch, vmm_kernel_path):
    src = guest_build.GUEST_DIR
    dst = tmp_path / "guest"
    for name in guest_build._SOURCE_FILES:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
    for d in guest_build._SOURCE_DIRS:
        shutil.copytree(src / d, dst / d)
    (dst / "target").mkdir()
    kernel = guest_build.default_kernel_path()
    shutil.copy2(kernel, dst / "target" / kernel.name)
    shutil.copy2(guest_build._stamp_path(kernel), dst / "target" / guest_build._stamp_path(kernel).name)
    old = 1_600_000_000_000_000_000  # long ago: no file is "racy"
    for p in dst.rglob("*"):
        os.utime(p, ns=(old, old))
    monkeypatch.setattr(guest_build, "GUEST_DIR", dst)

    def no_cargo(*_a, **_k):
        raise CargoRan()

    monkeypatch.setattr(guest_build, "_run_cargo", no_cargo)
    hashes = []
    real_hash = guest_build.source_hash
    monkeypatch.setattr(guest_build, "source_hash", lambda *a, **k: hashes.append(1) or real_hash(*a, **k))
    try:
        guest_build.find_toolchain()
    except guest_build.GuestBuildError as exc:
        pytest.skip(str(exc))
    return dst, hashes


def test_unchanged_sources_cost_a_stat_not_a_hash(guest_copy):
    dst, hashes = guest_copy
    kernel = guest_build.build_guest(quiet=True)  # copied stats differ: the hash decides, the stamp is refreshed
    assert kernel == dst / "target" / "kernel-release" and hashes
    n = len(hashes)
    assert guest_build.build_guest(quiet=True) == kernel
    assert len(hashes) == n  # the second check hashed nothing


def test_a_touched_file_is_hashed_once_and_not_rebuilt(guest_copy):
    dst, hashes = guest_copy
    guest_build.build_guest(quiet=True)
    n = len(hashes)
    main = dst / "src" / "main.rs"
    t = main.stat().st_mtime_ns + 10**9
    os.utime(main, ns=(t, t))
    guest_build.build_guest(quiet=True)  # no CargoRan: same content
    assert len(hashes) == n + 1
    guest_build.build_guest(quiet=True)
    assert len(hashes) == n + 1


def test_changed_content_rebuilds(guest_copy):
    dst, _ = guest_copy
    guest_build.build_guest(quiet=True)
    with open(dst / "src" / "main.rs", "a") as f:
        f.write("\n// changed\n")
    with pytest.raises(CargoRan):
        guest_build.build_guest(quiet=True)


def test_a_new_source_file_is_noticed(guest_copy):
    dst, _ = guest_copy
    guest_build.build_guest(quiet=True)
    (dst / "src" / "extra.rs").write_text("// new\n")
    with pytest.raises(CargoRan):
        guest_build.build_guest(quiet=True)


def test_a_replaced_kernel_is_noticed(guest_copy):
    dst, hashes = guest_copy
    guest_build.build_guest(quiet=True)
    kernel = dst / "target" / "kernel-release"
    data = bytearray(kernel.read_bytes())
    st = kernel.stat()
    data[-1] ^= 0xFF
    kernel.write_bytes(data)
    os.utime(kernel, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: ctime still moved
    with pytest.raises(CargoRan):
        guest_build.build_guest(quiet=True)


def test_recently_modified_files_never_match(guest_copy):
    dst, _ = guest_copy
    main = dst / "src" / "main.rs"
    main.touch()
    tc = guest_build.find_toolchain()
    m = guest_build._manifest(tc, dst / "target" / "kernel-release")
    assert m["files"]["src/main.rs"][1] == -1
    assert m["files"]["Cargo.toml"][1] > 0


def test_the_stamp_names_the_kernel_only_while_it_is_unchanged(guest_copy):
    import hashlib

    dst, _ = guest_copy
    kernel = guest_build.build_guest(quiet=True)
    assert guest_build.built_kernel_sha256(kernel) == hashlib.sha256(kernel.read_bytes()).hexdigest()
    st = kernel.stat()
    kernel.write_bytes(kernel.read_bytes())  # same bytes, rewritten: ctime moved
    os.utime(kernel, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert guest_build.built_kernel_sha256(kernel) is None
