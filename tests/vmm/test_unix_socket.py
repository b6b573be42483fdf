"""vmm/unix_socket.py: the owner-only listener the control server and the gdb stub share."""

import os
import socket
import stat
import threading

import pytest

from vmm.unix_socket import SocketPathError, bind_private, clear_stale_socket, close_listener, removed_on_failure


def test_socket_is_private_whatever_the_umask(tmp_path):
    path = str(tmp_path / "s.sock")
    old = os.umask(0)
    try:
        sock = bind_private(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        close_listener(sock, path)
    assert not os.path.exists(path)


def test_a_regular_file_is_left_alone(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("keep me")
    with pytest.raises(SocketPathError, match="not a socket"):
        bind_private(str(path))
    assert path.read_text() == "keep me"


def test_a_stale_socket_of_ours_is_replaced_and_a_live_one_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays: a dead VM's socket
    live = bind_private(path)
    live.listen(1)
    try:
        with pytest.raises(SocketPathError, match="in use"):
            clear_stale_socket(path)
        assert os.path.exists(path)
    finally:
        close_listener(live, path)


def test_ctrl_c_before_the_owner_holds_the_listener_removes_its_file(tmp_path):
    # A SIGINT landing between bind and the caller's assignment used to leave
    # the socket file behind (the caller's cleanup had nothing to close).
    path = str(tmp_path / "s.sock")
    sock = bind_private(path)
    with pytest.raises(KeyboardInterrupt):
        with removed_on_failure(sock, path):
            raise KeyboardInterrupt
    assert not os.path.exists(path)
    assert sock.fileno() == -1


@pytest.mark.kvm
def test_control_server_cleans_up_when_interrupted_while_starting(tmp_path, monkeypatch, vmm_vm):
    from vmm.inspector.control import ControlServer

    vm = vmm_vm(fresh=True)  # a control socket shares the RAM memfd: a cold VM, never run here

    def interrupted(self):
        raise KeyboardInterrupt  # Ctrl-C while the accept thread starts

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    path = str(tmp_path / "vm.sock")
    with pytest.raises(KeyboardInterrupt):
        ControlServer(vm, path)
    assert not os.path.exists(path)


def test_the_path_appears_only_once_the_socket_listens(tmp_path):
    """A client that connects as soon as the file exists (a script waiting
    for `vmm run --control PATH`) is never refused: at every C call made
    while the socket is set up, either the path is absent or a connection
    to it is accepted."""
    import sys

    path = str(tmp_path / "s.sock")
    refused = []

    def probe(frame, event, arg):
        if event != "c_call" or not os.path.exists(path):
            return
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(path)
        except ConnectionRefusedError:
            refused.append(getattr(arg, "__name__", str(arg)))
        finally:
            client.close()

    sys.setprofile(probe)
    try:
        sock = bind_private(path)
    finally:
        sys.setprofile(None)
    try:
        assert refused == [], f"refused while the path existed, at {refused}"
        assert os.listdir(tmp_path) == ["s.sock"]  # no temporary name left behind
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        close_listener(sock, path)


def test_a_path_too_long_for_a_temporary_name_still_listens(tmp_path):
    base = str(tmp_path) + "/"
    path = base + "s" * (107 - len(base))  # exactly the longest path AF_UNIX takes
    if len(path) != 107:
        pytest.skip("tmp_path itself is too long for this test")
    sock = bind_private(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
    finally:
        close_listener(sock, path)
