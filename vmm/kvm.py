"""Safe KVM layer: one owner object per file descriptor.

``Kvm`` owns /dev/kvm, ``VmFd`` a VM, ``VcpuFd`` a vCPU and its mmapped
``kvm_run``. Each is a context manager and closes deterministically; methods
are named after the ioctl they issue (``get_regs`` for KVM_GET_REGS).
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import functools
import mmap
import os
from time import perf_counter_ns as _clock
from collections.abc import Callable
from typing import Any

from . import exits as X
from . import kvm_abi as K
from .errors import HostError

# The coalesced ring's head {first, last} and one entry {addr, len, pio, data[8]}.
_RING_HEAD, _ = K.unpacker((0, K.kvm_coalesced_mmio_ring))
_RING_ENTRY, _ = K.unpacker((0, K.kvm_coalesced_mmio))
_RING_ENTRY_SIZE = C.sizeof(K.kvm_coalesced_mmio)
_RING_FIRST = K.kvm_coalesced_mmio_ring.first.offset
_U32 = C.c_uint32
# kvm_run.s as struct kvm_sync_regs: kvm_regs, kvm_sregs, kvm_vcpu_events, packed one after the other.
_SYNC_AT = K.kvm_run.s.offset
_SYNC_REGS_SIZE, _SYNC_SREGS_SIZE = C.sizeof(K.kvm_regs), C.sizeof(K.kvm_sregs)
_SYNC_EVENTS_SIZE = C.sizeof(K.kvm_vcpu_events)
_SYNC_ALL = K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS | K.KVM_SYNC_X86_EVENTS
_SYNC_IMAGE_SIZE = _SYNC_REGS_SIZE + _SYNC_SREGS_SIZE + _SYNC_EVENTS_SIZE


def sync_image(regs: K.kvm_regs, sregs: K.kvm_sregs, events: K.kvm_vcpu_events) -> bytes:
    """regs, sregs and events as they sit at the start of kvm_run.s
    (struct kvm_sync_regs), for ``VcpuFd.load_synced_image``."""
    return bytes(regs) + bytes(sregs) + bytes(events)


class KvmError(OSError, HostError):
    """An ioctl on a KVM file descriptor failed (errno and ioctl name kept)."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


class KvmUnavailable(KvmError):
    """/dev/kvm is missing or not usable by this process."""


def _ioctl(fd: int, request: int, arg: Any = 0, what: str = "ioctl") -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise KvmError(exc.errno or errno.EIO, what) from None


class MsrRefused(KvmError):
    """KVM_SET_MSRS set the MSRs before ``position`` and refused the one there."""

    def __init__(self, index: int, value: int, position: int):
        super().__init__(errno.EINVAL, f"KVM_SET_MSRS refused MSR {index:#x} = {value:#x}")
        self.index, self.value, self.position = index, value, position


def msr_batch(values: dict[int, int]) -> C.Structure:
    """A ``kvm_msrs`` buffer holding ``values`` (index -> value), for
    :meth:`VcpuFd.set_msrs`."""
    batch = K.kvm_msrs_with(len(values))()
    batch.nmsrs = len(values)
    for entry, (index, value) in zip(batch.entries, values.items()):
        entry.index, entry.data = index, value
    return batch


class _FdOwner:
    _fd: int | None

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    def prepared(self, request: int, arg: Any) -> Callable[[], int]:
        """The ioctl ``request`` with ``arg`` (kept alive here) as a call of
        no arguments: ``fcntl.ioctl`` itself, no layer of ours, so a failure
        is a plain ``OSError``. For ioctls repeated with the same argument
        on a hot path (a reset in place, right after KVM_RUN, when each
        Python frame and argument built costs cache misses). Nothing pending
        in kvm_run is applied first (``VcpuFd.load_synced``): a caller that
        loads synced registers does so after these."""
        return functools.partial(fcntl.ioctl, self.fd, request, arg)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; callers should close()
        try:
            self.close()
        except Exception:
            pass


