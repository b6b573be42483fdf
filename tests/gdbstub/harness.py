"""Running `vmm run --gdb` as a user does, a real gdb in batch mode against
it, and a bare protocol client for the bad-input tests."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmm.gdbstub.packets import Framer, Packet, encode

ROOT = Path(__file__).resolve().parents[2]
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (setup.sh installs it)")


class VmmProcess:
    """`python3 vmm.py run --gdb ...` in a child process; knows where it listens."""

    def __init__(self, kernel: Path, gdb: str, *args: str, wait: bool = True, timeout: float = 60.0):
        cmd = [sys.executable, str(ROOT / "vmm.py"), "run", "--kernel", str(kernel), "--gdb", gdb,
               "--timeout", str(timeout), *args]
        if wait:
            cmd.append("--gdb-wait")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        self.stderr: list[str] = []
        self.stdout = b""
        self._listening = threading.Event()
        self.address: str | None = None
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()
        if not self._listening.wait(30):
            self.proc.kill()
            raise AssertionError("vmm did not start its gdb stub:\n" + "".join(self.stderr))

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.stderr.append(line)
            m = re.search(r"gdb: listening on (\S+);", line)
            if m:
                addr = m.group(1)
                self.address = addr[5:] if addr.startswith("unix:") else addr
                self._listening.set()

    def _read_out(self) -> None:
        self.stdout = self.proc.stdout.read()

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            time.sleep(0.05)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def gdb_batch(kernel: Path, target: str, *commands: str, timeout: float = 90.0, interrupt_at: str | None = None,
              ) -> subprocess.CompletedProcess:
    """A stock gdb: load the kernel's symbols, attach, run ``commands``.
    ``interrupt_at``: once gdb has printed this line, wait a second and press
    Ctrl-C (SIGINT to gdb, which sends the stub its 0x03)."""
    args = [GDB, "-q", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off", str(kernel),
            "-ex", f"target remote {target}"]
    for c in commands:
        args += ["-ex", c]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    lines: list[bytes] = []

    def pump():
        for line in p.stdout:
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if interrupt_at is not None:
        deadline = time.monotonic() + timeout
        while not any(interrupt_at.encode() in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        p.send_signal(2)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    reader.join(5)
    return subprocess.CompletedProcess(args, p.returncode, b"".join(lines).decode(errors="replace"), "")


class RspClient:
    """A bare remote-protocol client: exact bytes in, packets out."""

    def __init__(self, address: str, timeout: float = 10.0):
        if address.startswith("/"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address)
        else:
            host, _, port = address.rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
        self.sock.settimeout(timeout)
        self.framer = Framer(limit=1 << 20)
        self.events: list = []

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self):
        while not self.events:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("stub closed the connection")
            self.events += self.framer.feed(data)
        return self.events.pop(0)

    def next_packet(self) -> bytes:
        while True:
            ev = self.next_event()
            if isinstance(ev, Packet):
                return ev.payload

    def ask(self, payload: bytes) -> bytes:
        self.raw(encode(payload))
        reply = self.next_packet()
        try:
            self.raw(b"+")
        except OSError:  # the stub closed after answering (detach)
            pass
        return reply

    def close(self) -> None:
        self.sock.close()
