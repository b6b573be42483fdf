"""Build the guest kernel (guest/) with whichever Rust toolchain can do it here.

Two toolchains are supported (see shared/HOST.md for why):

* Debian's own Rust (``apt-get install cargo-web rustc-web rust-web-src``):
  ``/usr/bin/cargo`` + ``/usr/bin/rustc`` + library source in
  ``/usr/lib/rustlib/src/rust/library``. ``core``/``alloc`` are rebuilt for
  ``x86_64-unknown-none`` with ``-Z build-std`` (``RUSTC_BOOTSTRAP=1``), and
  cargo's crates-io source is pointed at the library's vendored crates, so
  the build is fully offline.
* rustup stable with ``rustup target add x86_64-unknown-none`` (prebuilt
  no-SSE ``core``/``alloc``; no build-std).

The kernel is linked by GNU ld as a static PIE at 0xFFFFFFFF80000000. GNU ld
marks a PIE whose first segment is not at address 0 as ET_EXEC even though it
keeps ``_DYNAMIC``, ``DF_1_PIE`` and the ``R_X86_64_RELATIVE`` entries, so
after linking the e_type is set back to ET_DYN (``vmm.elf.mark_pie``); the host
only applies a KASLR slide to ET_DYN images.

The result is copied to ``guest/target/kernel-<profile>`` with a stamp file
next to it recording a hash of the guest sources and the toolchain; cargo is
not run again while that hash matches. The stamp also keeps a manifest: the
size and mtime of every source file, the compiler's identity and the
kernel's own stat. While all of those are unchanged the check is a few dozen
stat calls (about 1 ms, against reading and hashing every source); when
anything differs, the hash decides, and a rebuild happens only if the
content changed (a touched file just refreshes the manifest).

Usage: ``python -m vmm.guest_build [--debug] [--force] [--quiet]`` prints the
kernel path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# subprocess is imported by the two functions that start processes (rustup,
# cargo), hashlib by _sha256: the check that the kernel is current, on every
# run, starts no process and hashes nothing.


def _sha256(data: bytes = b""):
    import hashlib  # OpenSSL: 2.5 ms to import, fast on the 4 MB kernel (the builtin _sha256 takes 40 ms)

    return hashlib.sha256(data)


from .elf import KernelImageError, mark_pie
from .errors import HostError

REPO_ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO_ROOT / "guest"
TARGET = "x86_64-unknown-none"

# Debian's toolchain layout (packages cargo-web, rustc-web, rust-web-src).
DEBIAN_CARGO = Path("/usr/bin/cargo")
DEBIAN_RUSTC = Path("/usr/bin/rustc")
DEBIAN_LIBRARY_SRC = Path("/usr/lib/rustlib/src/rust/library")

INSTALL_HINT = (
    "no Rust toolchain can build the guest kernel: install Debian's "
    "(apt-get install cargo-web rustc-web rust-web-src) or run "
    "`rustup target add x86_64-unknown-none`"
)

# Bump when the build recipe below changes in a way that changes the output.
RECIPE_VERSION = 1

# Files whose content determines the kernel (relative to guest/).
_SOURCE_FILES = ("Cargo.toml", "Cargo.lock", ".cargo/config.toml", "linker.ld", "build.rs")
_SOURCE_DIRS = ("src",)

# Environment variables that would silently change what cargo builds.
_SCRUBBED_ENV = (
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTUP_TOOLCHAIN",
)

class GuestBuildError(HostError, RuntimeError):
    """The guest kernel could not be built (message says why, in one line or a cargo tail)."""


@dataclass(frozen=True)
class Toolchain:
    kind: str  # "debian" or "rustup"
    cargo: Path
    rustc: Path
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)

    def identity(self) -> str:
        """Changes whenever the compiler binary changes (path, size, mtime)."""
        st = self.rustc.stat()
        return f"{self.kind}:{self.rustc}:{st.st_size}:{st.st_mtime_ns}"


def _debian_toolchain() -> Toolchain | None:
    vendor = DEBIAN_LIBRARY_SRC / "vendor"
    if not (DEBIAN_CARGO.is_file() and DEBIAN_RUSTC.is_file() and (DEBIAN_LIBRARY_SRC / "core").is_dir()):
        return None
    args = [
        "-Z", "build-std=core,alloc",
        "-Z", "build-std-features=compiler-builtins-mem",
    ]
    if vendor.is_dir():
        # The library's own dependencies (compiler_builtins, ...) come from
        # its vendored copies: no crate registry is reachable.
        args += [
            "--config", 'source.crates-io.replace-with="rust-library-vendor"',
            "--config", f'source.rust-library-vendor.directory="{vendor}"',
        ]
    return Toolchain("debian", DEBIAN_CARGO, DEBIAN_RUSTC, tuple(args), {"RUSTC_BOOTSTRAP": "1"})


def _rustup_toolchain() -> Toolchain | None:
    import subprocess

    rustup = shutil.which("rustup") or str(Path.home() / ".cargo" / "bin" / "rustup")
    if not Path(rustup).is_file():
        return None
    try:
        # Resolve the proxies to the real binaries of the active toolchain.
        cargo = subprocess.run([rustup, "which", "cargo"], capture_output=True, text=True, check=True).stdout.strip()
        rustc = subprocess.run([rustup, "which", "rustc"], capture_output=True, text=True, check=True).stdout.strip()
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    if not (Path(sysroot) / "lib" / "rustlib" / TARGET / "lib").is_dir():
        return None
    return Toolchain("rustup", Path(cargo), Path(rustc))


def find_toolchain() -> Toolchain:
    """Debian's toolchain if installed, else rustup with the target; else GuestBuildError."""
    tc = _debian_toolchain() or _rustup_toolchain()
    if tc is None:
        raise GuestBuildError(INSTALL_HINT)
    return tc


