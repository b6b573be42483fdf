"""Synthetic snapshot files for parser tests and the fuzzer (no KVM needed)."""

from __future__ import annotations

import os

from vmm import kvm_abi as K
from vmm.abi import BootInfo
from vmm.snapshot import elfcore as E
from vmm.snapshot import format as F

RAM = 16 << 20


def sample_state(**meta) -> F.SnapshotState:
    regs = K.kvm_regs(rip=0xFFFF_FFFF_8000_1234, rsp=0xFFFF_C000_0000_0FF8, rflags=2)
    sregs = K.kvm_sregs(cr0=0x80010033, cr3=0x10000, cr4=0x20, efer=0xD00)
    m = {
        "kernel_path": "/k", "kernel_sha256": "ab" * 32, "cmdline": "tests=all", "kaslr_slide": 0x200000,
        "memory_size": RAM, "backend": "PVM", "saved_at": "ready", "memmap": [],
    }
    m.update(meta)
    return F.SnapshotState(
        vcpu=F.VcpuState(
            regs=regs, sregs=sregs, msrs={0x10: 12345, 0xC0000082: 0xFFFF_FFFF_8000_0000}, tsc=12345, tsc_khz=2_600_000,
            xsave=K.kvm_xsave(), xcrs=K.kvm_xcrs(nr_xcrs=1), events=K.kvm_vcpu_events(), debugregs=K.kvm_debugregs(),
            mp_state=K.kvm_mp_state(),
        ),
        meta=m,
        boot_info=BootInfo(ram_size=RAM),
    )


def snapshot_bytes(state=None, notes=None, runs=((0x1000, 0x2000),)) -> bytes:
    """A whole snapshot file; RAM pages read 0x5a."""
    notes = notes if notes is not None else F.encode_state(state or sample_state())
    fd = os.memfd_create("snap")
    try:
        E.write_core(fd, notes, list(runs), lambda out, off, paddr, size: os.pwrite(out, b"\x5a" * size, off))
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def load_bytes(data: bytes):
    """read_snapshot over these bytes (through a memfd, as from a file)."""
    fd = os.memfd_create("snap")
    try:
        os.write(fd, data)
        return F.read_snapshot(fd)
    finally:
        os.close(fd)
