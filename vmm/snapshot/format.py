"""pyvmm's snapshot notes: what a saved guest carries besides its RAM.

Data and validation only (no ioctl): each vCPU structure is stored exactly as
KVM hands it out (the ``kvm_*`` mirrors in ``vmm.kvm_abi``, sizes pinned
here and in tests), the rest is one JSON note. All notes are owned by
``PYVMM``; ``readelf -n`` lists them as unknown types of that owner.

| type (0x5059_0000 +) | content | size |
| --- | --- | --- |
| 1 VERSION | u32 format version, u32 flags | 8 |
| 2 REGS | kvm_regs: general registers, RIP, RFLAGS | 144 |
| 3 SREGS | kvm_sregs: segments, GDTR/IDTR/TR/LDTR, CR0-CR4, CR8, EFER, APIC base | 312 |
| 4 MSRS | kvm_msr_entry[n] (every MSR of KVM_GET_MSR_INDEX_LIST; IA32_TSC among them) | 16 n |
| 5 XSAVE | kvm_xsave: FPU/SSE/AVX state | 4096 |
| 6 XCRS | kvm_xcrs (XCR0) | 392 |
| 7 EVENTS | kvm_vcpu_events: pending/injected exception, interrupt, NMI | 64 |
| 8 DEBUGREGS | kvm_debugregs | 128 |
| 9 MP_STATE | kvm_mp_state | 4 |
| 10 TSC | u64 guest TSC at the save, u64 TSC kHz | 16 |
| 11 BOOT_INFO | the BootInfo the guest was given (vmm.abi.BootInfo) | 160 |
| 16 META | UTF-8 JSON: kernel sha256 and path, cmdline, slide, memory size, backend, memory map, ... | <= 4 MiB |
"""

from __future__ import annotations

import ctypes as C
import enum
import json
import struct
from dataclasses import dataclass, field

from .. import kvm_abi as K
from ..abi import BOOT_INFO_SIZE, BootInfo
from ..layout import GuestMemoryError, check_ram_size
from .elfcore import CoreFormatError, Note, read_core
from .errors import SnapshotError

OWNER = b"PYVMM"
FORMAT_VERSION = 1
META_MAX = 4 << 20


# Note types live in a private range ("PY" << 16): in a core file readelf
# names types 1..16 after the standard core notes (NT_PRSTATUS, ...) whatever
# the owner, which would mislabel ours.
NOTE_BASE = 0x5059_0000


class NoteType(enum.IntEnum):
    VERSION = NOTE_BASE + 1
    REGS = NOTE_BASE + 2
    SREGS = NOTE_BASE + 3
    MSRS = NOTE_BASE + 4
    XSAVE = NOTE_BASE + 5
    XCRS = NOTE_BASE + 6
    EVENTS = NOTE_BASE + 7
    DEBUGREGS = NOTE_BASE + 8
    MP_STATE = NOTE_BASE + 9
    TSC = NOTE_BASE + 10
    BOOT_INFO = NOTE_BASE + 11
    META = NOTE_BASE + 16


# Fixed sizes; MSRS (multiple of 16) and META (bounded) vary.
FIXED_SIZES = {
    NoteType.VERSION: 8,
    NoteType.REGS: C.sizeof(K.kvm_regs),
    NoteType.SREGS: C.sizeof(K.kvm_sregs),
    NoteType.XSAVE: C.sizeof(K.kvm_xsave),
    NoteType.XCRS: C.sizeof(K.kvm_xcrs),
    NoteType.EVENTS: C.sizeof(K.kvm_vcpu_events),
    NoteType.DEBUGREGS: C.sizeof(K.kvm_debugregs),
    NoteType.MP_STATE: C.sizeof(K.kvm_mp_state),
    NoteType.TSC: 16,
    NoteType.BOOT_INFO: BOOT_INFO_SIZE,
}
_KNOWN = frozenset(int(t) for t in NoteType)
REQUIRED = (NoteType.VERSION, NoteType.REGS, NoteType.SREGS, NoteType.MSRS, NoteType.TSC, NoteType.META)
MAX_MSRS = 1024
MSR = struct.Struct("<IIQ")  # kvm_msr_entry

# META keys and their JSON types; anything else in META is ignored.
META_FIELDS = {
    "kernel_path": str,
    "kernel_sha256": str,
    "cmdline": str,
    "kaslr_slide": int,
    "memory_size": int,
    "backend": str,
    "saved_at": str,  # what triggered the save: ready, exit, report:KIND, 1.5s, socket
    "memmap": list,
}


@dataclass
class VcpuState:
    """Everything KVM keeps for one vCPU that a resumed guest needs."""

    regs: K.kvm_regs
    sregs: K.kvm_sregs
    msrs: dict[int, int]
    tsc: int
    tsc_khz: int
    xsave: K.kvm_xsave | None = None
    xcrs: K.kvm_xcrs | None = None
    events: K.kvm_vcpu_events | None = None
    debugregs: K.kvm_debugregs | None = None
    mp_state: K.kvm_mp_state | None = None


@dataclass
class SnapshotState:
    vcpu: VcpuState
    meta: dict
    boot_info: BootInfo | None = None
    version: int = FORMAT_VERSION
    extra_notes: list[Note] = field(default_factory=list)

    @property
    def memory_size(self) -> int:
        return int(self.meta["memory_size"])


