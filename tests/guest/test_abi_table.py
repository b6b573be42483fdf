"""The guest/host ABI, compared as each side's compiler sees it.

The kernel carries a table (`PYVMM_ABI`, guest/src/abi_table.rs) of every
shared record's size and field offsets (`size_of`, `offset_of!`) and every
shared constant. This test reads it from the built ELF and compares it, entry
by entry and both ways, with the host's production definitions: the ctypes
records and constants of vmm/abi.py, the memory map of mm/memmap.py, the
layout of vmm/layout.py, the UART of vmm/devices.py. No copy of the ABI lives
here; only the names that differ between the two languages are mapped.
"""

from __future__ import annotations

import ctypes as C
import struct

import pytest

from mm import memmap
from vmm import abi, layout
from vmm.devices import Uart16550
from vmm.elf import load_kernel_file

ENTRY = struct.Struct("<48sQ")
TABLE_SYMBOL = "PYVMM_ABI"

#: Guest MemoryDescriptor fields in order, as mm/memmap.py's DESCRIPTOR_FORMAT packs them.
DESCRIPTOR_FIELDS = ("typ", "pad", "physical_start", "virtual_start", "number_of_pages", "attribute")


def read_table(kernel_path) -> dict[str, int]:
    """``PYVMM_ABI`` from the kernel file: name -> value."""
    image = load_kernel_file(kernel_path)
    sym = next((s for s in image.symbols if s.name == TABLE_SYMBOL), None)
    assert sym is not None, f"the kernel has no {TABLE_SYMBOL} symbol"
    seg = next(s for s in image.segments if s.vaddr <= sym.addr and sym.addr + sym.size <= s.vaddr + s.filesz)
    raw = image.data[seg.offset + sym.addr - seg.vaddr:][: sym.size]
    assert sym.size % ENTRY.size == 0, sym.size
    table = {}
    for name, value in ENTRY.iter_unpack(raw):
        key = name.rstrip(b"\0").decode("ascii")
        assert key not in table, f"{key} twice in the guest's table"
        table[key] = value
    return table


def _record(name: str, ctype) -> dict[str, int]:
    out = {f"sizeof({name})": C.sizeof(ctype)}
    out.update({f"{name}.{field}": getattr(ctype, field).offset for field, *_ in ctype._fields_})
    return out


def host_table() -> dict[str, int]:
    """Every entry the host defines, under the guest's names."""
    out: dict[str, int] = {}
    out.update(_record("BootInfo", abi.BootInfo))
    out.update(_record("ReportHeader", abi.ReportHeader))
    out.update(_record("StackRecord", abi.StackRecord))
    out.update(_record("InspectBlock", abi.InspectBlockRaw))
    fmt = memmap.DESCRIPTOR_FORMAT
    out["sizeof(MemoryDescriptor)"] = struct.calcsize(fmt)
    for i, field in enumerate(DESCRIPTOR_FIELDS):
        out[f"MemoryDescriptor.{field}"] = struct.calcsize(fmt[: 1 + i])
    out.update({
        "BOOT_INFO_MAGIC": abi.BOOT_INFO_MAGIC,
        "BOOT_INFO_VERSION": abi.BOOT_INFO_VERSION,
        "BOOT_FLAG_DIRECT_MAP_1G": abi.BOOT_FLAG_DIRECT_MAP_1G,
        "KERNEL_PHYS_BASE": layout.KERNEL_PHYS_MIN,
        "KERNEL_LINK_BASE": layout.KERNEL_LINK_BASE,
        "PHYS_OFFSET": layout.PHYS_OFFSET,
        "EFI_MEMORY_WB": memmap.EFI_MEMORY_WB,
        "EFI_MEMORY_RUNTIME": memmap.EFI_MEMORY_RUNTIME,
        "port::COM1_THR": abi.COM1_BASE,
        "port::COM1_LSR": abi.COM1_BASE + Uart16550.LSR,
        "port::EXIT": abi.EXIT_PORT,
        "port::REPORT": abi.REPORT_PORT,
        "port::ICOUNT_START": abi.ICOUNT_PORT,
        "port::ICOUNT_STOP": abi.ICOUNT_PORT + 4,
        "port::WORK": abi.WORK_PORT,
        "port::WORK_END": abi.WORK_END_PORT,
        "LSR_THR_EMPTY": Uart16550.LSR_THR_EMPTY,
        "exit::SUCCESS": abi.ExitCode.SUCCESS,
        "exit::TEST_FAILURE": abi.ExitCode.TEST_FAILURE,
        "exit::PANIC": abi.ExitCode.PANIC,
        "exit::STACK_OVERFLOW": abi.ExitCode.STACK_OVERFLOW,
        "exit::FAULT": abi.ExitCode.GUEST_FAULT,
        "REPORT_MAGIC": abi.REPORT_MAGIC,
        "REPORT_MAX_PAYLOAD": abi.REPORT_MAX_PAYLOAD,
        "INSPECT_MAGIC": abi.INSPECT_BLOCK_MAGIC,
        "INSPECT_VERSION": 1,
        "INSPECT_SIZE": abi.INSPECT_BLOCK_SIZE,
        "MAX_STACKS": abi.MAX_STACKS,
        "STACK_IN_USE": abi.STACK_IN_USE,
    })
    out.update({f"memtype::{t.name}": int(t) for t in memmap.MemoryType})
    # Rust's CamelCase variants of the host's UPPER_SNAKE names.
    out.update({f"ReportKind::{k.name.title().replace('_', '')}": int(k) for k in abi.ReportKind})
    out.update({f"Backend::{b.name.title()}": int(b) for b in abi.Backend})
    return out


@pytest.fixture(scope="module")
def guest(guest_kernel_path) -> dict[str, int]:
    return read_table(guest_kernel_path)


def test_the_guest_table_is_read_from_the_elf(guest):
    # A reader that finds nothing would pass everything.
    assert len(guest) > 100
    assert guest["sizeof(BootInfo)"] == abi.BOOT_INFO_SIZE
    assert guest["InspectBlock.stacks"] + abi.MAX_STACKS * guest["sizeof(StackRecord)"] == guest["sizeof(InspectBlock)"]


def test_every_guest_entry_has_the_host_value(guest):
    host = host_table()
    unknown = sorted(set(guest) - set(host))
    assert not unknown, f"the host defines nothing for {unknown}"
    wrong = {k: (guest[k], host[k]) for k in guest if guest[k] != host[k]}
    assert not wrong, f"(guest, host) differ: {wrong}"


def test_every_host_definition_is_in_the_guest_table(guest):
    missing = sorted(set(host_table()) - set(guest))
    assert not missing, f"the guest's table lacks {missing}"


def test_the_boot_info_size_is_what_the_host_writes(guest):
    assert C.sizeof(abi.BootInfo) == abi.BOOT_INFO_SIZE == guest["sizeof(BootInfo)"]
    assert C.sizeof(abi.ReportHeader) == abi.REPORT_HEADER_SIZE == guest["sizeof(ReportHeader)"]
