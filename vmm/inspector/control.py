"""Control socket: expose a running VM to inspectors in other processes.

``vmm run --control PATH`` starts a ``ControlServer`` on a UNIX stream
socket. An inspector connects with ``RemoteTarget(PATH)``; the server passes
the guest-RAM memfd over the socket (SCM_RIGHTS), so the inspector maps the
very same pages and reads them without copies. The inspector maps them
MAP_PRIVATE: it can never write to the guest.

Protocol: one JSON object per line in each direction.

    -> {"op": "hello"}     <- {"ok": true, "facts": {...}}  + the memfd
    -> {"op": "facts"}     <- {"ok": true, "facts": {...}}  (latest reports)
    -> {"op": "pause"}     <- {"ok": true, "parked": bool, "registers": {...}}
    -> {"op": "resume"}    <- {"ok": true, "paused_ms": float}
    -> {"op": "status"}    <- {"ok": true, "running": bool, "exits": ..., ...}
    -> {"op": "serial", "since": N}   <- {"ok": true, "data": "...", "next": M}
    -> {"op": "dirty"}     <- {"ok": true, "pages": [page numbers written since the last call]}

A pause lasts until "resume", the client disconnecting, or ``MAX_PAUSE_S``,
whichever comes first: a dead inspector cannot hold the guest.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import threading
import time

import numpy as np

from .target import ControlRegisters, GuestFacts, facts_from_vm

MAX_PAUSE_S = 0.2
MAX_LINE = 1 << 20


class ControlError(RuntimeError):
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
        if os.path.exists(path):
            if not _is_socket(path):
                raise ControlError(f"{path} exists and is not a socket")
            with contextlib.suppress(OSError):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.settimeout(0.2)
                try:
                    probe.connect(path)
                    raise ControlError(f"{path} is in use by another VM")
                except (ConnectionRefusedError, FileNotFoundError):
                    os.unlink(path)  # stale socket from a dead VM
                finally:
                    probe.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot listen on {path}: {exc.strerror}") from None
        self.sock.listen(4)
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="vmm-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

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
                        bits = self.vm.dirty_pages()
                        _send(conn, {"ok": True, "pages": np.flatnonzero(bits).tolist()})
                elif op == "pause":
                    self._pause(conn, reader)
                elif op == "resume":
                    _send(conn, {"ok": False, "error": "not paused"})
                else:
                    _send(conn, {"ok": False, "error": f"unknown op {op!r}"})
        except (OSError, ControlError, ValueError):
            return
        finally:
            conn.close()

    def _pause(self, conn: socket.socket, reader: _LineReader) -> None:
        t0 = time.perf_counter()
        with self.vm.paused() as parked:
            regs = _registers(self.vm) if (parked or not self.vm.running) else None
            _send(conn, {"ok": True, "parked": bool(parked), "registers": regs})
            try:
                msg = reader.readline(timeout=MAX_PAUSE_S)
            except TimeoutError:
                msg = None
        paused_ms = (time.perf_counter() - t0) * 1e3
        if msg is not None and msg.get("op") == "resume":
            _send(conn, {"ok": True, "paused_ms": paused_ms})


def _registers(vm) -> dict | None:
    if vm.vcpu is None:
        return None
    s = vm.vcpu.get_sregs()
    return {"cr0": s.cr0, "cr3": s.cr3, "cr4": s.cr4, "efer": s.efer, "rip": vm.vcpu.get_regs().rip}


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class RemoteTarget:
    """An inspector's view of a VM served by ``ControlServer`` at ``path``."""

    def __init__(self, path: str, timeout: float = 5.0):
        from mm.physmem import BufferMemory

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise ControlError(f"no VM control socket at {path} (start one with `vmm run --control {path}`)") from None
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot connect to {path}: {exc.strerror}") from None
        self.timeout = timeout
        self.reader = _LineReader(self.sock)
        _send(self.sock, {"op": "hello"})
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_LINE, 1)
        if not fds:
            self.sock.close()
            raise ControlError("the VM did not pass its memory (is this a vmm control socket?)")
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
    def paused(self):
        reply = self._call({"op": "pause"})
        regs = reply.get("registers")
        self._registers = ControlRegisters(**regs) if regs else None
        try:
            yield bool(reply.get("parked"))
        finally:
            with contextlib.suppress(ControlError, OSError, TimeoutError):
                self._call({"op": "resume"})

    def dirty_pages(self):
        """Pages written since the last call, as a bool array; None if the VM logs none."""
        try:
            pages = self._call({"op": "dirty"})["pages"]
        except ControlError:
            return None
        out = np.zeros(self._facts.ram_size // 4096, dtype=bool)
        out[np.asarray(pages, dtype=np.int64)] = True
        return out

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
