"""The fast start path: what a plain boot does not pay for, and the kernel cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import boot as boot_mod
from vmm.elf import load_kernel_file
from vmm.kernel_cache import KernelCache, cache_path, load_cached_kernel

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("numpy", "rich", "elftools")
#: The part of mm a plain run may load: guest RAM *is* mm's BufferMemory (its
#: byte access needs nothing more; numpy comes with the first table read).
MM_LIGHT = {"mm", "mm.errors", "mm.levels", "mm.addr", "mm.physmem"}


def _heavy(modules: set[str]) -> list[str]:
    """The heavy packages among ``modules`` (full names), and any of mm beyond its light part."""
    tops = {m.split(".")[0] for m in modules}
    return sorted((tops & set(HEAVY)) | ({m for m in modules if m.split(".")[0] == "mm"} - MM_LIGHT))


def test_symbols_are_read_on_first_use(guest_kernel_path):
    image = load_kernel_file(guest_kernel_path)
    assert not image.symbols_loaded
    sym = image.symbolizer(0x200000)
    assert not image.symbols_loaded  # a symbolizer alone reads nothing
    name = sym.lookup(image.entry + 0x200000)
    assert image.symbols_loaded and name and not name.startswith("0x")
    assert any(s.addr == image.entry for s in image.symbols)


@pytest.fixture
def kernel_copy(tmp_path, guest_kernel_path):
    path = tmp_path / "kernel"
    shutil.copy(guest_kernel_path, path)
    boot_mod._PLANS.clear()  # this process's plans would hide the file's
    yield path
    boot_mod._PLANS.clear()


def test_cache_round_trip(kernel_copy):
    first = load_cached_kernel(kernel_copy)
    assert not first.cache.loaded and not cache_path(kernel_copy).exists()
    symbols = first.symbols  # read from .symtab, stored
    plan = boot_mod.boot_plan(first, 128 << 20, False)  # built, stored
    assert cache_path(kernel_copy).exists()
    boot_mod._PLANS.clear()

    again = load_cached_kernel(kernel_copy)
    assert again.cache.loaded
    assert again.symbols == symbols
    segs = boot_mod.plan_key(again, 128 << 20, False)[2]
    cached = again.cache.boot_plan(128 << 20, False, segs)
    assert cached == plan
    assert again.cache.boot_plan(256 << 20, False, segs) is None  # another RAM size is another plan
    other = tuple((v + 0x1000, p, m, f) for v, p, m, f in segs)
    assert again.cache.boot_plan(128 << 20, False, other) is None  # made for other segments: not used


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other-kernel"])
def test_a_damaged_cache_is_ignored_and_rebuilt(kernel_copy, damage):
    image = load_cached_kernel(kernel_copy)
    symbols = image.symbols
    plan = boot_mod.boot_plan(image, 128 << 20, False)
    boot_mod._PLANS.clear()
    path = cache_path(kernel_copy)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[-10] ^= 0x01  # still valid JSON, most likely: the CRC catches it
    elif damage == "garbage":
        raw = bytearray(os.urandom(300))
    else:
        header, _, body = bytes(raw).partition(b"\n")
        h = json.loads(header)
        h["kernel_sha256"] = "0" * 64
        raw = bytearray(json.dumps(h).encode() + b"\n" + body)
    path.write_bytes(raw)

    fresh = load_cached_kernel(kernel_copy)
    assert not fresh.cache.loaded
    assert fresh.symbols == symbols
    assert boot_mod.boot_plan(fresh, 128 << 20, False) == plan
    assert load_cached_kernel(kernel_copy).cache.loaded  # rewritten whole


def test_an_unwritable_directory_only_means_no_cache(kernel_copy, monkeypatch):
    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    image = load_cached_kernel(kernel_copy)
    assert image.symbols and boot_mod.boot_plan(image, 128 << 20, False).tables is not None
    assert not cache_path(kernel_copy).exists()


def test_cache_is_keyed_by_content(kernel_copy):
    load_cached_kernel(kernel_copy).symbols
    data = bytearray(kernel_copy.read_bytes())
    data[-1] ^= 0xFF  # same path, other content
    assert not KernelCache.open(kernel_copy, bytes(data)).loaded


def _imports_of(args: list[str], tmp_path) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules a fresh `python3 vmm.py ARGS` has imported when it ends."""
    probe = tmp_path / "probe.py"
    out = tmp_path / "modules.json"
    probe.write_text(
        "import atexit, json, runpy, sys\n"
        f"atexit.register(lambda: json.dump(sorted(sys.modules), open({str(out)!r}, 'w')))\n"
        f"sys.argv = [{str(REPO / 'vmm.py')!r}] + {args!r}\n"
        f"runpy.run_path({str(REPO / 'vmm.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stderr[-2000:]
    return set(json.loads(out.read_text())), proc


@pytest.mark.kvm
def test_plain_run_imports_no_numpy_rich_or_pyelftools(tmp_path, guest_kernel_path):
    """`vmm run --quiet` boots through the light path: the guard that keeps it so."""
    subprocess.run([sys.executable, str(REPO / "vmm.py"), "run", "--quiet"], env={**os.environ, "PYTHONPATH": str(REPO)},
                   capture_output=True, timeout=120)  # first run after a build fills the kernel's cache
    modules, proc = _imports_of(["run", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _heavy(modules), _heavy(modules)


@pytest.mark.kvm
def test_kernel_option_naming_the_built_guest_is_as_light(tmp_path, guest_kernel_path):
    """`vmm run --kernel <the built guest>` (what scripts and tests pass) uses
    the kernel's cache as a run without --kernel does: no boot plan built."""
    subprocess.run([sys.executable, str(REPO / "vmm.py"), "run", "--quiet"], env={**os.environ, "PYTHONPATH": str(REPO)},
                   capture_output=True, timeout=120)  # the plan for 128 MiB is cached now
    modules, proc = _imports_of(["run", "--quiet", "--kernel", str(guest_kernel_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _heavy(modules), _heavy(modules)


@pytest.mark.kvm
def test_save_and_restore_runs_import_no_numpy_rich_or_pyelftools(tmp_path, guest_kernel_path):
    """`vmm run --save` and `--restore` take the light path too: the inspector
    and the gdb stub are imported only when their options ask for them."""
    snap = tmp_path / "g.core"
    subprocess.run([sys.executable, str(REPO / "vmm.py"), "run", "--quiet", "--kernel", str(guest_kernel_path)],
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120)  # the plan is cached now
    modules, proc = _imports_of(["run", "--quiet", "--kernel", str(guest_kernel_path), "--save", str(snap)], tmp_path)
    assert proc.returncode == 0 and snap.exists(), proc.stderr[-2000:]
    heavy = {m.split(".")[0] for m in modules} & set(HEAVY)  # mm's memory map model is light (no numpy)
    assert not heavy, sorted(heavy)
    modules, proc = _imports_of(["run", "--quiet", "--kernel", str(guest_kernel_path), "--restore", str(snap)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy = {m.split(".")[0] for m in modules} & set(HEAVY)
    assert not heavy, sorted(heavy)


@pytest.mark.kvm
def test_memmap_json_imports_no_numpy(tmp_path, guest_kernel_path):
    """`vmm memmap --json` reads the memory map from the kernel's cached boot plan."""
    subprocess.run([sys.executable, str(REPO / "vmm.py"), "run", "--quiet"], env={**os.environ, "PYTHONPATH": str(REPO)},
                   capture_output=True, timeout=120)  # the plan for 128 MiB is cached now
    modules, proc = _imports_of(["memmap", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["ram_size"] == 128 << 20
    heavy = {m.split(".")[0] for m in modules} & set(HEAVY)
    assert not heavy, sorted(heavy)


def test_bad_input_imports_nothing_heavy(tmp_path):
    modules, proc = _imports_of(["run", "--memory", "3M"], tmp_path)
    assert proc.returncode == 2 and "error" in proc.stderr
    assert not _heavy(modules), _heavy(modules)


@pytest.mark.parametrize("edit", ["frame-outside-pool", "index-past-table", "boot-not-a-dict", "symbols-not-a-list"])
def test_a_consistent_looking_but_wrong_cache_is_not_used(kernel_copy, edit):
    """CRC right, content wrong (a bug or a hand edit): checked, ignored, rebuilt."""
    import zlib

    image = load_cached_kernel(kernel_copy)
    symbols = image.symbols
    plan = boot_mod.boot_plan(image, 128 << 20, False)
    boot_mod._PLANS.clear()
    path = cache_path(kernel_copy)
    header, _, body = path.read_bytes().partition(b"\n")
    payload = json.loads(body)
    tables = payload["boot"][f"{128 << 20}:0"]["tables"]
    if edit == "frame-outside-pool":
        tables["tables"][0][0] = 0
    elif edit == "index-past-table":
        tables["index_bits"] = 10  # 1024 entries: past the end of a 4 KiB table
    elif edit == "boot-not-a-dict":
        payload["boot"] = []
    else:
        payload["symbols"] = 7
    body = json.dumps(payload).encode()
    h = json.loads(header)
    h["crc32"] = zlib.crc32(body)
    path.write_bytes(json.dumps(h).encode() + b"\n" + body)

    again = load_cached_kernel(kernel_copy)
    assert again.cache.loaded  # the file itself is intact
    assert again.symbols == symbols
    assert boot_mod.boot_plan(again, 128 << 20, False) == plan
