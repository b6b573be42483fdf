"""The control socket lets in its owner only, never clobbers what is not its
own, and never lets a client believe a guest is parked after its pause ran out."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import stat
import tempfile
import threading
import time

import pytest

from vmm.devices import Stop
from vmm.inspector import control
from vmm.inspector.control import ControlError, ControlServer, RemoteTarget
from vmm.inspector.snapshot import take_snapshot
from vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm
RAM = 32 << 20


@pytest.fixture
def vm(guest_image):
    with Vm(guest_image, VmConfig(memory=RAM, timeout=30, cmdline="scenario=loop")) as v:
        yield v


@contextlib.contextmanager
def running(vm):
    """The guest running in a thread (scenario=loop spins after READY)."""
    t = threading.Thread(target=vm.run)
    t.start()
    try:
        deadline = time.time() + 10
        while not vm.running and time.time() < deadline:
            time.sleep(0.01)
        assert vm.running
        yield
    finally:
        vm.request_stop(Stop(0, "test", "done"))
        t.join(10)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_socket_is_0600_whatever_the_umask(vm, tmp_path):
    path = str(tmp_path / "vm.sock")
    with umask(0o000), ControlServer(vm, path):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, oct(mode)


def _connect_as(uid: int, gid: int, path: str) -> str:
    """In a forked child that dropped to (uid, gid): connect and say hello.
    Returns what happened as one line."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery past this point
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            with contextlib.suppress(BrokenPipeError):  # a refusing server may have hung up already
                s.sendall(b'{"op": "hello"}\n')
            data, fds, _, _ = socket.recv_fds(s, 65536, 1)
            out = f"fds={len(fds)} reply={data.decode(errors='replace').strip()}"
        except OSError as exc:
            out = f"oserror={exc.errno}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = f"error={exc!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid (CI runs as root)")
def test_other_uid_is_refused(vm):
    nobody = pwd.getpwnam("nobody")
    d = tempfile.mkdtemp(prefix="vmm-sec-")
    try:
        os.chmod(d, 0o711)  # traversable by nobody
        path = os.path.join(d, "vm.sock")
        with ControlServer(vm, path):
            # 0600 alone keeps nobody out at connect(2)...
            assert f"oserror={13}" == _connect_as(nobody.pw_uid, nobody.pw_gid, path)
            # ...and SO_PEERCRED still refuses if the mode is ever widened.
            os.chmod(path, 0o666)
            out = _connect_as(nobody.pw_uid, nobody.pw_gid, path)
            assert out.startswith("fds=0 "), out
            reply = json.loads(out.split("reply=", 1)[1])
            assert reply["ok"] is False and "permission denied" in reply["error"]
            # The owner still gets in, with the memory fd.
            with RemoteTarget(path) as target:
                assert target.facts().ram_size == RAM
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(d, "vm.sock"))
        os.rmdir(d)


def test_regular_file_at_the_path_is_left_alone(vm, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("precious\n")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(vm, str(path))
    assert path.read_text() == "precious\n"


def test_cli_refuses_a_regular_file_with_one_line(guest_kernel_path, tmp_path, vmm_cli):
    path = tmp_path / "notes.txt"
    path.write_text("precious\n")
    proc = vmm_cli("run", "--kernel", guest_kernel_path, "--control", path, "-q")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a socket" in proc.stderr, proc.stderr
    assert path.read_text() == "precious\n"


def test_stale_socket_of_ours_is_replaced_live_one_is_not(vm, tmp_path):
    path = str(tmp_path / "vm.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # a socket file nobody listens on: what a killed VM leaves
    with ControlServer(vm, path):
        with pytest.raises(ControlError, match="in use"):
            ControlServer(vm, path)
        with RemoteTarget(path) as target:
            assert target.facts().ram_size == RAM


def test_pause_within_bound_is_not_expired(vm, tmp_path, monkeypatch):
    path = str(tmp_path / "vm.sock")
    monkeypatch.setattr(control, "MAX_PAUSE_S", 10.0)  # a bound no loaded host reaches
    with ControlServer(vm, path), running(vm), RemoteTarget(path) as target:
        with target.paused() as pause:
            assert pause.parked
        assert not pause.expired


def test_expired_pause_is_reported_and_the_snapshot_is_not_trusted(vm, tmp_path, monkeypatch):
    path = str(tmp_path / "vm.sock")
    with ControlServer(vm, path), running(vm), RemoteTarget(path) as target:
        monkeypatch.setattr(control, "MAX_PAUSE_S", 0.05)
        t0 = time.perf_counter()
        with target.paused() as pause:
            assert pause.parked
            time.sleep(1.0)  # far longer than the server's bound
        held_ms = (time.perf_counter() - t0) * 1e3
        assert pause.expired and pause.paused_ms < held_ms, (pause, held_ms)
        # The client is still in step with the server after an expired pause.
        assert target.get_status()["running"]
        # A snapshot whose every pause expires (a slow client) is retaken, a
        # bounded number of times, and then says it was not parked.
        monkeypatch.setattr(control, "MAX_PAUSE_S", 0.02)
        snap = take_snapshot(SlowClient(target, 0.25))
        assert not snap.parked and snap.pause_expired, snap
        assert snap.attempts > 1


class SlowClient:
    """A remote target whose owner dawdles inside every pause."""

    def __init__(self, target, seconds: float):
        self.target, self.seconds = target, seconds
        self.physmem = target.physmem

    @contextlib.contextmanager
    def paused(self, **kw):
        with self.target.paused(**kw) as pause:
            time.sleep(self.seconds)
            yield pause

    def __getattr__(self, name):
        return getattr(self.target, name)
