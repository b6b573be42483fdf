"""`--gdb` addresses: parsed, loopback enforced, bad ones a one-line exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmm.gdbstub.server import GdbAddress, GdbAddressError, parse_address


@pytest.mark.parametrize(
    "text, addr",
    [
        ("1234", GdbAddress("tcp", "127.0.0.1", 1234)),
        ("localhost:1", GdbAddress("tcp", "localhost", 1)),
        ("127.0.0.2:0", GdbAddress("tcp", "127.0.0.2", 0)),
        ("[::1]:99", GdbAddress("tcp", "::1", 99)),
        ("unix:/tmp/x.sock", GdbAddress("unix", path="/tmp/x.sock")),
    ],
)
def test_parse_address(text, addr):
    assert parse_address(text) == addr


@pytest.mark.parametrize("text", ["0.0.0.0:1234", "10.1.2.3:1", "[::]:5", "example.com:1"])
def test_non_loopback_needs_the_explicit_flag(text):
    with pytest.raises(GdbAddressError, match="no authentication"):
        parse_address(text)
    assert not parse_address(text, allow_remote=True).is_loopback


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--gdb", "0.0.0.0:1234"], "not a loopback address"),
        (["--gdb", "abc"], "bad port"),
        (["--gdb", "70000"], "out of range"),
        (["--gdb", "unix:"], "needs a path"),
        (["--gdb-wait"], "need --gdb"),
    ],
)
def test_bad_gdb_options_exit_2_with_one_line(vmm_cli, args, fragment):
    p = vmm_cli("run", *args)
    assert p.returncode == 2
    assert fragment in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.kvm
def test_allowed_remote_address_warns_once(vmm_kernel_path):
    p = subprocess.run([sys.executable, "vmm.py", "run", "--kernel", str(vmm_kernel_path), "--gdb", "0.0.0.0:0",
                        "--gdb-allow-remote", "--timeout", "30"], capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "without authentication" in warnings[0], p.stderr
