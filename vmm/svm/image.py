"""Assemble the initramfs that boots Linux + KVM-SVM + this Python inside QEMU.

Two layers, concatenated into one initrd (the kernel unpacks both):

* the **base** layer, cached under ``~/.cache/pyvmm/svm`` keyed by a hash of
  its inputs: busybox, the three KVM modules of the Debian kernel package,
  /init, a copy of the running interpreter (binary, stdlib without its tests,
  lib-dynload), exactly the site-packages distributions the project's
  ``pyproject.toml`` asks for (runtime + ``test`` extra, with their
  dependencies), and every shared library ``ldd`` names for those binaries;
* the **project** layer, built for every run (a few MiB): the project tree as
  git sees it (tracked + untracked-not-ignored files, working-tree contents),
  its ``__pycache__`` and the built guest kernel, plus the command to run.

Host files keep their absolute paths inside, so the interpreter finds its
prefix exactly as on the host. Nothing here touches the network: the Linux
package was fetched and unpacked by ``setup.sh``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from .cpio import CpioWriter

# Bump when the layout of the base layer changes in a way its inputs do not show.
RECIPE_VERSION = 1

# Where setup.sh unpacks the kernel package and where images are cached.
def cache_dir() -> Path:
    base = os.environ.get("PYVMM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "pyvmm")
    return Path(base) / "svm"


LINUX_PACKAGE = "linux-image-cloud-amd64"
SETUP_HINT = "run ./setup.sh (it installs qemu-system-x86 and busybox-static and unpacks " + LINUX_PACKAGE + ")"

# The modules /dev/kvm needs on an AMD (SVM) CPU, in load order.
KVM_MODULES = ("virt/lib/irqbypass.ko", "arch/x86/kvm/kvm.ko", "arch/x86/kvm/kvm-amd.ko")

# Host tools the tests run (readelf reads snapshots, c++filt demangles, objdump checks
# the guest's code, the gdb stub's tests drive a real gdb: on VMX/SVM its `break`
# is a real int3 at CPL0), copied with their libraries when the host has them.
HOST_TOOLS = ("readelf", "c++filt", "objdump", "gdb")
# Data directories a tool cannot start without (gdb: its Python modules).
TOOL_DATA = {"gdb": ("/usr/share/gdb", "/etc/gdb")}

# Directory inside the image holding busybox, its applet links and the per-run command.
TOOLS = "/pyvmm"

# Stdlib parts no test imports: the stdlib's own test suites, GUI, and static build leftovers.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages",
                     "dist-packages", "__phello__"}
_STDLIB_SKIP_PREFIX = ("config-",)  # config-3.11-x86_64-linux-gnu: libpython.a and Makefile
# Extension modules only CPython's own tests or GUIs use (and the X11/Tcl libraries they would pull in).
_SKIP_EXTENSIONS = ("_test", "_tkinter", "xxlimited", "_ctypes_test", "_xxtestfuzz", "_xxsubinterpreters")
# Inside site-packages: the distributions' own test suites and type stubs (numpy: ~20 MiB of them).
_SITE_SKIP_DIRS = {"tests", "test"}
_SITE_SKIP_SUFFIX = (".pyi",)


class SvmError(RuntimeError):
    """The SVM image cannot be assembled or booted here (one-line reason)."""


# --- inputs --------------------------------------------------------------------------
@dataclass(frozen=True)
class LinuxKernel:
    release: str
    vmlinuz: Path
    modules: tuple[Path, ...]


def _version_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_linux(root: Path | None = None) -> LinuxKernel:
    """The newest kernel that setup.sh unpacked under cache_dir()/linux/<package>/."""
    root = root or cache_dir() / "linux"
    candidates = sorted(root.glob("*/boot/vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not candidates:
        raise SvmError(f"no unpacked {LINUX_PACKAGE} under {root}: {SETUP_HINT}")
    vmlinuz = candidates[-1]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    moddir = vmlinuz.parent.parent / "lib" / "modules" / release / "kernel"
    modules = []
    for rel in KVM_MODULES:
        found = [p for p in (moddir / rel, moddir / (rel + ".xz")) if p.is_file()]
        if not found:
            raise SvmError(f"kernel package {vmlinuz.parent.parent.name} has no {rel}: {SETUP_HINT}")
        modules.append(found[0])
    return LinuxKernel(release, vmlinuz, tuple(modules))


def find_busybox() -> Path:
    for cand in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and os.path.isfile(cand):
            return Path(cand)
    raise SvmError(f"busybox is not installed: {SETUP_HINT}")


def _ldd(paths: list[str]) -> set[str]:
    """Every shared library (and the dynamic loader) the given ELF files need."""
    libs: set[str] = set()
    for i in range(0, len(paths), 64):
        proc = subprocess.run(["ldd", *paths[i : i + 64]], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _project_requirements(project: Path) -> list[str]:
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    reqs = list(meta.get("dependencies", []))
    for extra in ("test",):
        reqs += meta.get("optional-dependencies", {}).get(extra, [])
    return reqs


def python_distributions(requirements: list[str]) -> list:
    """The installed distributions these requirements need, dependencies included."""
    todo = [(Requirement(r), "") for r in requirements]
    seen: dict[str, object] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SvmError(f"Python package {req.name} is not installed: {SETUP_HINT}") from None
        seen[key] = dist
        for sub in dist.requires or []:
            r = Requirement(sub)
            extras = req.extras or {""}
            for e in extras:
                todo.append((r, e))
    return [seen[k] for k in sorted(seen)]


# --- the file list --------------------------------------------------------------------
@dataclass
class Entry:
    kind: str  # "dir" | "file" | "link"
    src: str | None = None
    data: bytes | None = None
    target: str = ""
    mode: int = 0o644
    mtime: int = 0


@dataclass
class Manifest:
    """What goes into one cpio layer, path -> Entry; hashable without reading big files."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def data(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[name] = Entry("file", data=data, mode=mode)

    def link(self, name: str, target: str) -> None:
        self.entries[name] = Entry("link", target=target)

    def host_path(self, path: str) -> None:
        """Add a host file at the same path, with every symlink on the way to it."""
        path = os.path.normpath(os.path.abspath(path))
        if path == "/" or path in self.entries:
            return
        parent, name = os.path.split(path)
        real_parent = os.path.realpath(parent)
        if real_parent != parent:
            # A symlinked ancestor (e.g. /lib64 -> usr/lib64): recreate it and store under the real one.
            cur = "/"
            for comp in parent.strip("/").split("/"):
                nxt = os.path.join(cur, comp)
                if os.path.islink(nxt) and nxt not in self.entries:
                    self.entries[nxt] = Entry("link", target=os.readlink(nxt))
                cur = os.path.realpath(nxt)
            self.host_path(os.path.join(real_parent, name))
            return
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            self.entries[path] = Entry("link", target=target)
            self.host_path(os.path.join(parent, target))
        elif stat.S_ISREG(st.st_mode):
            self.entries[path] = Entry("file", src=path, mode=stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime))
        elif stat.S_ISDIR(st.st_mode):
            self.entries[path] = Entry("dir", mode=stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(f"{name}\0{e.kind}\0{e.mode:o}\0{e.mtime}\0{e.target}\0".encode())
            if e.src is not None:
                st = os.stat(e.src)
                h.update(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}\0".encode())
            if e.data is not None:
                h.update(hashlib.sha256(e.data).digest())
        return h.hexdigest()

    def write(self, out) -> int:
        """Write the layer as one cpio archive; returns the bytes of file content."""
        w = CpioWriter(out)
        total = 0
        for name in sorted(self.entries):
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                w.directory("/".join(parts[:i]))
            e = self.entries[name]
            if e.kind == "dir":
                w.directory(name, e.mode, e.mtime)
            elif e.kind == "link":
                w.symlink(name, e.target)
            else:
                data = e.data if e.data is not None else _read_host_file(e.src)
                total += len(data)
                w.file(name, data, e.mode, e.mtime)
        w.close()
        return total


def _read_host_file(path: str) -> bytes:
    data = Path(path).read_bytes()
    if path.endswith(".ko.xz"):
        data = lzma.decompress(data)
    return data


def _add_tree(m: Manifest, root: str, skip_dirs: set[str] = frozenset(), skip_prefix: tuple[str, ...] = ()) -> list[str]:
    """Add a directory tree; returns the shared objects in it (for ldd)."""
    tag = sys.implementation.cache_tag
    shared = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(skip_prefix)]
        for fn in filenames:
            if fn.startswith(_SKIP_EXTENSIONS) and ".so" in fn:
                continue
            if fn.endswith(".pyc") and not fn.endswith(f".{tag}.pyc"):
                continue  # optimized (.opt-1/.opt-2) or other interpreters' bytecode
            p = os.path.join(dirpath, fn)
            m.host_path(p)
            if ".so" in fn and os.path.isfile(p) and not os.path.islink(p):
                shared.append(p)
    return shared


