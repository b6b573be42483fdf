"""Raw KVM ABI: ctypes mirrors of <linux/kvm.h> and ioctl numbers.

Data only, no behaviour. C names are kept verbatim so the kernel header can
be read side by side. Every struct size and key offset is pinned by
tests/vmm/test_kvm_abi.py against the values of the installed header.
"""

from __future__ import annotations

import ctypes as C
import functools
import struct

# --- _IOC encoding (include/uapi/asm-generic/ioctl.h) ----------------------
# An ioctl number packs direction (2 bits), argument size (14 bits), type
# (8 bits) and number (8 bits). Computing them from the struct sizes means a
# wrong mirror shows up as a wrong ioctl number in the tests.
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, type_, nr, C.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, C.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, C.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class _Struct(C.Structure):
    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --- registers --------------------------------------------------------------
class kvm_regs(_Struct):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


# --- memory -----------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_userspace_memory_region(_Struct):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(_Struct):
    # The C struct has a union {void *dirty_bitmap; __u64 padding2;}.
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(_Struct):
    # KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set in
    # dirty_bitmap, bit 0 = first_page. first_page must be a multiple of 64
    # and num_pages too, unless the range ends at the end of the slot.
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


# KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) args[0]: with
# MANUAL_PROTECT_ENABLE, KVM_GET_DIRTY_LOG only reads (and clears) the bitmap
# and write protection comes back only through KVM_CLEAR_DIRTY_LOG; with
# INITIALLY_SET a new slot starts with every page dirty and writable.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class kvm_dirty_gfn(_Struct):
    # One entry of a vCPU's dirty ring (mmapped at KVM_DIRTY_LOG_PAGE_OFFSET
    # pages into the vCPU fd): slot = as_id << 16 | slot id, offset = page
    # number within the slot. flags: DIRTY when KVM pushed it, the VMM sets
    # RESET once harvested; KVM_RESET_DIRTY_RINGS re-protects and recycles.
    # Mirrored for measuring it; vmm.dirty_log says why the VMM does not use it.
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
# x86's page offset of the dirty ring in the vCPU mmap (asm/kvm.h).
KVM_DIRTY_LOG_PAGE_OFFSET = 64


class kvm_enable_cap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_coalesced_mmio_zone(_Struct):
    # The C struct ends in union { __u32 pad; __u32 pio; }: pio=1 makes the
    # zone a range of I/O ports (KVM_CAP_COALESCED_PIO) instead of MMIO.
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_coalesced_mmio(_Struct):
    # One buffered write: where, how many bytes, and the bytes (union pad/pio as above).
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(_Struct):
    # Followed by KVM_COALESCED_MMIO_MAX entries; KVM appends at `last`, the
    # VMM consumes from `first`. The ring is page KVM_COALESCED_MMIO_PAGE_OFFSET
    # of the vCPU's mmap (after kvm_run).
    _fields_ = [("first", u32), ("last", u32)]


KVM_COALESCED_MMIO_PAGE_OFFSET = 2  # x86: page 1 holds port I/O data (KVM_PIO_PAGE_OFFSET)
# (PAGE_SIZE - sizeof(ring header)) / sizeof(entry): PAGE_SIZE is not in the uapi header.
KVM_COALESCED_MMIO_MAX = (4096 - 8) // 24


class kvm_translation(_Struct):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


# --- CPUID and MSRs ---------------------------------------------------------
class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(_Struct):
    """Header only; the entries follow it (flexible array member)."""

    _fields_ = [("nent", u32), ("padding", u32)]


