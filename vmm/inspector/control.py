"""Control socket: expose a running VM to inspectors in other processes.

``vmm run --control PATH`` starts a ``ControlServer`` on a UNIX stream
socket. An inspector connects with ``RemoteTarget(PATH)``; the server passes
the guest-RAM memfd over the socket (SCM_RIGHTS), so the inspector maps the
very same pages and reads them without copies. The inspector maps them
MAP_PRIVATE: it can never write to the guest.

Protocol: one JSON object per line in each direction.

    -> {"op": "hello"}     <- {"ok": true, "facts": {...}}  + the memfd
    -> {"op": "facts"}     <- {"ok": true, "facts": {...}}  (latest reports)
    -> {"op": "pause"}     <- {"ok": true, "parked": bool, "registers": {...}, "max_pause_ms": float}
    -> {"op": "pause", "quiet": true}  the same, but a guest parked inside a critical
                           section first runs to its end (the kernel's quiet hook):
                           "ran_ms" says how long it ran, which was not a pause
    -> {"op": "resume"}    <- {"ok": true, "paused_ms": float, "expired": bool}
    -> {"op": "status"}    <- {"ok": true, "running": bool, "exits": ..., ...}
    -> {"op": "serial", "since": N}   <- {"ok": true, "data": "...", "next": M}
    -> {"op": "dirty"}     <- {"ok": true, "pages": [page numbers written since the last call]}
    -> {"op": "save", "path": P}  <- {"ok": true, "pause_ms": float, "file_bytes": N, ...} (a snapshot file)

A pause lasts until "resume", the client disconnecting, or ``MAX_PAUSE_S``,
whichever comes first: a dead inspector cannot hold the guest. A pause that
ran out is not silent: the client's "resume" is answered with expired=true.

Only the socket's owner gets in: the socket is created 0600 whatever the
umask, and a peer whose uid (SO_PEERCRED) is neither ours nor root is refused.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
import threading
import time

import numpy as np

from mm.physmem import BufferMemory

from ..errors import UsageError
from ..snapshot.format import SnapshotError
from ..unix_socket import SocketPathError, bind_private, close_listener, removed_on_failure
from ..snapshot.machine import save_vm_paused
from .dirty import dirty_pages
from ..registers import capture
from .inspect_block import parked_busy
from .target import ControlRegisters, GuestFacts, Pause, facts_from_vm

MAX_PAUSE_S = 0.2
#: How long a guest parked inside a critical section may run to its end ("quiet" pauses).
QUIET_TIMEOUT_S = 0.05
MAX_LINE = 1 << 20


class ControlError(UsageError, RuntimeError):
    """The control socket failed or answered with an error (one line)."""


def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = (json.dumps(obj) + "\n").encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


class _LineReader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def readline(self, timeout: float | None = None) -> dict | None:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ControlError("control message too long")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError:
            raise ControlError("malformed control message") from None
        if not isinstance(obj, dict):
            raise ControlError("control message is not an object")
        return obj


class ControlServer:
    """Serves one VM on a UNIX socket, one thread per client."""

    def __init__(self, vm, path: str):
        if vm.memory.fd is None:
            raise ControlError("the VM's RAM is not memfd-backed; it cannot be shared")
        self.vm = vm
        self.path = path
        # Whoever can connect can pause the guest and map all of its RAM: the
        # socket is its owner's alone whatever the umask (vmm.unix_socket).
        try:
            self.sock = bind_private(path, backlog=4)
        except SocketPathError as exc:
            raise ControlError(str(exc)) from None
        with removed_on_failure(self.sock, path):
            self._closed = False
            self._thread = threading.Thread(target=self._accept_loop, name="vmm-control", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close_listener(self.sock, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="vmm-control-client", daemon=True).start()

    def _status(self) -> dict:
        vm = self.vm
        return {
            "running": vm.running,
            "serial_bytes": vm.uart.total_bytes,
            "reports": len(vm.reports.reports),
            "ram_size": vm.memory.size,
            "backend": vm.backend.name,
        }

    def _serve(self, conn: socket.socket) -> None:
        reader = _LineReader(conn)
        try:
            uid = peer_uid(conn)
            if uid not in (os.geteuid(), 0):
                _send(conn, {"ok": False, "error": f"permission denied: uid {uid} does not own this VM"})
                return
            expired_ms: float | None = None  # a pause that ran out before the client resumed
            while True:
                msg = reader.readline()
                if msg is None:
                    return
                op = msg.get("op")
                if op == "hello":
                    _send(conn, {"ok": True, "facts": facts_from_vm(self.vm).to_json(), **self._status()},
                          [self.vm.memory.fd])
                elif op == "facts":
                    _send(conn, {"ok": True, "facts": facts_from_vm(self.vm).to_json()})
                elif op == "status":
                    _send(conn, {"ok": True, **self._status()})
                elif op == "serial":
                    since = int(msg.get("since", 0))
                    out = bytes(self.vm.uart.output)
                    start = max(0, len(out) - (self.vm.uart.total_bytes - since))
                    _send(conn, {"ok": True, "data": out[start:].decode("utf-8", "replace"),
                                 "next": self.vm.uart.total_bytes})
                elif op == "dirty":
                    if not self.vm.config.dirty_log:
                        _send(conn, {"ok": False, "error": "dirty logging is off for this VM"})
                    else:
                        bits = dirty_pages(self.vm)
                        _send(conn, {"ok": True, "pages": np.flatnonzero(bits).tolist()})
                elif op == "save":  # vmm snapshot SOCKET FILE (vmm.snapshot.machine)
                    try:
                        info = save_vm_paused(self.vm, str(msg.get("path", "")))
                        _send(conn, {"ok": True, **info})
                    except SnapshotError as exc:
                        _send(conn, {"ok": False, "error": str(exc)})
                elif op == "regs":  # every register, read from the parked vCPU (vmm regs/x/translate)
                    with self.vm.paused() as parked:
                        regs = capture(self.vm.vcpu) if self.vm.vcpu is not None and (parked or not self.vm.running) else None
                    _send(conn, {"ok": True, "registers": regs} if regs else {"ok": False, "error": "the vCPU did not stop"})
                elif op == "pause":
                    expired_ms = self._pause(conn, reader, quiet=bool(msg.get("quiet")))
                elif op == "resume":
                    if expired_ms is None:
                        _send(conn, {"ok": False, "error": "not paused"})
                    else:  # the client learns that its pause ended without it
                        _send(conn, {"ok": True, "paused_ms": expired_ms, "expired": True})
                        expired_ms = None
                else:
                    _send(conn, {"ok": False, "error": f"unknown op {op!r}"})
        except (OSError, ControlError, ValueError):
            return
        finally:
            conn.close()

    def _pause(self, conn: socket.socket, reader: _LineReader, *, quiet: bool = False) -> float | None:
        """Park the guest until the client resumes, at most MAX_PAUSE_S.

        Returns None after a normal resume, or the pause's length in ms if it
        expired: the guest then ran again while the client still thought it
        parked, and the client's next "resume" is answered with expired=true.
        ``quiet``: parked inside a critical section, the guest first runs to
        the section's end (a round trip per retry over the socket would
        otherwise hold a busy guest again and again).
        """
        t0 = time.perf_counter()
        with self.vm.paused() as parked:
            ran_ms = self._run_to_quiet() if (parked and quiet) else 0.0
            t0 += ran_ms / 1e3
            regs = _registers(self.vm) if (parked or not self.vm.running) else None
            _send(conn, {"ok": True, "parked": bool(parked), "registers": regs,
                         "max_pause_ms": MAX_PAUSE_S * 1e3, "ran_ms": ran_ms})
            try:
                msg = reader.readline(timeout=MAX_PAUSE_S)
            except TimeoutError:
                msg = None
        paused_ms = (time.perf_counter() - t0) * 1e3
        if msg is None:
            return paused_ms
        if msg.get("op") == "resume":
            _send(conn, {"ok": True, "paused_ms": paused_ms, "expired": False})
        else:
            _send(conn, {"ok": False, "error": f"op {msg.get('op')!r} while paused: only 'resume' is allowed"})
        return None


    def _run_to_quiet(self) -> float:
        """With the vCPU parked: if the guest is inside a critical section, let
        it run to the section's end and park there; how long it ran (ms)."""
        facts = facts_from_vm(self.vm)
        hook, block_at = facts.report.quiet_hook, facts.report.inspect_block_phys
        if not hook or block_at is None:
            return 0.0
        if not parked_busy(self.vm.memory, block_at):
            return 0.0
        t = time.perf_counter_ns()
        if not self.vm.run_to(hook, QUIET_TIMEOUT_S):
            return (time.perf_counter_ns() - t) / 1e6
        return (self.vm.parked_ns - t) / 1e6


