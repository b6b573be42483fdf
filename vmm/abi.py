"""Host side of the guest/host ABI (docs/ABI.md); guest/src/abi.rs is the other.

Data only: the BootInfo mirror, port numbers, exit codes, report kinds, the
inspect block. The memory-map descriptor and types are mm's (mm/memmap.py,
a pure library); layout addresses are vmm/layout.py's. The guest emits the
same numbers as its compiler sees them (guest/src/abi_table.rs), and
tests/guest/test_abi_table.py compares the two, entry by entry.
Sizes and offsets are pinned in tests/vmm/test_abi.py, and the guest pins the
same numbers with compile-time assertions.
"""

from __future__ import annotations

import ctypes as C
import enum

BOOT_INFO_MAGIC = int.from_bytes(b"PYVMMBI1", "little")
BOOT_INFO_VERSION = 1

u32, u64 = C.c_uint32, C.c_uint64


class BootInfo(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("magic", u64),
        ("version", u32),
        ("size", u32),
        ("phys_offset", u64),
        ("ram_size", u64),
        ("memmap_phys", u64),
        ("memmap_count", u32),
        ("memmap_desc_size", u32),
        ("kernel_phys_start", u64),
        ("kernel_phys_end", u64),
        ("kernel_link_base", u64),
        ("kaslr_slide", u64),
        ("boot_pt_phys", u64),
        ("boot_pt_end", u64),
        ("fb_phys", u64),
        ("fb_width", u32),
        ("fb_height", u32),
        ("fb_stride", u32),
        ("fb_format", u32),
        ("cmdline_phys", u64),
        ("cmdline_len", u32),
        ("flags", u32),
        ("rng_seed", u64),
        ("tsc_khz", u64),
        ("backend", u32),
        ("reserved", u32),
    ]


BOOT_INFO_SIZE = 160
BOOT_FLAG_DIRECT_MAP_1G = 1 << 0


class Backend(enum.IntEnum):
    """How KVM executes guest code on this host (reported to the guest too)."""

    UNKNOWN = 0
    VMX = 1
    SVM = 2
    PVM = 3


# --- ports ----------------------------------------------------------------------
COM1_BASE = 0x3F8
COM1_SIZE = 8
EXIT_PORT = 0xF4
EXIT_PORT_SIZE = 4
REPORT_PORT = 0x500
REPORT_PORT_SIZE = 4
# Instruction counter: OUT id to ICOUNT_PORT starts single-stepping, OUT id
# to ICOUNT_PORT + 4 stops it; the host counts the instructions in between.
ICOUNT_PORT = 0x510
ICOUNT_PORT_SIZE = 8
# Work mailbox (zygote=1): OUT of the mailbox's physical address = "waiting
# for work"; the host writes u32 length + command-line words there, resumes.
WORK_PORT = 0x520
# End-of-work doorbell: OUT of a u32 flag's physical address; the host writes
# non-zero there to ask the guest's work loop to end (no exit per poll).
WORK_END_PORT = 0x524
WORK_PORT_SIZE = 8  # both
WORK_MAILBOX_SIZE = 4096


class ExitCode(enum.IntEnum):
    """Process exit codes: the guest's own (0..5) and the host's (>= 100)."""

    SUCCESS = 0
    TEST_FAILURE = 1
    USAGE = 2  # bad input or options (host)
    PANIC = 3
    STACK_OVERFLOW = 4
    GUEST_FAULT = 5
    HOST_ERROR = 70
    TRIPLE_FAULT = 100
    EMULATION_FAILURE = 101
    FAIL_ENTRY = 102
    HALTED = 103
    UNKNOWN_PORT = 104
    UNBACKED_MMIO = 105
    BAD_REPORT = 106
    KERNEL_WRITE = 107  # a write hit the read-only kernel slot
    TIMEOUT = 124
    INTERRUPTED = 130  # SIGINT (Ctrl-C) stopped the guest: 128 + SIGINT, the shell's convention
    KILLED = 137  # gdb's `kill`: 128 + SIGKILL
    BROKEN_PIPE = 141  # stdout closed (`vmm run | head`): 128 + SIGPIPE
    TERMINATED = 143  # SIGTERM: 128 + SIGTERM


# --- reports ----------------------------------------------------------------------
REPORT_MAGIC = 0x54505252  # "RRPT"
REPORT_HEADER_SIZE = 16
REPORT_MAX_PAYLOAD = 64 * 1024


class ReportHeader(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("magic", u32), ("kind", u32), ("len", u32), ("reserved", u32)]


class ReportKind(enum.IntEnum):
    READY = 1
    TEST_RESULT = 2
    PANIC = 3
    BENCH = 4
    INSPECT = 5
    FAULT = 6
    INFO = 7
    TEST_LIST = 8
    SUMMARY = 9


# --- the live-inspection block (docs/ABI.md, "Inspect block") --------------------
INSPECT_BLOCK_MAGIC = int.from_bytes(b"PYVMMIB1", "little")
INSPECT_BLOCK_SIZE = 800
MAX_STACKS = 16
STACK_IN_USE = 1



class StackRecord(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("base", u64),
        ("top", u64),
        ("guard_low", u64),
        ("guard_high", u64),
        ("task_id", u32),
        ("flags", u32),
    ]


class InspectBlockRaw(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("magic", u64),
        ("version", u32),
        ("size", u32),
        ("seq", u64),
        ("heap_free_head", u64),
        ("heap_start", u64),
        ("heap_end", u64),
        ("heap_free_bytes", u64),
        ("heap_large_bytes", u64),
        ("frames_free", u64),
        ("bitmap_phys", u64),
        ("bitmap_bits", u64),
        ("stack_count", u32),
        ("current_task", u32),
        ("demand_start", u64),
        ("demand_end", u64),
        ("demand_faults", u64),
        ("heap_allocs", u64),
        ("heap_frees", u64),
        ("heap_cached_bytes", u64),
        ("workload_iters", u64),
        ("heap_index", u64),
        ("stacks", StackRecord * MAX_STACKS),
    ]