# --- the base layer --------------------------------------------------------------------
INIT = r"""#!/pyvmm/bin/sh
# PID 1 inside the QEMU guest: mount what Python and KVM need, load KVM-SVM,
# run /pyvmm/cmd.sh (written per run) and report its exit code on the console.
export PATH=/pyvmm/bin
busybox mkdir -p /proc /sys /dev /tmp /run /root /var/tmp
busybox mount -t proc proc /proc
busybox --install -s /pyvmm/bin
busybox mkdir -p /bin && busybox ln -sf /pyvmm/bin/busybox /bin/sh   # subprocess(shell=True) needs /bin/sh
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts
chmod 1777 /tmp /var/tmp
stty -F /dev/console -onlcr 2>/dev/null
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up   # gdb stub tests talk TCP on loopback
for m in /pyvmm/modules/*.ko; do insmod "$m" || echo "pyvmm-svm: insmod $m failed"; done
. /pyvmm/run.env
echo "$PYVMM_START"
sh /pyvmm/cmd.sh </dev/null
echo "$PYVMM_EXIT $?"
sync
poweroff -f
"""

ETC_FILES = {
    "/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "/etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "/etc/hosts": b"127.0.0.1 localhost\n",
    "/etc/hostname": b"pyvmm-svm\n",
}


