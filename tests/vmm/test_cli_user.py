"""What a new user trips over first: --version, help texts, exit codes, pipes,
signals and stale control sockets. Each test runs the CLI as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "vmm.py", *args], capture_output=True, text=True, timeout=120, **kw)


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("vmm (pyvmm) ") and proc.stdout.strip()[-1].isdigit()


@pytest.mark.parametrize("cmd,fragment", [("build", "cached by a hash"), ("inspect", "control socket given to")])
def test_every_command_has_help(cmd, fragment):
    proc = _cli(cmd, "--help")
    assert proc.returncode == 0 and fragment in " ".join(proc.stdout.split())


def test_exit_code_list_is_complete():
    from vmm.abi import ExitCode

    text = _cli("run", "--help").stdout
    for code in ExitCode:
        if code >= 100:
            assert str(int(code)) in text, f"exit code {int(code)} ({code.name}) is not explained in `vmm run --help`"
    assert "workload=mm" in text  # how to keep a guest running for --control


def test_stale_socket_is_named(tmp_path):
    path = tmp_path / "vm.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on: what a killed VM leaves
    for cmd in ("inspect", "pt"):
        proc = _cli(cmd, str(path))
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"vmm: error: no VM is listening on {path} (stale socket)"


@pytest.mark.kvm
def test_closed_stdout_ends_the_run_quietly(guest_kernel_path):
    """`vmm run | head -2`: two console lines, then the run ends with 141 and no message."""
    proc = subprocess.run(
        f"{sys.executable} vmm.py run --kernel {guest_kernel_path} -c workload=mm | head -2; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 141, proc.stderr
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower()
    assert "host problem" not in proc.stderr and "exit code" not in proc.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until_running(sock, deadline: float) -> None:
    """Ask the control socket (its JSON-lines "status") until the vCPU runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(str(sock))
        lines = c.makefile("r")
        while True:
            c.sendall(b'{"op": "status"}\n')
            if json.loads(lines.readline()).get("running"):
                return
            assert time.monotonic() < deadline, "the guest never started running"
            time.sleep(0.01)


@pytest.mark.kvm
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_remove_the_control_socket(guest_kernel_path, tmp_path, sig, code):
    sock = tmp_path / "vm.sock"
    proc = subprocess.Popen(
        [sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "-q", "-c", "workload=mm",
         "--control", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # As in a terminal: a suite started in the background (`pytest &` without job
        # control) ignores SIGINT, the child would inherit that and never see the signal.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the control socket never appeared"
            time.sleep(0.01)
        _wait_until_running(sock, deadline)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == code, err
    assert not sock.exists(), "the control socket was left behind"
    assert "Traceback" not in err
    assert not os.path.exists(sock)


def test_build_shows_progress():
    proc = _cli("build", "--force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("kernel-release")
    assert "building guest kernel" in proc.stderr
    assert any(line.strip().startswith("[") and "Finished" in line for line in proc.stderr.splitlines()), proc.stderr
