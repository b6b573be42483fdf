"""Read and write a vCPU's whole state through KVM (the ioctls, nothing else).

Order matters on the way back in (the order QEMU and Firecracker use):
regs, XSAVE, XCRs, sregs, MSRs (IA32_TSC among them), events, debug
registers, MP state. sregs before MSRs because EFER is in both and the MSR
write of EFER is checked against CR0/CR4; events last but one because
setting sregs can clear a pending exception.
"""

from __future__ import annotations

import errno

from .. import kvm_abi as K
from ..kvm import KvmError, MsrRefused, VcpuFd, msr_batch, sync_image
from .format import VcpuState

MSR_IA32_TSC = 0x10

_MSR_INDEX_CACHE: dict[int, list[int]] = {}


def msr_indices(kvm) -> list[int]:
    """The MSRs KVM says a VMM must save (KVM_GET_MSR_INDEX_LIST), asked once."""
    key = id(type(kvm))
    if key not in _MSR_INDEX_CACHE:
        _MSR_INDEX_CACHE[key] = kvm.get_msr_index_list()
    return _MSR_INDEX_CACHE[key]


def complete_pending_io(vcpu: VcpuFd) -> None:
    """Finish the I/O the last exit reported, without running guest code.

    After an IN/OUT/MMIO exit the instruction is only complete (RIP past it,
    an IN's data in RAX) once KVM_RUN is entered again. KVM's documented way
    to get there without executing guest code: KVM_RUN with immediate_exit
    set, which completes the operation and returns EINTR.
    """
    run = vcpu.run_struct
    run.immediate_exit = 1
    try:
        vcpu.run()  # exits.Interrupted (EINTR): the operation is complete
    finally:
        run.immediate_exit = 0


def read_msrs(vcpu: VcpuFd, indices: list[int]) -> dict[int, int]:
    msrs = vcpu.get_msrs(indices)
    if len(msrs) != len(indices):  # KVM stops at the first MSR it cannot read: go one by one
        msrs = {}
        for idx in indices:
            try:
                msrs.update(vcpu.get_msrs([idx]))
            except KvmError:
                pass
    return msrs


def capture(vcpu: VcpuFd, kvm, tsc_khz: int) -> VcpuState:
    """The vCPU's state now (call with the vCPU stopped and its I/O completed)."""
    msrs = read_msrs(vcpu, msr_indices(kvm))
    state = VcpuState(
        regs=vcpu.get_regs(),
        sregs=vcpu.get_sregs(),
        msrs=msrs,
        tsc=msrs.get(MSR_IA32_TSC, 0),
        tsc_khz=tsc_khz,
    )
    for attr, getter in (
        ("xsave", vcpu.get_xsave), ("xcrs", vcpu.get_xcrs), ("events", vcpu.get_vcpu_events),
        ("debugregs", vcpu.get_debugregs), ("mp_state", vcpu.get_mp_state),
    ):
        try:
            setattr(state, attr, getter())
        except KvmError:
            pass  # not supported here: the note is simply absent
    return state


def apply(vcpu: VcpuFd, state: VcpuState) -> None:
    """Load ``state`` into a vCPU (CPUID must already be set)."""
    vcpu.set_regs(state.regs)
    if state.xsave is not None:
        vcpu.set_xsave(state.xsave)
    if state.xcrs is not None:
        vcpu.set_xcrs(state.xcrs)
    vcpu.set_sregs(state.sregs)
    if state.msrs:
        # Only what differs from a fresh vCPU: KVM refuses writes to some MSRs
        # it lists (KVM's own paravirtual MSRs without the CPUID bits that
        # enable them), even of the value they already hold.
        fresh = read_msrs(vcpu, list(state.msrs))
        changed = {i: v for i, v in state.msrs.items() if fresh.get(i) != v}
        if changed:
            vcpu.set_msrs(changed)
    if state.events is not None:
        ev = K.kvm_vcpu_events.from_buffer_copy(bytes(state.events))
        # Say which optional fields are meant (NMI pending, interrupt shadow);
        # SMM and SIPI are not used by this guest and left as KVM has them.
        ev.flags &= K.KVM_VCPUEVENT_VALID_NMI_PENDING | K.KVM_VCPUEVENT_VALID_SHADOW | K.KVM_VCPUEVENT_VALID_PAYLOAD
        vcpu.set_vcpu_events(ev)
    if state.debugregs is not None:
        vcpu.set_debugregs(state.debugregs)
    if state.mp_state is not None:
        vcpu.set_mp_state(state.mp_state)