@dataclass
class BaseLayer:
    manifest: Manifest
    linux: LinuxKernel
    fingerprint: str


def base_manifest(project: Path) -> BaseLayer:
    linux = find_linux()
    busybox = find_busybox()
    m = Manifest()
    m.entries[f"{TOOLS}/bin/busybox"] = Entry("file", src=str(busybox), mode=0o755, mtime=int(busybox.stat().st_mtime))
    m.link(f"{TOOLS}/bin/sh", "busybox")
    elves_extra = [str(busybox)]  # busybox-static needs nothing; a dynamic one gets its libraries
    for tool in HOST_TOOLS:
        path = shutil.which(tool)
        if path:
            m.host_path(path)
            elves_extra.append(os.path.realpath(path))
            for d in TOOL_DATA.get(tool, ()):
                if os.path.isdir(d):
                    _add_tree(m, d)
    m.data("/init", INIT.encode(), 0o755)
    for i, mod in enumerate(linux.modules):
        m.entries[f"{TOOLS}/modules/{i}-{mod.name.removesuffix('.xz')}"] = Entry("file", src=str(mod), mtime=int(mod.stat().st_mtime))
    for name, data in ETC_FILES.items():
        m.data(name, data)
    for p in ("/etc/ld.so.cache", "/etc/ld.so.conf"):
        if os.path.exists(p):
            m.host_path(p)
    # The interpreter, at the path it runs from (its prefix is derived from it).
    exe = os.path.abspath(sys.executable)
    m.host_path(exe)
    elves = [os.path.realpath(exe), *elves_extra]
    paths = sysconfig.get_paths()
    stdlib, platstdlib = paths["stdlib"], paths["platstdlib"]
    for root in dict.fromkeys((stdlib, platstdlib)):
        elves += _add_tree(m, root, _STDLIB_SKIP_DIRS, _STDLIB_SKIP_PREFIX)
    # Exactly the distributions the project needs (and theirs).
    for dist in python_distributions(_project_requirements(project)):
        for f in dist.files or []:
            p = os.path.abspath(str(dist.locate_file(f)))
            if not os.path.isfile(p) or f.parts[0] == ".." or p.endswith(_SITE_SKIP_SUFFIX):
                continue  # console scripts live outside site-packages (../../bin): not needed
            if _SITE_SKIP_DIRS.intersection(f.parts[:-1]):
                continue
            if p.endswith(".pyc") and not p.endswith(f".{sys.implementation.cache_tag}.pyc"):
                continue
            m.host_path(p)
            if ".so" in os.path.basename(p):
                elves.append(p)
        # __pycache__ that pip did not record (compiled on first import)
        for f in dist.files or []:
            if str(f).endswith(".py") and not _SITE_SKIP_DIRS.intersection(f.parts[:-1]):
                src = Path(dist.locate_file(f))
                pyc = src.parent / "__pycache__" / f"{src.stem}.{sys.implementation.cache_tag}.pyc"
                if pyc.is_file():
                    m.host_path(str(pyc))
    for lib in sorted(_ldd(elves)):
        m.host_path(lib)
        # A tool embedding another Python (Debian's gdb links libpython3.x) dies at
        # start without that Python's stdlib: add it, without tests, like ours.
        embedded = re.match(r"libpython(\d+\.\d+)\.so", os.path.basename(lib))
        if embedded and lib != os.path.realpath(exe):
            home = f"/usr/lib/python{embedded.group(1)}"
            if os.path.isdir(home) and not os.path.realpath(home).startswith(os.path.realpath(stdlib)):
                for so in _add_tree(m, home, _STDLIB_SKIP_DIRS, _STDLIB_SKIP_PREFIX):
                    m.host_path(so)
    for extra in ("libgcc_s.so.1",):  # dlopen()ed by glibc for thread cancellation, unseen by ldd
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
            if os.path.exists(os.path.join(d, extra)):
                m.host_path(os.path.join(d, extra))
                break
    # `python3` and `python` on PATH inside, whatever the host's binary is called.
    bindir = f"{TOOLS}/python-bin"
    for name in ("python3", "python"):
        m.link(f"{bindir}/{name}", exe)
    h = hashlib.sha256(f"recipe={RECIPE_VERSION}\n".encode())
    h.update(m.fingerprint().encode())
    return BaseLayer(m, linux, h.hexdigest()[:16])


