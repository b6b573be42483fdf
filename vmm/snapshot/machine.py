"""Save a ``Vm`` to a snapshot file and start a ``Vm`` from one (the KVM side).

``save_vm`` may be called whenever the vCPU is not inside KVM_RUN: from a
report handler in the vCPU thread (the exit's I/O is completed first), after
the run loop stopped, or inside ``vm.paused()`` from another thread.
``open_snapshot`` reads and checks a file; ``RestoreSource`` is what
``Vm(..., restore=...)`` uses to fill RAM and the vCPU instead of booting.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import time
from dataclasses import dataclass

from ..abi import BootInfo, ReportKind
from ..boot import BootError, choose_slide
from ..layout import BOOT_INFO_PHYS
from ..memory import GuestMemory
from ..vm import Vm
from .elfcore import CoreFile, CoreFormatError
from .format import SnapshotError, SnapshotState, read_snapshot
from .save import kernel_sha256, write_snapshot
from .vcpu import apply, capture, complete_pending_io


def state_of(vm, saved_at: str) -> SnapshotState:
    """The guest's state now; completes the last exit's I/O first."""
    complete_pending_io(vm.vcpu)
    vcpu_state = capture(vm.vcpu, vm.kvm, vm.tsc_khz)
    inspect = {}
    for r in vm.reports.reports:
        if r.kind == ReportKind.INSPECT:
            inspect = dict(r.fields)
    prior = getattr(vm, "restored_from", None)
    meta = {
        "kernel_path": os.path.abspath(vm.image.path),
        "kernel_sha256": kernel_sha256(vm.image),
        "cmdline": prior.meta["cmdline"] if prior is not None else vm.config.cmdline,
        "kaslr_slide": vm.slide,
        "memory_size": vm.memory.size,
        "backend": vm.backend.name,
        "saved_at": saved_at,
        "memmap": vm.memmap.to_json(),
        "tsc_khz": vm.tsc_khz,
        "protect_kernel": bool(vm.protected),
        "read_only_slots": [[a, b - a] for a, b in vm.protected],
        "serial_offset": vm.uart.total_bytes + (prior.meta.get("serial_offset", 0) if prior is not None else 0),
        "inspect": inspect or dict(getattr(vm, "inherited_inspect", None) or {}),
        "wall_time": time.time(),
        # What offline inspection needs to label and walk like a live view.
        "segments": [[s.vaddr + vm.slide, s.vaddr + vm.slide + s.memsz, s.perms] for s in vm.image.segments],
        "maxphyaddr": vm.cpu_features.maxphyaddr,
        "gbpages": vm.cpu_features.gbpages,
    }
    boot_info = vm.memory.read_cstruct(BOOT_INFO_PHYS, BootInfo)
    return SnapshotState(vcpu=vcpu_state, meta=meta, boot_info=boot_info)


def save_vm(vm, path: str, saved_at: str, layout: str = "compact") -> dict:
    """Save ``vm`` to ``path`` atomically; returns the writer's figures."""
    t0 = time.perf_counter_ns()
    state = state_of(vm, saved_at)
    t1 = time.perf_counter_ns()
    try:
        out = write_snapshot(path, vm.memory, state, layout)
    except OSError as exc:
        raise SnapshotError(f"cannot save snapshot to {path}: {exc.strerror or exc}") from None
    out["state_ms"] = (t1 - t0) / 1e6
    out["serial_offset"] = state.meta["serial_offset"]
    return out


def save_vm_paused(vm, path: str, saved_at: str = "socket", layout: str = "compact") -> dict:
    """Save a running guest with the vCPU parked only for the state and a
    copy of its touched RAM (a memfd-to-memfd copy of the allocated extents,
    milliseconds for a small guest); scanning and writing the file happen
    after the guest runs again."""
    with vm.paused() as parked:
        if vm.running and not parked:
            raise SnapshotError("could not park the vCPU to save it")
        t0 = time.perf_counter_ns()
        state = state_of(vm, saved_at)
        copy = GuestMemory(vm.memory.size)
        try:
            for start, size in vm.memory.allocated_extents():
                C.memmove(copy.host_address + start, vm.memory.host_address + start, size)
        except BaseException:
            copy.close()
            raise
        pause_ms = (time.perf_counter_ns() - t0) / 1e6
    try:
        try:
            out = write_snapshot(path, copy, state, layout)
        except OSError as exc:
            raise SnapshotError(f"cannot save snapshot to {path}: {exc.strerror or exc}") from None
    finally:
        copy.close()
    out["pause_ms"] = pause_ms
    out["serial_offset"] = state.meta["serial_offset"]
    return out


