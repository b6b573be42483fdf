"""Writer of the Linux initramfs format: cpio "newc" (SVR4, no CRC).

The kernel unpacks one or more such archives, concatenated and each
optionally compressed, into its tmpfs root before running /init
(Documentation/driver-api/early-userspace/buffer-format.rst). Only what the
kernel's unpacker reads is written: directories, regular files and symlinks,
with mode, mtime and size; owners are root. Parents must come before their
children: the kernel creates each entry with a plain open()/mkdir().
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n & 3)


class CpioWriter:
    """Appends newc entries to a binary stream; `close()` writes the trailer."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._ino = 1
        self._pos = 0
        self.names: set[str] = set()

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._pos += len(data)

    def _entry(self, name: str, mode: int, data: bytes = b"", mtime: int = 0, nlink: int = 1) -> None:
        name = name.lstrip("/") or "."
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, int(mtime) & 0xFFFFFFFF, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._ino += 1
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header + encoded)
        self._write(_pad4(len(header) + len(encoded)))
        if data:
            self._write(data)
            self._write(_pad4(len(data)))
        self.names.add(name)

    def directory(self, name: str, mode: int = 0o755, mtime: int = 0) -> None:
        if name.lstrip("/") not in self.names:
            self._entry(name, stat.S_IFDIR | mode, mtime=mtime, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data, mtime)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def close(self) -> None:
        self._entry(TRAILER, 0)
        self._write(_pad4(self._pos))  # the kernel accepts any padding; keep the next archive 4-aligned