class FastLoader:
    """``apply`` for the same state again and again (a VM reset in place):
    the MSR batch is built once, leaving out the MSRs KVM refuses to write
    here (its paravirtual MSRs without their CPUID bits: the guest cannot
    change those either), so each load is one ioctl per structure (none for
    an MP state KVM cannot have changed); with
    ``synced`` (KVM_CAP_SYNC_REGS for regs, sregs and events) those three
    go to KVM with the next KVM_RUN instead (``VcpuFd.load_synced``), so
    they come last here: loaded at KVM_RUN, after the MSRs, as ``apply``
    orders sregs and events. The MSR write of EFER before sregs is fine:
    KVM checks a host-initiated EFER write for reserved bits only, and
    sregs sets EFER again."""

    def __init__(self, state: VcpuState):
        self.state = state
        self._msrs = None
        self._events = None
        # The ioctls of a load, prepared for the last vCPU loaded (a reset
        # loads the same vCPU again and again): (vCPU, its fd, synced, calls).
        self._prepared: tuple | None = None
        if state.events is not None:
            ev = K.kvm_vcpu_events.from_buffer_copy(bytes(state.events))
            ev.flags &= K.KVM_VCPUEVENT_VALID_NMI_PENDING | K.KVM_VCPUEVENT_VALID_SHADOW | K.KVM_VCPUEVENT_VALID_PAYLOAD
            self._events = ev
            self._image = sync_image(state.regs, state.sregs, ev)  # what load_synced copies, made once

    def _build(self, vcpu: VcpuFd) -> None:
        values = dict(self.state.msrs)
        while True:
            batch = msr_batch(values)
            try:
                vcpu.set_msrs(batch)
            except MsrRefused as refused:
                del values[refused.index]  # drop it and try the rest
                continue
            self._msrs = batch
            return

    def _prepared_for(self, vcpu: VcpuFd, synced: bool) -> tuple:
        prepared = self._prepared
        if prepared is None or prepared[0] is not vcpu or prepared[1] != vcpu.fd or prepared[2] != synced:
            if self._msrs is None:
                self._build(vcpu)
            prepared = self._prepared = (vcpu, vcpu.fd, synced, self._calls(vcpu, synced))
        return prepared

    def ioctls(self, vcpu: VcpuFd, synced: bool = False) -> list:
        """The vCPU ioctls a ``load`` into ``vcpu`` makes, prepared (calls of
        no arguments): ``vmm bench`` times them alone, against a reset. Each
        sets part of this state again."""
        return list(self._prepared_for(vcpu, synced)[3])

    def load(self, vcpu: VcpuFd, synced: bool = False) -> None:
        prepared = self._prepared_for(vcpu, synced)
        # Each a bare fcntl.ioctl with its argument built once: through our
        # layers (an argument check, the synced-state check of each vCPU
        # ioctl) the vCPU step of a reset took ~15 us more right after
        # KVM_RUN (alternated in resets, loaded).
        try:
            for call in prepared[3]:
                call()
        except OSError as exc:
            raise KvmError(exc.errno or errno.EIO, "loading the vCPU state") from None
        if synced and self._events is not None:
            vcpu.load_synced_image(self._image)

    def _calls(self, vcpu: VcpuFd, synced: bool) -> list:
        """The ioctls of a load into ``vcpu``, in ``apply``'s order, prepared."""
        s = self.state
        by_ioctl = not synced or self._events is None  # regs, sregs, events not handed over in kvm_run
        out = []
        if by_ioctl:
            out.append((K.KVM_SET_REGS, s.regs))
        if s.xsave is not None:
            out.append((K.KVM_SET_XSAVE, s.xsave))
        if s.xcrs is not None:
            out.append((K.KVM_SET_XCRS, s.xcrs))
        if by_ioctl:
            out.append((K.KVM_SET_SREGS, s.sregs))
        out.append((K.KVM_SET_MSRS, self._msrs))
        if s.debugregs is not None:
            out.append((K.KVM_SET_DEBUGREGS, s.debugregs))
        # A RUNNABLE vCPU that KVM keeps RUNNABLE whatever the guest does (no
        # in-kernel local APIC: VcpuFd.only_runnable) is RUNNABLE now: one
        # vCPU ioctl less.
        if s.mp_state is not None and not (s.mp_state.mp_state == K.KVM_MP_STATE_RUNNABLE and vcpu.only_runnable()):
            out.append((K.KVM_SET_MP_STATE, s.mp_state))
        if by_ioctl and self._events is not None:
            out.append((K.KVM_SET_VCPU_EVENTS, self._events))
        return [vcpu.prepared(request, arg) for request, arg in out]
