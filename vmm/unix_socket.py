"""Owner-only UNIX listening sockets, shared by the control server and the gdb stub.

Whoever connects to either socket owns the guest (the control socket hands
out the guest-RAM memfd; the gdb stub reads and writes memory and registers),
so both follow one policy:

- only a dead socket of our own uid is ever replaced at the path; a file, a
  live socket or another user's socket is left untouched and refused;
- the socket file is born 0600 whatever the umask (no process-wide umask
  change, which would race with other threads creating files).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat


class SocketPathError(Exception):
    """The path cannot take a new socket; the message is one line, to be prefixed by the caller."""


def clear_stale_socket(path: str) -> None:
    """Make room for a new socket at ``path``: only a dead socket of our own goes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketPathError(f"cannot check {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.geteuid():
        raise SocketPathError(f"{path} is a socket of uid {st.st_uid}, not ours; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.2)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale socket from a dead VM of ours
        return
    except OSError:
        pass  # busy or timing out: somebody is there
    finally:
        probe.close()
    raise SocketPathError(f"{path} is in use by another VM")


#: Longest AF_UNIX path Linux takes (sun_path is 108 bytes, NUL included).
_SUN_PATH_MAX = 107


def bind_private(path: str, backlog: int = 4) -> socket.socket:
    """A UNIX stream socket listening at ``path`` (cleared of a stale socket
    first), mode 0600. The path appears only once the socket listens: it is
    bound and listening under a temporary name in the same directory, then
    linked to ``path``, so a client that connects as soon as the file exists
    (a script waiting for it) is never refused."""
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Linux gives the bound file the socket inode's mode (masked by the
    # umask), so set 0600 on the inode before bind, and again on the file.
    os.fchmod(sock.fileno(), 0o600)
    head, tail = os.path.split(path)
    temp = os.path.join(head, f".{tail}.{os.getpid()}")
    if len(os.fsencode(temp)) > _SUN_PATH_MAX:
        temp = None  # no room for a longer name: bind at the path itself (then listen at once)
    try:
        sock.bind(temp or path)
    except OSError as exc:
        sock.close()
        raise SocketPathError(f"cannot listen on {path}: {exc.strerror}") from None
    with removed_on_failure(sock, temp or path):
        try:
            os.chmod(temp or path, 0o600)
        except OSError as exc:
            raise SocketPathError(f"cannot make {path} private: {exc.strerror}") from None
        sock.listen(backlog)
        if temp is not None:
            try:
                os.link(temp, path)  # fails if anything appeared at path meanwhile: never replaced
            except OSError as exc:
                raise SocketPathError(f"cannot listen on {path}: {exc.strerror}") from None
            os.unlink(temp)
    return sock


@contextlib.contextmanager
def removed_on_failure(sock: socket.socket, path: str | None):
    """Around the steps between binding and handing the listener to its owner:
    any exception there, a Ctrl-C included, closes it and removes its file
    (nobody else holds it yet, so nobody else would)."""
    try:
        yield
    except BaseException:
        close_listener(sock, path)
        raise


def close_listener(sock: socket.socket, path: str | None) -> None:
    """Shut a listening socket down (waking its accept thread), close it, and remove its file."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