def _registers(vm) -> dict | None:
    if vm.vcpu is None:
        return None
    s = vm.vcpu.get_sregs()
    return {"cr0": s.cr0, "cr3": s.cr3, "cr4": s.cr4, "efer": s.efer, "rip": vm.vcpu.get_regs().rip}


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's uid (SO_PEERCRED: struct ucred {pid, uid, gid})."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class RemoteTarget:
    """An inspector's view of a VM served by ``ControlServer`` at ``path``."""

    #: ``paused(quiet=True)``: the server runs a busy guest to its quiet point first.
    quiet_pause = True

    def __init__(self, path: str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise ControlError(f"no VM control socket at {path} (start one with `vmm run --control {path}`)") from None
        except ConnectionRefusedError:
            self.sock.close()
            raise ControlError(f"no VM is listening on {path} (stale socket)") from None
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot connect to {path}: {exc.strerror}") from None
        self.timeout = timeout
        self.reader = _LineReader(self.sock)
        _send(self.sock, {"op": "hello"})
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_LINE, 1)
        if not fds:
            self.sock.close()
            try:
                refusal = json.loads(data.split(b"\n", 1)[0]).get("error")
            except (ValueError, AttributeError):
                refusal = None
            raise ControlError(refusal or "the VM did not pass its memory (is this a vmm control socket?)")
        self.reader.buf = data
        hello = self.reader.readline(timeout)
        if not hello or not hello.get("ok"):
            raise ControlError(f"hello refused: {hello}")
        self._facts = GuestFacts.from_json(hello["facts"])
        self.memfd = fds[0]
        size = os.fstat(self.memfd).st_size
        # MAP_PRIVATE: the same pages, but nothing we do can write to the guest.
        self.mmap = mmap.mmap(self.memfd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        self.physmem = BufferMemory(self.mmap)
        self._registers: ControlRegisters | None = None
        self.status = {k: v for k, v in hello.items() if k not in ("ok", "facts")}

    def _call(self, msg: dict) -> dict:
        _send(self.sock, msg)
        reply = self.reader.readline(self.timeout)
        if reply is None:
            raise ControlError("the VM closed the control socket (guest stopped?)")
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "request failed")))
        return reply

    def facts(self) -> GuestFacts:
        self._facts = GuestFacts.from_json(self._call({"op": "facts"})["facts"])
        return self._facts

    def get_status(self) -> dict:
        return self._call({"op": "status"})

    def serial(self, since: int = 0) -> tuple[str, int]:
        r = self._call({"op": "serial", "since": since})
        return r["data"], r["next"]

    @contextlib.contextmanager
    def paused(self, *, quiet: bool = False):
        """Park the remote guest for the block; yields a :class:`Pause`.

        The server lets the guest go after ``max_pause_ms`` whatever the
        client does. After the block, ``pause.expired`` says whether that
        happened: what was read in the block may then be torn. ``quiet``:
        the server first lets a guest parked inside a critical section run
        to its end (``pause.ran_ms``, not part of the pause).
        """
        reply = self._call({"op": "pause", "quiet": True} if quiet else {"op": "pause"})
        regs = reply.get("registers")
        self._registers = ControlRegisters(**regs) if regs else None
        pause = Pause(parked=bool(reply.get("parked")), ran_ms=float(reply.get("ran_ms", 0.0)))
        try:
            yield pause
        finally:
            try:
                done = self._call({"op": "resume"})
                pause.expired = bool(done.get("expired"))
                pause.paused_ms = float(done.get("paused_ms", 0.0))
            except (ControlError, OSError, TimeoutError):
                pause.expired = pause.parked  # cannot tell: assume the worst

    def save(self, path: str) -> dict:
        """Save the guest to ``path`` (resolved here; written by the VM's process)."""
        return self._call({"op": "save", "path": os.path.abspath(path)})

    def dirty_pages(self):
        """Pages written since the last call, as a bool array; None if the VM logs none."""
        try:
            pages = self._call({"op": "dirty"})["pages"]
        except ControlError:
            return None
        out = np.zeros(self._facts.ram_size // 4096, dtype=bool)
        out[np.asarray(pages, dtype=np.int64)] = True
        return out

    def all_registers(self) -> dict[str, int]:
        """Every register of the vCPU (vmm.registers.capture), read while it is parked."""
        return self._call({"op": "regs"})["registers"]

    def control_registers(self) -> ControlRegisters:
        if self._registers is None:
            raise ControlError("registers are only available while the VM is paused")
        return self._registers

    def close(self) -> None:
        if self.physmem is not None:
            self.physmem.close()
            self.physmem = None
        if self.mmap is not None:
            self.mmap.close()
            self.mmap = None
        os.close(self.memfd)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