def _compress(raw_path: Path, out_path: Path, level: int) -> None:
    with open(raw_path, "rb") as src, gzip.open(out_path, "wb", compresslevel=level) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@dataclass
class BuiltImage:
    path: Path
    fingerprint: str
    linux: LinuxKernel
    cached: bool
    seconds: float
    size: int
    content: int


def build_base(project: Path, *, force: bool = False, log=None) -> BuiltImage:
    """The base layer's cpio (cached by fingerprint); builds it when missing."""
    t0 = time.monotonic()
    layer = base_manifest(project)
    d = cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"base-{layer.fingerprint}.cpio"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        return BuiltImage(path, layer.fingerprint, layer.linux, True, time.monotonic() - t0, path.stat().st_size, meta["content"])
    if log:
        log(f"building the SVM base image ({len(layer.manifest.entries)} entries) -> {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        content = layer.manifest.write(out)
    os.replace(tmp, path)
    meta_path.write_text(json.dumps({"content": content, "entries": len(layer.manifest.entries),
                                     "linux": layer.linux.release, "python": sys.version.split()[0]}) + "\n")
    for old in d.glob("base-*.cpio"):  # one base image at a time: they are big
        if old != path:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return BuiltImage(path, layer.fingerprint, layer.linux, False, time.monotonic() - t0, path.stat().st_size, content)


# --- the project layer ----------------------------------------------------------------------
def project_files(project: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files, as in the working tree."""
    try:
        out = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for dirpath, dirnames, filenames in os.walk(project):
            dirnames[:] = [d for d in dirnames if d not in {".git", "target", "__pycache__", ".pytest_cache", ".hypothesis"}]
            names += [os.path.relpath(os.path.join(dirpath, f), project) for f in filenames]
    return [n for n in names if (project / n).is_file()]


def project_manifest(project: Path, guest_kernels: list[Path], cmd_sh: str, run_env: str) -> Manifest:
    m = Manifest()
    tag = sys.implementation.cache_tag
    project = project.resolve()
    for rel in project_files(project):
        p = project / rel
        m.host_path(str(p))
        if p.suffix == ".py":
            pyc = p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc"
            if pyc.is_file():
                m.host_path(str(pyc))
    for k in guest_kernels:
        for p in (k, k.with_name(k.name + ".stamp")):
            if p.is_file():
                m.host_path(str(p.resolve()))
    m.data(f"{TOOLS}/cmd.sh", cmd_sh.encode(), 0o755)
    m.data(f"{TOOLS}/run.env", run_env.encode())
    return m