def default_kernel_path(release: bool = True) -> Path:
    """Where build_guest() puts the kernel ELF."""
    return GUEST_DIR / "target" / f"kernel-{'release' if release else 'debug'}"


def _source_files() -> list[Path]:
    files = [GUEST_DIR / f for f in _SOURCE_FILES]
    for d in _SOURCE_DIRS:
        files += sorted(p for p in (GUEST_DIR / d).rglob("*") if p.is_file())
    return [p for p in files if p.is_file()]


def source_hash(toolchain: Toolchain | None = None, release: bool = True) -> str:
    """SHA-256 over the guest sources, the build recipe and the toolchain."""
    h = _sha256()
    h.update(f"recipe={RECIPE_VERSION} release={release}\n".encode())
    if toolchain is not None:
        h.update(f"toolchain={toolchain.identity()}\n".encode())
    for path in _source_files():
        h.update(f"{path.relative_to(GUEST_DIR).as_posix()}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _stamp_path(kernel: Path) -> Path:
    return kernel.with_name(kernel.name + ".stamp")


def _read_stamp(kernel: Path) -> dict:
    try:
        stamp = json.loads(_stamp_path(kernel).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _is_current(kernel: Path, digest: str) -> bool:
    stamp = _read_stamp(kernel)
    try:
        return stamp.get("sources") == digest and stamp.get("kernel_sha256") == _sha256(kernel.read_bytes()).hexdigest()
    except OSError:
        return False


def _built_from_these_sources(kernel: Path, release: bool) -> bool:
    """The kernel's stamp says it was built from the current sources (any toolchain)."""
    try:
        stamp = json.loads(_stamp_path(kernel).read_text())
        return stamp.get("sources_only") == source_hash(None, release) and \
            stamp.get("kernel_sha256") == _sha256(kernel.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return False


# --- the stat manifest: "nothing changed" for the price of a few stat calls ----------------
def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _rustup_selection() -> list:
    """What picks rustup's active toolchain besides the project's files."""
    settings = Path(os.environ.get("RUSTUP_HOME", Path.home() / ".rustup")) / "settings.toml"
    try:
        st = _stat_key(settings)
    except OSError:
        st = None
    return [os.environ.get("RUSTUP_TOOLCHAIN"), st]


def _file_stats(kernel: Path) -> dict:
    files = {p.relative_to(GUEST_DIR).as_posix(): _stat_key(p) for p in _source_files()}
    for extra in ("rust-toolchain", "rust-toolchain.toml"):  # rustup reads these
        if (GUEST_DIR / extra).is_file():
            files[extra] = _stat_key(GUEST_DIR / extra)
    return {"files": files, "kernel": _kernel_stat(kernel.stat())}


def _kernel_stat(st) -> list[int]:
    # ctime and inode too: a copy over the kernel that keeps the old mtime still shows.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


_RACY_NS = 2_000_000_000


def _manifest(tc: Toolchain, kernel: Path) -> dict:
    """Stats of everything the build depends on, and of its output.

    A file modified within the last 2 s is recorded as never matching: a
    second edit inside the same timestamp tick with the same size would
    otherwise look unchanged (git's "racy clean" problem). The next check
    hashes, and records it once it is old enough.
    """
    stats = _file_stats(kernel)
    now = time.time_ns()
    for key, (size, mtime) in stats["files"].items():
        if now - mtime < _RACY_NS:
            stats["files"][key] = [size, -1]
    return {
        **stats,
        "toolchain": tc.identity(),
        "rustc": str(tc.rustc),
        "rustup": _rustup_selection() if tc.kind == "rustup" else None,
    }


def _unchanged(kernel: Path, stamp: dict) -> bool:
    """True if no source, compiler or kernel stat differs from the stamp's manifest.
    Reads no file but the stamp; any doubt returns False and the hash decides."""
    m = stamp.get("manifest")
    if not isinstance(m, dict):
        return False
    try:
        debian = _debian_toolchain()
        if stamp.get("toolchain") == "debian":
            if debian is None or debian.identity() != m["toolchain"]:
                return False
        else:
            # rustup: Debian's toolchain would win if it had appeared since; the
            # same compiler binary and the same toolchain selection, without
            # running `rustup which` (a subprocess per call).
            rustc = Path(m["rustc"])
            if debian is not None or Toolchain("rustup", rustc, rustc).identity() != m["toolchain"]:
                return False
            if m.get("rustup") != _rustup_selection():
                return False
        now = _file_stats(kernel)
        return now["files"] == m["files"] and now["kernel"] == m["kernel"]
    except (OSError, KeyError, TypeError, ValueError):
        return False


def built_kernel_sha256(kernel: Path) -> str | None:
    """The SHA-256 the stamp recorded for ``kernel``, if the file is still the
    one it was recorded for (same size, mtime, ctime and inode): the kernel's
    identity without reading it (it carries debug info: megabytes to hash)."""
    stamp = _read_stamp(kernel)
    try:
        st = kernel.stat()
        recorded = stamp["manifest"]["kernel"]
        digest = stamp["kernel_sha256"]
    except (OSError, KeyError, TypeError):
        return None
    if recorded != _kernel_stat(st) or not isinstance(digest, str):
        return None
    return digest


def _write_stamp(kernel: Path, stamp: dict) -> None:
    tmp = kernel.with_name(f".{kernel.name}.{os.getpid()}.stamp.tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    os.replace(tmp, _stamp_path(kernel))


def _mark_pie(image: bytearray) -> bool:
    """``vmm.elf.mark_pie`` on cargo's output, its errors as build errors."""
    try:
        return mark_pie(image)
    except KernelImageError as exc:
        raise GuestBuildError(f"cargo output is not a usable kernel ELF: {exc}") from None


def _run_cargo(tc: Toolchain, release: bool, progress=None) -> Path:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(tc.extra_env)
    env["RUSTC"] = str(tc.rustc)
    # The toolchain's own bin dir first, so nothing resolves to rustup proxies.
    env["PATH"] = f"{tc.rustc.parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(tc.cargo), "build", "--offline", "--target", TARGET, *tc.extra_args]
    if release:
        cmd.append("--release")
    try:
        # cargo reports each crate it compiles on stderr: read it as it comes
        # so the user sees progress (the first build compiles core and alloc).
        proc = subprocess.Popen(cmd, cwd=GUEST_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise GuestBuildError(f"cannot run {tc.cargo}: {e}") from e
    lines: list[str] = []
    with proc:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if progress is not None and line.lstrip().startswith(("Compiling", "Finished")):
                progress(line.strip())
    if proc.returncode != 0:
        tail = "\n".join(lines[-40:])
        raise GuestBuildError(f"cargo build of the guest kernel failed ({tc.kind} toolchain, exit {proc.returncode}):\n{tail}")
    out = GUEST_DIR / "target" / TARGET / ("release" if release else "debug") / "kernel"
    if not out.is_file():
        raise GuestBuildError(f"cargo succeeded but {out} is missing")
    return out


def build_guest(release: bool = True, force: bool = False, quiet: bool = False) -> Path:
    """Build the guest kernel if its sources changed; return the ELF's path."""
    kernel = default_kernel_path(release)
    stamp = _read_stamp(kernel)
    if not force and _unchanged(kernel, stamp):
        return kernel
    try:
        tc = find_toolchain()
    except GuestBuildError:
        # No compiler here (e.g. inside the SVM test VM, vmm/svm): a kernel built
        # elsewhere from exactly these sources will do.
        if not force and _built_from_these_sources(kernel, release):
            return kernel
        raise
    digest = source_hash(tc, release)
    try:
        before = kernel.stat()
    except OSError:
        before = None
    if not force and _is_current(kernel, digest):
        # Same content, new stats (a touch, a checkout): the next check is a stat
        # again. A stamp from before the toolchain-independent hash gets it too.
        refreshed = {**stamp, "manifest": _manifest(tc, kernel)}
        if "sources_only" not in refreshed:
            refreshed["sources_only"] = source_hash(None, release)
        # Only if the kernel hashed is the kernel stat'ed (no build replaced it in
        # between): the manifest vouches for the stamp's digest of this very file.
        if before is not None and refreshed["manifest"]["kernel"] == _kernel_stat(before):
            try:
                _write_stamp(kernel, refreshed)
            except OSError:
                pass
        return kernel
    progress = None
    if not quiet:
        print(f"building guest kernel (cargo, {tc.kind} toolchain, first build ~40 s)...", file=sys.stderr, flush=True)
        t0 = time.monotonic()

        def progress(line: str) -> None:
            print(f"  [{time.monotonic() - t0:4.0f} s] {line}", file=sys.stderr, flush=True)

    image = bytearray(_run_cargo(tc, release, progress).read_bytes())
    _mark_pie(image)
    kernel.parent.mkdir(parents=True, exist_ok=True)
    tmp = kernel.with_name(f".{kernel.name}.{os.getpid()}.tmp")
    tmp.write_bytes(image)
    tmp.chmod(0o755)
    os.replace(tmp, kernel)
    stamp = {"sources": digest, "kernel_sha256": _sha256(image).hexdigest(), "toolchain": tc.kind,
             "sources_only": source_hash(None, release)}
    _write_stamp(kernel, {**stamp, "manifest": _manifest(tc, kernel)})
    return kernel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.guest_build", description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="debug profile instead of release")
    ap.add_argument("--force", action="store_true", help="run cargo even if the sources did not change")
    ap.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    args = ap.parse_args(argv)
    try:
        path = build_guest(release=not args.debug, force=args.force, quiet=args.quiet)
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