def encode_state(state: SnapshotState) -> list[Note]:
    v = state.vcpu
    out = [
        Note(OWNER, NoteType.VERSION, struct.pack("<II", state.version, 0)),
        Note(OWNER, NoteType.REGS, bytes(v.regs)),
        Note(OWNER, NoteType.SREGS, bytes(v.sregs)),
        Note(OWNER, NoteType.MSRS, b"".join(MSR.pack(i, 0, val) for i, val in v.msrs.items())),
        Note(OWNER, NoteType.TSC, struct.pack("<QQ", v.tsc, v.tsc_khz)),
    ]
    for kind, value in (
        (NoteType.XSAVE, v.xsave), (NoteType.XCRS, v.xcrs), (NoteType.EVENTS, v.events),
        (NoteType.DEBUGREGS, v.debugregs), (NoteType.MP_STATE, v.mp_state), (NoteType.BOOT_INFO, state.boot_info),
    ):
        if value is not None:
            out.append(Note(OWNER, kind, bytes(value)))
    meta = json.dumps(state.meta, sort_keys=True).encode()
    if len(meta) > META_MAX:
        raise SnapshotError(f"metadata is {len(meta)} bytes, the limit is {META_MAX}")
    out.append(Note(OWNER, NoteType.META, meta))
    return out + state.extra_notes


def _meta_of(notes: list[Note]) -> dict:
    metas = [n for n in notes if n.name == OWNER and n.type == NoteType.META]
    if len(metas) != 1:
        raise CoreFormatError(f"expected one PYVMM META note, found {len(metas)}")
    raw = metas[0].desc
    if len(raw) > META_MAX:
        raise CoreFormatError(f"META note is {len(raw)} bytes, the limit is {META_MAX}")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CoreFormatError(f"META note is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise CoreFormatError("META note is not a JSON object")
    for key, typ in META_FIELDS.items():
        if key not in meta:
            raise CoreFormatError(f"META note lacks {key!r}")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise CoreFormatError(f"META {key!r} is not a {typ.__name__}")
    return meta


def ram_size_of(notes: list[Note]) -> int:
    """The RAM size the notes describe (for checking PT_LOADs against it)."""
    size = _meta_of(notes)["memory_size"]
    try:
        check_ram_size(size)
    except GuestMemoryError as exc:
        raise CoreFormatError(f"META memory size: {exc}") from None
    return size


def decode_state(notes: list[Note]) -> SnapshotState:
    """Typed state from the notes; sizes, duplicates and required notes checked."""
    ours: dict[int, Note] = {}
    extra = []
    for n in notes:
        if n.name != OWNER:
            extra.append(n)
            continue
        if n.type in ours:
            raise CoreFormatError(f"note type {n.type:#x} appears twice")
        if n.type not in _KNOWN:
            raise CoreFormatError(f"unknown PYVMM note type {n.type:#x}")
        want = FIXED_SIZES.get(NoteType(n.type))
        if want is not None and len(n.desc) != want:
            what = "short" if len(n.desc) < want else "long"
            raise CoreFormatError(f"{NoteType(n.type).name} note is too {what} ({len(n.desc)} bytes, expected {want})")
        ours[n.type] = n
    for kind in REQUIRED:
        if kind not in ours:
            raise CoreFormatError(f"no {kind.name} note")
    version, _flags = struct.unpack("<II", ours[NoteType.VERSION].desc)
    if version != FORMAT_VERSION:
        raise CoreFormatError(f"snapshot format version {version}, this VMM reads {FORMAT_VERSION}")
    raw_msrs = ours[NoteType.MSRS].desc
    if len(raw_msrs) % MSR.size or len(raw_msrs) // MSR.size > MAX_MSRS:
        raise CoreFormatError(f"MSRS note has a bad size ({len(raw_msrs)} bytes)")
    msrs = {}
    for idx, _res, val in MSR.iter_unpack(raw_msrs):
        if idx in msrs:
            raise CoreFormatError(f"MSR {idx:#x} appears twice")
        msrs[idx] = val
    tsc, tsc_khz = struct.unpack("<QQ", ours[NoteType.TSC].desc)

    def opt(kind, ctype):
        n = ours.get(kind)
        return ctype.from_buffer_copy(n.desc) if n is not None else None

    vcpu = VcpuState(
        regs=K.kvm_regs.from_buffer_copy(ours[NoteType.REGS].desc),
        sregs=K.kvm_sregs.from_buffer_copy(ours[NoteType.SREGS].desc),
        msrs=msrs,
        tsc=tsc,
        tsc_khz=tsc_khz,
        xsave=opt(NoteType.XSAVE, K.kvm_xsave),
        xcrs=opt(NoteType.XCRS, K.kvm_xcrs),
        events=opt(NoteType.EVENTS, K.kvm_vcpu_events),
        debugregs=opt(NoteType.DEBUGREGS, K.kvm_debugregs),
        mp_state=opt(NoteType.MP_STATE, K.kvm_mp_state),
    )
    if vcpu.xcrs is not None and vcpu.xcrs.nr_xcrs > K.KVM_MAX_XCRS:
        raise CoreFormatError(f"XCRS note claims {vcpu.xcrs.nr_xcrs} registers (at most {K.KVM_MAX_XCRS})")
    return SnapshotState(
        vcpu=vcpu,
        meta=_meta_of(notes),
        boot_info=opt(NoteType.BOOT_INFO, BootInfo),
        version=version,
        extra_notes=extra,
    )


def read_snapshot(fd: int):
    """Parse and check a whole snapshot file open at ``fd``: (CoreFile, SnapshotState).

    Raises CoreFormatError for anything malformed (the loader's one error type)."""
    core = read_core(fd, ram_size=ram_size_of)
    return core, decode_state(core.notes)