class Kvm(_FdOwner):
    """The KVM system file descriptor (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self._fd = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(errno.ENOENT, f"{path} does not exist (is the kvm module loaded?)") from None
        except PermissionError:
            raise KvmUnavailable(errno.EACCES, f"{path} is not accessible (add yourself to the kvm group)") from None
        except OSError as exc:
            raise KvmUnavailable(exc.errno or errno.EIO, f"cannot open {path}") from None
        version = self.get_api_version()
        if version != K.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(errno.EINVAL, f"KVM API version {version}, expected {K.KVM_API_VERSION}")

    def get_api_version(self) -> int:
        return _ioctl(self.fd, K.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self, max_entries: int = 256) -> C.Structure:
        """The kvm_cpuid2 (header plus entries) that KVM supports on this host."""
        buf = K.kvm_cpuid2_with(max_entries)()
        buf.nent = max_entries
        _ioctl(self.fd, K.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        return buf

    def get_msr_index_list(self) -> list[int]:
        """MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        n = 64
        while True:
            buf = K.kvm_msr_list_with(n)()
            buf.nmsrs = n
            try:
                _ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 1 << 16:  # nmsrs now holds the count needed
                    n = max(n * 2, buf.nmsrs)
                    continue
                raise
            return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> "VmFd":
        fd = _ioctl(self.fd, K.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return VmFd(fd, self)


class VmFd(_FdOwner):
    """A VM file descriptor."""

    def __init__(self, fd: int, kvm: Kvm):
        self._fd = fd
        self.kvm = kvm

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = K.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        _ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, K.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def get_dirty_log(self, slot: int, bitmap: C.Array) -> None:
        _ioctl(self.fd, K.KVM_GET_DIRTY_LOG, self.dirty_log_arg(slot, bitmap), "KVM_GET_DIRTY_LOG")

    @staticmethod
    def dirty_log_arg(slot: int, bitmap: C.Array) -> K.kvm_dirty_log:
        """KVM_GET_DIRTY_LOG's argument: ``slot``'s log goes into ``bitmap``
        (which must outlive it: KVM is given its address)."""
        return K.kvm_dirty_log(slot=slot, dirty_bitmap=C.addressof(bitmap))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: C.Array) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again (and clear in the log) the
        pages of ``slot`` whose bits are set in ``bitmap``, bit 0 being
        ``first_page`` (a multiple of 64; ``num_pages`` too, unless the range
        ends at the end of the slot). Only with MANUAL_DIRTY_LOG_PROTECT2 on."""
        log = K.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                    dirty_bitmap=C.addressof(bitmap))
        _ioctl(self.fd, K.KVM_CLEAR_DIRTY_LOG, log, "KVM_CLEAR_DIRTY_LOG")

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        req = K.kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            req.args[i] = value
        _ioctl(self.fd, K.KVM_ENABLE_CAP, req, f"KVM_ENABLE_CAP({cap})")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def syncs_regs(self, fields: int) -> bool:
        """Does KVM_CAP_SYNC_REGS cover every KVM_SYNC_X86_* field in ``fields``
        (KVM then stores them in kvm_run at exits, or loads them at KVM_RUN)?"""
        return self.check_extension(K.KVM_CAP_SYNC_REGS) & fields == fields

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """Buffer guest writes to ``[port, port+size)`` in the vCPU's coalesced
        ring instead of exiting for each (KVM_CAP_COALESCED_PIO)."""
        zone = K.kvm_coalesced_mmio_zone(addr=port, size=size, pio=1)
        _ioctl(self.fd, K.KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def get_stats_fd(self) -> int:
        return _ioctl(self.fd, K.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def create_vcpu(self, vcpu_id: int = 0) -> "VcpuFd":
        fd = _ioctl(self.fd, K.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return VcpuFd(fd, self.kvm.get_vcpu_mmap_size())


class VcpuFd(_FdOwner):
    """A vCPU file descriptor and its shared ``kvm_run`` page."""

    def __init__(self, fd: int, mmap_size: int):
        self._fd = fd
        self._map: mmap.mmap | None = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = K.kvm_run.from_buffer(self._map)
        # Address of kvm_run for data_offset access without extra copies.
        self.run_address = C.addressof(self.run_struct)
        self.mmap_size = mmap_size
        self._ring: int | None = None
        # KVM_RUN once, then the exit decoded (vmm.exits): one call per exit.
        # An int argument: fcntl passes it straight through.
        self._enter = functools.partial(fcntl.ioctl, fd, K.KVM_RUN, 0)
        self.run: Callable[[], X.Exit] = X.decoder_for(self._map, self._enter)
        #: ``run`` that adds the time inside KVM_RUN (decoding excluded) to
        #: ``ns_in_kvm_run``: the rest of a run loop's time is its own.
        self.run_profiled: Callable[[], X.Exit] = X.decoder_for(self._map, self._timed_enter)
        self.ns_in_kvm_run = 0
        self._only_runnable: bool | None = None  # only_runnable(), asked once

    @property
    def run_buffer(self) -> mmap.mmap:
        """The shared kvm_run mapping itself (what ``exits.decode`` reads)."""
        if self._map is None:
            raise ValueError("VcpuFd is closed")
        return self._map

    def coalesced_ring_offset(self) -> int | None:
        """Offset of the coalesced-I/O ring in this vCPU's mmap, or None if the
        mapping has no ring page (the ring: ``kvm_coalesced_mmio_ring`` then
        ``KVM_COALESCED_MMIO_MAX`` entries)."""
        off = K.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        need = C.sizeof(K.kvm_coalesced_mmio_ring) + K.KVM_COALESCED_MMIO_MAX * C.sizeof(K.kvm_coalesced_mmio)
        return off if self.mmap_size >= off + need else None

    def use_coalesced_ring(self) -> int | None:
        """Have ``take_coalesced`` read the ring (after the VM registered a
        coalesced zone); its offset, or None if this mapping has no ring."""
        self._ring = self.coalesced_ring_offset()
        return self._ring

    def take_coalesced(self) -> list[tuple[int, bytes]]:
        """The writes KVM buffered in the coalesced ring since the last call,
        oldest first, as (port or address, data); consumed, so KVM may reuse
        the slots. Empty when nothing is buffered or the ring is not in use."""
        off, run_map = self._ring, self._map
        if off is None:
            return []
        first, last = _RING_HEAD.unpack_from(run_map, off)
        if first == last:
            return []
        out = []
        base = off + _RING_HEAD.size
        while first != last:
            addr, n, _pio, data = _RING_ENTRY.unpack_from(run_map, base + first * _RING_ENTRY_SIZE)
            out.append((addr, data[: min(n, 8)]))
            first = (first + 1) % K.KVM_COALESCED_MMIO_MAX
        _U32.from_buffer(run_map, off + _RING_FIRST).value = first
        return out

    def close(self) -> None:
        # Drop the ctypes view before closing the mmap it points into.
        self.run_struct = None  # type: ignore[assignment]
        self.run = self.run_profiled = None  # type: ignore[assignment]
        if self._map is not None:
            self._map.close()
            self._map = None
        super().close()

    def _timed_enter(self) -> None:
        t = _clock()
        try:
            self._enter()
        finally:
            self.ns_in_kvm_run += _clock() - t

    def complete_io_in(self, ex: X.IoIn, data: bytes) -> None:
        """Put the answer to an IN where KVM takes it from on the next KVM_RUN
        (``data_offset`` in the mapping)."""
        end = ex.data_offset + len(data)
        if end <= len(self._map):
            self._map[ex.data_offset : end] = data

    def request_sync_regs(self, fields: int) -> None:
        """Ask KVM to store ``fields`` (KVM_SYNC_X86_*) in kvm_run at every exit
        from now on (``kvm_valid_regs``, KVM_CAP_SYNC_REGS; 0 stops it). KVM
        reads it when KVM_RUN returns, so another thread may set it."""
        self.run_struct.kvm_valid_regs = fields

    def sync_regs(self) -> tuple[K.kvm_regs, K.kvm_sregs]:
        """The registers KVM stored in kvm_run at the last exit, as asked with
        ``request_sync_regs(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)``: copies,
        no ioctl."""
        return (K.kvm_regs.from_buffer_copy(self._map, _SYNC_AT),
                K.kvm_sregs.from_buffer_copy(self._map, _SYNC_AT + _SYNC_REGS_SIZE))

    # --- state handed to KVM_RUN (KVM_CAP_SYNC_REGS) -------------------------------------
    def load_synced(self, regs: K.kvm_regs, sregs: K.kvm_sregs, events: K.kvm_vcpu_events) -> None:
        """Have KVM load ``regs``, ``sregs`` and ``events`` as the next KVM_RUN
        enters, in that order, from kvm_run.s (``kvm_dirty_regs``,
        KVM_CAP_SYNC_REGS; the caller checked the capability): the same
        __set_regs/__set_sregs/set_vcpu_events as their ioctls, without
        three vCPU ioctls of their own (each a vcpu_load/put, about 5 us on
        KVM-PVM). Until then they are pending: every other vCPU ioctl here
        applies them by ioctl first, so nothing reads the old state or
        writes a value they would then overwrite."""
        self.load_synced_image(sync_image(regs, sregs, events))

    def load_synced_image(self, image: bytes) -> None:
        """``load_synced`` of the bytes ``sync_image`` made of them (one copy
        into kvm_run: a reset loads the same image every time)."""
        if len(image) != _SYNC_IMAGE_SIZE:
            raise ValueError(f"a sync image is {_SYNC_IMAGE_SIZE} bytes, not {len(image)}")
        self._map[_SYNC_AT : _SYNC_AT + _SYNC_IMAGE_SIZE] = image
        self.run_struct.kvm_dirty_regs = _SYNC_ALL

    def _apply_synced(self) -> None:
        """Load what ``load_synced`` left pending now, by ioctl (order as KVM's sync_regs)."""
        run = self.run_struct
        pending, run.kvm_dirty_regs = run.kvm_dirty_regs, 0
        at = _SYNC_AT
        if pending & K.KVM_SYNC_X86_REGS:
            _ioctl(self.fd, K.KVM_SET_REGS, K.kvm_regs.from_buffer_copy(self._map, at), "KVM_SET_REGS")
        at += _SYNC_REGS_SIZE
        if pending & K.KVM_SYNC_X86_SREGS:
            _ioctl(self.fd, K.KVM_SET_SREGS, K.kvm_sregs.from_buffer_copy(self._map, at), "KVM_SET_SREGS")
        at += _SYNC_SREGS_SIZE
        if pending & K.KVM_SYNC_X86_EVENTS:
            _ioctl(self.fd, K.KVM_SET_VCPU_EVENTS, K.kvm_vcpu_events.from_buffer_copy(self._map, at),
                   "KVM_SET_VCPU_EVENTS")

    def _vcpu_ioctl(self, request: int, arg: Any, what: str) -> int:
        # No view of the kvm_run mapping in a local here: a KvmError's
        # traceback keeps this frame, and the view would keep close() from
        # unmapping (BufferError) for as long as the error is kept.
        if self.run_struct is not None and self.run_struct.kvm_dirty_regs:
            self._apply_synced()
        return _ioctl(self.fd, request, arg, what)

    def get_regs(self) -> K.kvm_regs:
        regs = K.kvm_regs()
        self._vcpu_ioctl(K.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: K.kvm_regs) -> None:
        self._vcpu_ioctl(K.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> K.kvm_sregs:
        sregs = K.kvm_sregs()
        self._vcpu_ioctl(K.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: K.kvm_sregs) -> None:
        self._vcpu_ioctl(K.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid2(self, cpuid: C.Structure) -> None:
        """Set CPUID from a kvm_cpuid2 buffer (as get_supported_cpuid returns)."""
        self._vcpu_ioctl(K.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def translate(self, linear_address: int) -> K.kvm_translation:
        """KVM_TRANSLATE. Not for observing a guest: it walks like the CPU and
        sets Accessed bits in the guest's tables, accepts non-canonical
        addresses and, on PVM, always answers writeable=1, usermode=0
        (shared/HOST.md). Observers use ``mm.walker`` on guest RAM instead."""
        tr = K.kvm_translation(linear_address=linear_address)
        self._vcpu_ioctl(K.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = K.kvm_msrs_with(len(indices))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = self._vcpu_ioctl(K.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int] | C.Structure) -> None:
        """KVM_SET_MSRS of ``msrs``: values by index, or a batch from
        :func:`msr_batch` (built once, set again and again: a VM reset).

        KVM returns how many MSRs it set and stops at the first one it
        refuses, so fewer than all is an error naming that MSR
        (:class:`MsrRefused`).
        """
        batch = msrs if isinstance(msrs, C.Structure) else msr_batch(msrs)
        n = self._vcpu_ioctl(K.KVM_SET_MSRS, batch, "KVM_SET_MSRS")
        if n != batch.nmsrs:
            refused = batch.entries[n]
            raise MsrRefused(refused.index, refused.data, n)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        dbg = K.kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = value
        self._vcpu_ioctl(K.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")

    def get_tsc_khz(self) -> int:
        return self._vcpu_ioctl(K.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    # --- the rest of the vCPU's state (snapshots) ------------------------------------
    def _get(self, request: int, ctype: type, what: str):
        value = ctype()
        self._vcpu_ioctl(request, value, what)
        return value

    def get_vcpu_events(self) -> K.kvm_vcpu_events:
        return self._get(K.KVM_GET_VCPU_EVENTS, K.kvm_vcpu_events, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: K.kvm_vcpu_events) -> None:
        self._vcpu_ioctl(K.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> K.kvm_debugregs:
        return self._get(K.KVM_GET_DEBUGREGS, K.kvm_debugregs, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, regs: K.kvm_debugregs) -> None:
        self._vcpu_ioctl(K.KVM_SET_DEBUGREGS, regs, "KVM_SET_DEBUGREGS")

    def get_xsave(self) -> K.kvm_xsave:
        return self._get(K.KVM_GET_XSAVE, K.kvm_xsave, "KVM_GET_XSAVE")

    def set_xsave(self, xsave: K.kvm_xsave) -> None:
        self._vcpu_ioctl(K.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> K.kvm_xcrs:
        return self._get(K.KVM_GET_XCRS, K.kvm_xcrs, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: K.kvm_xcrs) -> None:
        self._vcpu_ioctl(K.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_mp_state(self) -> K.kvm_mp_state:
        return self._get(K.KVM_GET_MP_STATE, K.kvm_mp_state, "KVM_GET_MP_STATE")

    def set_mp_state(self, state: K.kvm_mp_state) -> None:
        self._vcpu_ioctl(K.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def only_runnable(self) -> bool:
        """Whether KVM keeps this vCPU RUNNABLE whatever the guest does, so
        that loading a RUNNABLE MP state again is a no-op; asked of KVM once.

        That is the case without a local APIC in the kernel (this VMM creates
        no irqchip): HLT then exits to user space (KVM_EXIT_HLT) instead of
        setting HALTED (x86.c, __kvm_emulate_halt), INIT and SIPI need the
        in-kernel APIC, and KVM_SET_MP_STATE refuses every state but RUNNABLE
        with EINVAL (kvm_arch_vcpu_ioctl_set_mpstate). The question asked is
        that last check: set HALTED. Refused: only RUNNABLE. Accepted (an
        in-kernel APIC): the state read before is put back, and the answer is no.
        """
        if self._only_runnable is None:
            before = self.get_mp_state()
            try:
                self.set_mp_state(K.kvm_mp_state(mp_state=K.KVM_MP_STATE_HALTED))
            except KvmError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._only_runnable = True
            else:
                self.set_mp_state(before)
                self._only_runnable = False
        return self._only_runnable