@functools.cache  # one class per length: making a ctypes class costs ~50 us
def kvm_cpuid2_with(n: int) -> type[C.Structure]:
    """A kvm_cpuid2 header followed by room for ``n`` entries."""

    class _kvm_cpuid2_n(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    return _kvm_cpuid2_n


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header only; the entries follow it (flexible array member)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


@functools.cache  # one class per length: making a ctypes class costs ~50 us
def kvm_msrs_with(n: int) -> type[C.Structure]:
    class _kvm_msrs_n(_Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return _kvm_msrs_n


# --- debugging --------------------------------------------------------------
class kvm_guest_debug_arch(_Struct):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(_Struct):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_HW_BP = 0x00020000  # x86 <asm/kvm.h>: debugreg[] are DR0-3, DR6, DR7
DR7_L0 = 0x1  # DR7 bit 0: DR0 enabled (R/W0 = LEN0 = 0: an instruction breakpoint)


class kvm_debug_exit_arch(_Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


# --- kvm_run ----------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4


class _exit_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class _exit_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _exit_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _exit_io(_Struct):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),  # relative to the start of kvm_run
    ]


class _exit_debug(_Struct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _exit_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _exit_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_union(C.Union):
    _fields_ = [
        ("hw", _exit_hw),
        ("fail_entry", _exit_fail_entry),
        ("ex", _exit_ex),
        ("io", _exit_io),
        ("debug", _exit_debug),
        ("mmio", _exit_mmio),
        ("internal", _exit_internal),
        ("system_event", _exit_system_event),
        ("padding", C.c_char * 256),
    ]


class kvm_run(_Struct):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        # union { struct kvm_sync_regs regs; char padding[2048]; } s;
        ("s", C.c_char * 2048),
    ]


# The exit union's members under their C names (kvm_run.u.io is `struct {...} io`).
kvm_run_io = _exit_io
kvm_run_mmio = _exit_mmio
kvm_run_debug = _exit_debug
kvm_run_fail_entry = _exit_fail_entry
kvm_run_internal = _exit_internal
kvm_run_system_event = _exit_system_event
KVM_RUN_EXIT_REASON = kvm_run.exit_reason.offset
KVM_RUN_EXIT_UNION = kvm_run.u.offset


# --- reading these structs with struct.Struct -------------------------------
_STRUCT_CODES = {C.c_uint8: "B", C.c_uint16: "H", C.c_uint32: "I", C.c_uint64: "Q"}


def _fields_at(ctype: type, base: int) -> list[tuple[int, str]]:
    """(offset, struct code) of every scalar in ``ctype`` placed at ``base``."""
    if ctype in _STRUCT_CODES:
        return [(base, _STRUCT_CODES[ctype])]
    if issubclass(ctype, C.Array):
        item = ctype._type_
        if item in (C.c_uint8, C.c_char):
            return [(base, f"{ctype._length_}s")]  # bytes, not a tuple of ints
        return [(base + i * C.sizeof(item), code) for i in range(ctype._length_) for _, code in _fields_at(item, 0)]
    if issubclass(ctype, C.Structure):
        out: list[tuple[int, str]] = []
        for name, ftype, *_ in ctype._fields_:
            out += _fields_at(ftype, base + getattr(ctype, name).offset)
        return out
    raise TypeError(f"no struct code for {ctype!r}")


def unpacker(*parts: tuple[int, type]) -> tuple[struct.Struct, int]:
    """A little-endian ``struct.Struct`` that reads, in offset order, every
    scalar of the ctypes types placed at the given offsets, and the offset it
    starts at. Gaps become pad bytes, taken from the ctypes offsets.

    The exit decoder reads the vCPU's mapping with these: one C call per exit
    instead of one ctypes attribute read per field, and the layout is still
    the one defined above (never a hand-typed format)."""
    fields = sorted(f for base, ctype in parts for f in _fields_at(ctype, base))
    start = pos = fields[0][0]
    fmt = "<"
    for off, code in fields:
        if off < pos:
            raise ValueError(f"overlapping fields at offset {off}")
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        pos = off + struct.calcsize("<" + code)
    return struct.Struct(fmt), start


# --- vCPU state beyond regs/sregs (snapshots) -------------------------------
class _exception_state(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _interrupt_state(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _nmi_state(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _smi_state(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _exception_state),
        ("interrupt", _interrupt_state),
        ("nmi", _nmi_state),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _smi_state),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class kvm_debugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_xsave(_Struct):
    """The legacy 4 KiB XSAVE area (KVM_CAP_XSAVE2 may report more; it is 4096 here)."""

    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3


class kvm_msr_list(_Struct):
    """Header only; the u32 indices follow it (flexible array member)."""

    _fields_ = [("nmsrs", u32)]


@functools.cache  # one class per length: making a ctypes class costs ~50 us
def kvm_msr_list_with(n: int) -> type[C.Structure]:
    class _kvm_msr_list_n(_Struct):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return _kvm_msr_list_n


# --- ioctl numbers ----------------------------------------------------------
# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)  # not used by the VMM: tests make a VM with an in-kernel APIC
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, kvm_coalesced_mmio_zone)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, kvm_guest_debug)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_READONLY_MEM = 81
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_SYNC_REGS = 74

# kvm_run.kvm_valid_regs: what KVM stores in kvm_run.s at every exit
# (struct kvm_sync_regs: kvm_regs, then kvm_sregs, then kvm_vcpu_events).
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# MSRs
MSR_EFER = 0xC0000080
