"""Save a stopped guest to an ELF core file, atomically.

The file appears under its name complete or not at all: it is written to a
temporary file in the same directory (O_TMPFILE when the filesystem has it,
so not even a name exists until the end), fsync'd, then linked/renamed into
place. A failure, a full disk or Ctrl-C at any point leaves nothing behind.

Only pages that are not all zero are stored. On a memfd the kernel already
knows which pages were never touched (SEEK_DATA/SEEK_HOLE), so a 64 GiB guest
that touched 5 MiB costs a scan of 5 MiB, not 64 GiB.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time


from ..layout import PHYS_OFFSET
from .elfcore import PAGE, merge_runs, write_core
from .format import FORMAT_VERSION, SnapshotState, encode_state

def _copier(memory):
    """How guest RAM gets into the file: sendfile from the memfd (no copy
    through Python), else pwrite from the mapping."""

    def by_pwrite(out_fd: int, offset: int, paddr: int, size: int) -> None:
        view = memory.view(paddr, size)
        while view:
            n = os.pwrite(out_fd, view, offset)
            view, offset = view[n:], offset + n

    if memory.fd is None:
        return by_pwrite

    def by_sendfile(out_fd: int, offset: int, paddr: int, size: int) -> None:
        os.lseek(out_fd, offset, os.SEEK_SET)
        done = 0
        while done < size:
            try:
                n = os.sendfile(out_fd, memory.fd, paddr + done, size - done)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOSYS) and done == 0:
                    return by_pwrite(out_fd, offset, paddr, size)
                raise
            if n == 0:
                raise OSError(errno.EIO, "sendfile wrote nothing")
            done += n

    return by_sendfile


def atomic_write(path: str, write) -> None:
    """Call ``write(fd)`` on a temporary file and move it to ``path`` only if
    it returns; on any exception (KeyboardInterrupt included) remove it."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    tmp = None
    fd = None
    try:
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        write(fd)
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
        tmp = None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def kernel_sha256(image) -> str:
    digest = getattr(image, "_sha256", None)
    if digest is None:
        digest = hashlib.sha256(image.data).hexdigest()
        try:
            image._sha256 = digest
        except AttributeError:
            pass
    return digest


LAYOUTS = ("compact", "sparse")


def _sparse_copier(copy, runs: list[tuple[int, int]]):
    """Copy only the non-zero runs inside a segment; the rest stays a hole."""

    def copy_runs(fd: int, offset: int, paddr: int, size: int) -> None:
        for a, n in runs:
            lo, hi = max(a, paddr), min(a + n, paddr + size)
            if lo < hi:
                copy(fd, offset + (lo - paddr), lo, hi - lo)

    return copy_runs


def write_snapshot(path: str, memory, state: SnapshotState, layout: str = "compact") -> dict:
    """Write ``state`` and the non-zero pages of ``memory`` to ``path``.

    ``compact``: one PT_LOAD per run of non-zero pages, back to back (the
    file is as small as the touched RAM). ``sparse``: one PT_LOAD over all
    of RAM whose zero pages are holes in a sparse file (as small on disk, RAM
    sized for ``ls``); tools that only believe in pages present in a segment
    (Volatility's ELF layer) then see every page of RAM, zero ones included.
    Returns figures: runs, stored bytes, file size, time in ms."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    t0 = time.perf_counter_ns()
    runs = merge_runs([(first * PAGE, n * PAGE) for first, n in memory.nonzero_runs()])
    t1 = time.perf_counter_ns()
    notes = encode_state(state)
    copy = _copier(memory)
    if layout == "sparse":
        segments, copy = [(0, memory.size)], _sparse_copier(copy, runs)
    else:
        segments = runs
    loads = []

    def write(fd: int) -> None:
        loads.extend(write_core(fd, notes, segments, copy, vaddr_base=PHYS_OFFSET))

    atomic_write(path, write)
    t2 = time.perf_counter_ns()
    st = os.stat(path)
    return {
        "path": path,
        "layout": layout,
        "format_version": FORMAT_VERSION,
        "segments": len(loads),
        "stored_bytes": sum(n for _, n in runs),
        "file_bytes": st.st_size,
        "disk_bytes": st.st_blocks * 512,
        "scan_ms": (t1 - t0) / 1e6,
        "save_ms": (t2 - t0) / 1e6,
    }
