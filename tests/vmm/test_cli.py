import argparse
import subprocess
import sys

import pytest

from vmm.units import parse_size, parse_timeout


@pytest.mark.parametrize("text,value", [("64M", 64 << 20), ("2G", 2 << 30), ("128MiB", 128 << 20), ("4096", 4096), ("16m", 16 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12X", "-5M", "1.5G"])
def test_parse_size_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "soon"])
def test_parse_timeout_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_timeout(text)


def _cli(*args):
    return subprocess.run([sys.executable, "vmm.py", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["run", "--memory", "0"], "positive"),
        (["run", "--memory", "lots"], "cannot parse memory size"),
        (["run", "--memory", "16781313"], "4 KiB"),
        (["run", "--timeout", "-3"], "positive"),
        (["run", "--kernel", "/nonexistent/kernel"], "no such file"),
        (["run", "--kernel", "/etc/hostname"], "not an ELF"),
        (["run", "--bogus"], "unrecognized arguments"),
        (["memmap", "--kernel", "/"], "is a directory"),
    ],
)
def test_bad_input_is_one_line(vmm_cli, args, fragment):
    proc = vmm_cli(*args)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_explains_exit_codes():
    proc = _cli("run", "--help")
    assert proc.returncode == 0 and "watchdog" in proc.stdout and "exit codes" in proc.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["run", "--control", "/nonexistent-dir/vm.sock", "--kernel", "/nonexistent"], "no such file"),
        (["pt", "/nonexistent-dir/vm.sock"], "no VM control socket"),
        (["inspect", "/nonexistent-dir/vm.sock"], "no VM control socket"),
        (["pt", "--page-size", "3M"], "page size"),
        (["pt", "--range", "5:1"], "empty"),
        (["run", "--slide", "lots"], "not an integer"),
    ],
)
def test_more_bad_input(vmm_cli, args, fragment):
    proc = vmm_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.kvm
def test_control_socket_path_unusable(guest_kernel_path):
    proc = _cli("run", "--kernel", str(guest_kernel_path), "--control", "/nonexistent-dir/vm.sock", "-q")
    assert proc.returncode == 2 and "cannot listen on /nonexistent-dir/vm.sock" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.kvm
def test_control_socket_path_is_a_regular_file(guest_kernel_path, tmp_path, vmm_cli):
    f = tmp_path / "not-a-socket"
    f.write_text("x")
    proc = vmm_cli("run", "--kernel", str(guest_kernel_path), "--control", str(f), "-q")
    assert proc.returncode == 2 and "is not a socket" in proc.stderr
