"""The listening socket and the one connection a gdb client holds.

``parse_address`` turns ``--gdb`` text into a TCP or UNIX address and
enforces the safety rules: TCP binds to loopback unless the caller allows a
remote address (the stub has no authentication: whoever connects owns the
guest), and a UNIX socket is created with mode 0600 (bound under a umask,
so there is no window in which it is wider).

One client at a time. A reader thread frames bytes into packets, acks them
('+', or '-' for a bad checksum, until no-ack mode), retransmits on '-',
and queues events for the debugger, which answers them from the vCPU
thread. Ctrl-C (0x03) is handed to ``on_interrupt`` at once: the vCPU may be
inside KVM_RUN and must be kicked out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import socket
import threading
from dataclasses import dataclass

from ..unix_socket import SocketPathError, bind_private, close_listener, removed_on_failure
from .packets import Ack, BadChecksum, Framer, Interrupt, Malformed, Nack, Oversize, Packet, encode

__all__ = ["GdbAddress", "GdbAddressError", "parse_address", "GdbServer", "Connection", "NewClient", "ClientGone"]


class GdbAddressError(ValueError):
    """A --gdb address that is malformed or not allowed (one line)."""


@dataclass(frozen=True)
class GdbAddress:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def gdb_target(self) -> str:
        """What to type after ``target remote``."""
        return self.path if self.kind == "unix" else f"{self.host}:{self.port}"


def parse_address(text: str, *, allow_remote: bool = False) -> GdbAddress:
    """``PORT``, ``HOST:PORT`` or ``unix:PATH``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise GdbAddressError("--gdb unix: needs a path, e.g. unix:/tmp/vm.gdb")
        return GdbAddress("unix", path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text, 10)
    except ValueError:
        raise GdbAddressError(f"--gdb: bad port {port_text!r} (PORT, HOST:PORT or unix:PATH)") from None
    if not 0 <= port <= 65535:
        raise GdbAddressError(f"--gdb: port {port} is out of range 0..65535")
    addr = GdbAddress("tcp", host=host, port=port)
    if not addr.is_loopback and not allow_remote:
        raise GdbAddressError(
            f"--gdb {text}: not a loopback address; the stub has no authentication, "
            "add --gdb-allow-remote to listen there anyway"
        )
    return addr


# --- events the reader queues for the debugger -------------------------------------------


@dataclass(frozen=True)
class NewClient:
    pass


@dataclass(frozen=True)
class ClientGone:
    mid_packet: bool


class Connection:
    """One connected client: framing, acks, and a queue of decoded events."""

    def __init__(self, sock: socket.socket, events: queue.Queue, on_interrupt, on_gone):
        self.sock = sock
        self.events = events  # shared with the debugger: items are (connection, event)
        self.no_ack = False
        self.closed = False
        self._on_interrupt = on_interrupt
        self._on_gone = on_gone
        self._send_lock = threading.Lock()
        self._last: bytes | None = None
        self.bytes_in = 0
        self.thread = threading.Thread(target=self._read_loop, name="vmm-gdb-client", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def send(self, payload: bytes) -> None:
        """Frame and send one packet (a lost client is noticed by the reader)."""
        data = encode(payload)
        with self._send_lock:
            self._last = data
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def _raw(self, data: bytes) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _read_loop(self) -> None:
        framer = Framer()
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                self.bytes_in += len(data)
                for ev in framer.feed(data):
                    if isinstance(ev, Packet):
                        if not self.no_ack:
                            self._raw(b"+")
                        self.events.put((self, ev))
                    elif isinstance(ev, BadChecksum):
                        if not self.no_ack:
                            self._raw(b"-")  # gdb retransmits
                    elif isinstance(ev, (Malformed, Oversize)):
                        # Well framed but unusable: acknowledge it, answer E01.
                        if not self.no_ack:
                            self._raw(b"+")
                        self.events.put((self, ev))
                    elif isinstance(ev, Nack):
                        last = self._last
                        if last is not None:
                            self._raw(last)
                    elif isinstance(ev, Interrupt):
                        self._on_interrupt()
                    elif isinstance(ev, Ack):
                        pass
        finally:
            self.events.put((self, ClientGone(framer.mid_packet)))
            self._on_gone(self)


class GdbServer:
    """Listens on ``address``; queues ``(connection, NewClient())`` for each
    accepted client, then its events, refusing a second client while the
    first is connected. ``on_client`` is told too (it may kick the vCPU)."""

    def __init__(self, address: GdbAddress, events: queue.Queue, on_client, on_interrupt, say=lambda msg: None):
        self.address = address
        self.events = events
        self._on_client = on_client
        self._on_interrupt = on_interrupt
        self._say = say
        self.client: Connection | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.refused = 0
        if address.kind == "unix":
            self.sock = self._unix_socket(address.path)
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.sock.bind((address.host, address.port))
            except OSError as exc:
                self.sock.close()
                raise GdbAddressError(f"--gdb: cannot listen on {address}: {exc.strerror}") from None
            if address.port == 0:
                self.address = GdbAddress("tcp", host=address.host, port=self.sock.getsockname()[1])
        with removed_on_failure(self.sock, address.path if address.kind == "unix" else None):
            self.sock.listen(2)
            self._thread = threading.Thread(target=self._accept_loop, name="vmm-gdb-accept", daemon=True)
            self._thread.start()

    @staticmethod
    def _unix_socket(path: str) -> socket.socket:
        try:
            return bind_private(path, backlog=2)  # owner-only, stale sockets of ours replaced
        except SocketPathError as exc:
            raise GdbAddressError(f"--gdb: {exc}") from None

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _peer = self.sock.accept()
            except OSError:
                return
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # Replies are small and follow the '+' at once: without this,
                # Nagle holds the reply until the client's delayed ACK (~40 ms).
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                busy = self.client is not None
                if not busy:
                    self.client = client = Connection(conn, self.events, self._on_interrupt, self._gone)
            if busy:
                self.refused += 1
                self._say("gdb: refused a second client (one debugger at a time)")
                with contextlib.suppress(OSError):
                    conn.sendall(encode(b"E01"))
                conn.close()
                continue
            self.events.put((client, NewClient()))
            client.start()
            self._on_client(client)

    def _gone(self, conn: Connection) -> None:
        with self._lock:
            if self.client is conn:
                self.client = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close_listener(self.sock, self.address.path if self.address.kind == "unix" else None)
        client = self.client
        if client is not None:
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