@dataclass
class LoadedSnapshot:
    """A checked snapshot file: its segments, typed state and an open fd."""

    path: str
    fd: int
    core: CoreFile
    state: SnapshotState

    @property
    def meta(self) -> dict:
        return self.state.meta

    @property
    def memory_size(self) -> int:
        return self.state.memory_size

    @property
    def slide(self) -> int:
        return int(self.meta["kaslr_slide"])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "LoadedSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fill(self, memory: GuestMemory) -> None:
        """Copy every stored segment into fresh (all-zero) guest RAM."""
        for ld in self.core.loads:
            if not memory.contains(ld.paddr, ld.size):  # read_core checked; belt and braces
                raise SnapshotError(f"segment {ld.paddr:#x}+{ld.size:#x} lies outside guest RAM")
            for off, n in _data_extents(self.fd, ld.offset, ld.size):
                _copy_file_to_memory(self.fd, off, memory, ld.paddr + (off - ld.offset), n)


def _data_extents(fd: int, offset: int, size: int) -> list[tuple[int, int]]:
    """(offset, size) pieces of [offset, offset + size) that hold data: holes
    of a sparse file are skipped (they read as zero, and so is fresh RAM)."""
    out, pos, end = [], offset, offset + size
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return [(offset, size)]  # no SEEK_DATA on this filesystem: copy it all
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start, stop - start))
        pos = stop
    return out


def _copy_file_to_memory(fd: int, offset: int, memory: GuestMemory, paddr: int, size: int) -> None:
    if memory.fd is not None:
        # sendfile into the memfd: the kernel copies page cache to shmem with
        # no page fault per page in this process.
        os.lseek(memory.fd, paddr, os.SEEK_SET)
        done = 0
        try:
            while done < size:
                n = os.sendfile(memory.fd, fd, offset + done, size - done)
                if n == 0:
                    raise SnapshotError("snapshot file ended early (truncated while reading?)")
                done += n
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or done:
                raise SnapshotError(f"cannot read snapshot data: {exc.strerror}") from None
    view = memory.view(paddr, size)
    got = os.preadv(fd, [view], offset)
    if got != size:
        raise SnapshotError("snapshot file ended early (truncated while reading?)")


def open_snapshot(path: str) -> LoadedSnapshot:
    """Open, parse and check a snapshot (not yet against a kernel)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path}: no such file") from None
    except IsADirectoryError:
        raise SnapshotError(f"snapshot {path}: is a directory") from None
    except OSError as exc:
        raise SnapshotError(f"snapshot {path}: cannot open ({exc.strerror})") from None
    try:
        try:
            core, state = read_snapshot(fd)
        except CoreFormatError as exc:
            raise SnapshotError(f"snapshot {path}: {exc}") from None
        except IsADirectoryError:
            raise SnapshotError(f"snapshot {path}: is a directory") from None
        except OSError as exc:
            raise SnapshotError(f"snapshot {path}: cannot read ({exc.strerror})") from None
    except BaseException:
        os.close(fd)
        raise
    return LoadedSnapshot(path, fd, core, state)


def check_compatible(snap: LoadedSnapshot, image, *, memory: int | None, kernel_mismatch_ok: bool = False) -> None:
    """Refuse to resume a snapshot on a different kernel or RAM size."""
    want = snap.meta["kernel_sha256"]
    have = kernel_sha256(image)
    if want != have and not kernel_mismatch_ok:
        raise SnapshotError(
            f"snapshot {snap.path} was saved with kernel sha256 {want[:16]}... ({snap.meta['kernel_path']}), "
            f"{image.path} has {have[:16]}... (--kernel-mismatch-ok to resume anyway)"
        )
    if memory is not None and memory != snap.memory_size:
        raise SnapshotError(
            f"snapshot {snap.path} has {snap.memory_size >> 20} MiB of RAM, --memory asks for {memory >> 20} MiB"
        )
    try:
        choose_slide(image, snap.slide)
    except BootError as exc:
        raise SnapshotError(f"snapshot {snap.path}: KASLR slide {snap.slide:#x} is not valid for this kernel ({exc})") from None


class RestoreSource:
    """How ``Vm`` starts from a snapshot instead of a cold boot."""

    def __init__(self, snap: LoadedSnapshot):
        self.snap = snap
        self.meta = snap.meta
        self.slide = snap.slide
        self.inspect_fields = {str(k): str(v) for k, v in dict(self.meta.get("inspect") or {}).items()}

    def make_memory(self, config) -> GuestMemory:
        if config.memory != self.snap.memory_size:
            raise SnapshotError(
                f"snapshot has {self.snap.memory_size >> 20} MiB of RAM, the VM {config.memory >> 20} MiB"
            )
        memory = GuestMemory(self.snap.memory_size, shared=config.shared_memory)
        try:
            self.snap.fill(memory)
        except BaseException:
            memory.close()
            raise
        return memory

    def load_vcpu(self, vcpu) -> None:
        apply(vcpu, self.snap.state.vcpu)

    def take_machine(self, config):
        """A machine prepared ahead for ``config`` (``vmm.vm_builder.Machine``
        without its vCPU state), or None: a file is loaded once, so none."""
        return None


def restore_vm(snap: LoadedSnapshot, image, config, **vm_kwargs):
    """A ``Vm`` that resumes ``snap`` (checked with ``check_compatible`` first)."""
    config.memory = snap.memory_size
    config.slide = snap.slide
    return Vm(image, config, restore=RestoreSource(snap), **vm_kwargs)

