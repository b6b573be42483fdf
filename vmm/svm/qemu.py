"""Boot the SVM image in ``qemu-system-x86_64 -accel tcg -cpu max`` and run one command.

QEMU's TCG emulates AMD SVM with nested paging, so the Linux inside loads
kvm-amd and gets a /dev/kvm on the hardware-virtualization path (guest CPL0
code not emulated by KVM, 1 GiB pages, real debug registers). ``-cpu max`` is
required: ``qemu64,+svm`` lacks instructions numpy's baseline needs (SIGILL).
Everything is emulated: this is functional coverage, never speed.

The console is the first serial port on QEMU's stdout. /init prints a start
marker before the command and ``<exit marker> <status>`` after it; both carry
a random nonce, so the command's own output cannot forge them. Output before
the start marker (firmware, kernel) is shown only when the run fails.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..abi import ExitCode
from ..guest_build import GuestBuildError, build_guest, default_kernel_path
from .image import SETUP_HINT, TOOLS, BuiltImage, SvmError, build_base, cache_dir, project_manifest

QEMU = "qemu-system-x86_64"
# Environment passed from the host into the command (the rest is a clean, fixed environment).
PASS_ENV_PREFIXES = ("VMM_", "PYTEST_", "HYPOTHESIS_")
KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off rdinit=/init"
BOOT_TIMEOUT = 300  # seconds from QEMU's start to the shell


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise SvmError(f"{QEMU} is not installed: {SETUP_HINT}")
    return path


@dataclass
class SvmRun:
    exit_code: int
    image: BuiltImage
    initrd_bytes: int = 0
    boot_s: float | None = None  # QEMU start to the start marker (kernel + /init + insmod)
    command_s: float | None = None
    total_s: float = 0.0
    failure: str | None = None
    console_head: list[str] = field(default_factory=list)

    def summary(self) -> str:
        img = self.image
        how = "cached" if img.cached else f"built in {img.seconds:.1f} s"
        parts = [f"image {img.fingerprint} {how}, {img.size / 2**20:.0f} MiB + project {self.initrd_bytes / 2**20:.1f} MiB"]
        if self.boot_s is not None:
            parts.append(f"QEMU start to shell {self.boot_s:.1f} s")
        if self.command_s is not None:
            parts.append(f"command {self.command_s:.1f} s")
        parts.append(f"total {self.total_s:.1f} s")
        return "svm: " + "; ".join(parts) + f"; exit {self.exit_code}"


def _guest_kernels(project: Path, log) -> list[Path]:
    """Build the guest kernel on the host (the image has no Rust toolchain) and return it."""
    try:
        return [build_guest(quiet=True)]
    except GuestBuildError as exc:
        log(f"guest kernel not rebuilt ({str(exc).splitlines()[0]}); using the last one built")
        return [default_kernel_path()]


def _run_env(project: Path, nonce: str, term: str) -> tuple[str, str, str]:
    start, exit_ = f"PYVMM-SVM-START-{nonce}", f"PYVMM-SVM-EXIT-{nonce}"
    env = {
        "PATH": f"{TOOLS}/python-bin:{os.path.dirname(os.path.abspath(sys.executable))}:/usr/bin:{TOOLS}/bin",
        "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
        "TERM": term, "PYTHONPATH": str(project), "PYTHONDONTWRITEBYTECODE": "",
        # The command can tell where it runs (tests and `vmm bench` do not need it: they detect TCG themselves).
        "PYVMM_SVM": "1",
    }
    cols = shutil.get_terminal_size((120, 40)).columns
    env["COLUMNS"] = str(cols)
    for k, v in os.environ.items():
        if k.startswith(PASS_ENV_PREFIXES):
            env[k] = v
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items() if v != ""]
    lines += [f"PYVMM_START={start}", f"PYVMM_EXIT={exit_}"]
    return "\n".join(lines) + "\n", start, exit_


def _marker_overlap(data: bytes, marker: bytes) -> int:
    """How many trailing bytes of `data` could be the start of `marker` (all of it if it contains it)."""
    if marker in data:
        return len(data) - data.index(marker)
    for k in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:k]):
            return k
    return 0


def run(cmd: list[str], *, project: Path, memory: str = "4G", smp: int = 1, timeout: float | None = None,
        verbose: bool = False, rebuild: bool = False, out=None, log=None) -> SvmRun:
    """Run `cmd` in `project` inside the SVM VM; its output goes to `out` as it comes."""
    out = out or sys.stdout.buffer
    log = log or (lambda msg: print(f"svm: {msg}", file=sys.stderr, flush=True))
    t0 = time.monotonic()
    qemu = find_qemu()
    project = project.resolve()
    kernels = _guest_kernels(project, log)
    image = build_base(project, force=rebuild, log=log)
    if not image.cached:
        log(f"base image built in {image.seconds:.1f} s: {image.size / 2**20:.0f} MiB ({image.path})")
    nonce = secrets.token_hex(8)
    term = os.environ.get("TERM", "dumb") if sys.stdout.isatty() else "dumb"
    run_env, start, exit_ = _run_env(project, nonce, term)
    cmd_sh = f"cd {shlex.quote(str(project))} || exit 70\nexec {shlex.join(cmd)}\n"
    layer = project_manifest(project, kernels, cmd_sh, run_env)

    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    initrd = runs / f"initrd-{os.getpid()}-{nonce}.cpio"
    shutil.copyfile(image.path, initrd)  # the base layer, then the project layer appended
    with open(initrd, "ab") as f:
        before = f.tell()
        layer.write(f)
        project_bytes = f.tell() - before
    result = SvmRun(exit_code=int(ExitCode.HOST_ERROR), image=image, initrd_bytes=project_bytes)
    argv = [
        qemu, "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", str(smp),
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", "-kernel", str(image.linux.vmlinuz), "-initrd", str(initrd), "-append", KERNEL_CMDLINE,
    ]
    t_qemu = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        initrd.unlink(missing_ok=True)
        raise SvmError(f"cannot start {qemu}: {exc}") from exc
    stderr_chunks: list[bytes] = []
    err_thread = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    err_thread.start()
    timed_out = threading.Event()

    def _watchdog():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, _watchdog) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    booted = threading.Event()
    boot_stuck = threading.Event()

    def _boot_watchdog():
        if not booted.is_set():
            boot_stuck.set()
            proc.kill()

    # Boot to the shell takes ~20 s even on a busy host; a boot that never gets there
    # (seen once under heavy load) must fail fast with its console, not eat the pass.
    boot_timer = threading.Timer(BOOT_TIMEOUT, _boot_watchdog)
    boot_timer.daemon = True
    boot_timer.start()
    head: list[bytes] = []  # console before the start marker
    pending = b""
    state = "boot"  # boot -> command -> done
    exit_prefix = exit_.encode()
    t_start = t_end = None
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            while pending:
                if state == "boot":
                    nl = pending.find(b"\n")
                    if nl < 0:
                        break
                    line, pending = pending[: nl + 1], pending[nl + 1 :]
                    if line.rstrip(b"\r\n").endswith(start.encode()):
                        state, t_start = "command", time.monotonic()
                        booted.set()
                        initrd.unlink(missing_ok=True)  # QEMU loaded it at start
                    else:
                        head.append(line)
                        if verbose:
                            out.write(line)
                            out.flush()
                elif state == "command":
                    nl = pending.find(b"\n")
                    if nl < 0:
                        # A partial line: write all but what could begin the exit marker.
                        keep = _marker_overlap(pending, exit_prefix)
                        out.write(pending[: len(pending) - keep])
                        out.flush()
                        pending = pending[len(pending) - keep :]
                        break
                    line, pending = pending[: nl + 1], pending[nl + 1 :]
                    at = line.find(exit_prefix)
                    if at >= 0:  # normally at column 0; later if the command's last line had no newline
                        out.write(line[:at])
                        out.flush()
                        state, t_end = "done", time.monotonic()
                        try:
                            result.exit_code = int(line[at + len(exit_prefix) :].strip())
                        except ValueError:
                            result.failure = f"unreadable exit line {line!r}"
                    else:
                        out.write(line)
                        out.flush()
                else:
                    if verbose:
                        out.write(pending)
                        out.flush()
                    pending = b""
        if state == "command" and pending:
            out.write(pending)
            out.flush()
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
        boot_timer.cancel()
        initrd.unlink(missing_ok=True)
        err_thread.join(timeout=5)
    result.total_s = time.monotonic() - t0
    if t_start is not None:
        result.boot_s = t_start - t_qemu
    if t_start is not None and t_end is not None:
        result.command_s = t_end - t_start
    result.console_head = [b.decode(errors="replace").rstrip() for b in head]
    qemu_err = b"".join(stderr_chunks).decode(errors="replace").strip()
    if boot_stuck.is_set():
        result.exit_code, result.failure = 70, f"no shell after {BOOT_TIMEOUT} s (QEMU killed; console above)"
    elif timed_out.is_set():
        result.exit_code, result.failure = 124, f"timed out after {timeout:g} s (QEMU killed)"
    elif state != "done":
        where = "before the command started" if state == "boot" else "while the command ran"
        tail = "; ".join(result.console_head[-3:] + ([qemu_err.splitlines()[-1]] if qemu_err else []))
        result.failure = f"QEMU stopped {where} (status {proc.returncode}){': ' + tail if tail else ''}"
        result.exit_code = 70
    return result
