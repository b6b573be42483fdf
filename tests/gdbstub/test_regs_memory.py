"""Target description and register codec; gdb's memory access through the
project's walker on a page-table tree built in a bytearray."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mm.flags import PteFlags
from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from mm.physmem import BufferMemory
from vmm.gdbstub import regs as R
from vmm.gdbstub.memory import MemoryFault, read_virtual, write_virtual

P, W, NX = PteFlags.PRESENT, PteFlags.WRITABLE, PteFlags.NO_EXECUTE


def test_target_xml_is_valid_and_lists_every_register_in_order():
    root = ET.fromstring(R.target_xml().split("\n", 2)[2])  # skip the XML declaration and DOCTYPE
    names = [r.get("name") for r in root.iter("reg")]
    assert names == [r.name for r in R.REGISTERS]
    assert [int(r.get("regnum")) for r in root.iter("reg")] == list(range(len(names)))
    for want in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "fs_base", "gs_base", "rip", "eflags", "cs", "gs"):
        assert want in names
    # gdb's i386 core feature order (i386_validate_tdesc_p checks it by number)
    assert names[:18] == "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip eflags".split()
    assert names[18:24] == "cs ss ds es fs gs".split()


def test_register_codec_roundtrip_and_unavailable():
    values = {r.name: (i * 0x0101010101010101) & ((1 << r.bits) - 1) for i, r in enumerate(R.REGISTERS) if r.group != "float"}
    g = R.encode_all(values)
    assert len(g) == 2 * sum(r.size for r in R.REGISTERS)
    assert R.encode_one(R.BY_NAME["st0"], values) == b"xx" * 10
    assert R.encode_one(R.BY_NAME["rip"], {"rip": 0xFFFFFFFF80001234}) == b"34120080ffffffff"
    raw = bytes.fromhex(g.replace(b"xx", b"00").decode())
    back = R.decode_all(raw)
    for name, v in values.items():
        assert back[name] == v


@pytest.fixture
def tree():
    mem = BufferMemory(bytearray(1 << 20))
    frames = BumpFrameAllocator(0x1000, 0x40000)
    m = Mapper.new(mem, frames, forbid_wx=False)
    m.map(0xFFFF_8000_0001_0000, 0x80000, flags=P | W | NX)  # writable data
    m.map(0xFFFF_8000_0001_1000, 0x81000, flags=P | W | NX)
    m.map(0xFFFF_8000_0002_0000, 0x82000, flags=P)  # read-only text
    m.map(0x40_0000, 0xFF000, flags=P | W)  # last page of RAM
    m.map(0x50_0000, 0x1FF000, flags=P | W)  # a hostile leaf: a frame beyond the end of RAM
    mem.write(0x80000, bytes(range(256)) * 32)
    mem.write(0x81000, b"\xAA" * 4096)
    return mem, m.root


def test_read_across_pages_and_short_read_at_a_hole(tree):
    mem, cr3 = tree
    va = 0xFFFF_8000_0001_0FF8
    assert read_virtual(mem, cr3, va, 16) == bytes(range(0xF8, 0x100)) + b"\xAA" * 8
    # the page after 0x...11000 is unmapped: the read stops there
    got = read_virtual(mem, cr3, 0xFFFF_8000_0001_1FF0, 64)
    assert got == b"\xAA" * 16


@pytest.mark.parametrize("va", [0xFFFF_8000_0003_0000, 0, 0x8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF])
def test_unmapped_and_noncanonical_reads_fault(tree, va):
    mem, cr3 = tree
    with pytest.raises(MemoryFault):
        read_virtual(mem, cr3, va, 8)


def test_write_honours_effective_permission_unless_write_through(tree):
    mem, cr3 = tree
    text = 0xFFFF_8000_0002_0000
    before = bytes(mem.read(0, 1 << 20))
    with pytest.raises(MemoryFault) as exc:
        write_virtual(mem, cr3, text, b"\xCC")
    assert exc.value.code == 13
    assert bytes(mem.read(0, 1 << 20)) == before  # nothing written
    write_virtual(mem, cr3, text, b"\xCC", write_through=True)
    assert mem.read(0x82000, 1) == b"\xCC"


def test_write_is_all_or_nothing_across_a_hole(tree):
    mem, cr3 = tree
    before = bytes(mem.read(0, 1 << 20))
    with pytest.raises(MemoryFault):
        write_virtual(mem, cr3, 0xFFFF_8000_0001_1FFC, b"12345678")  # last 4 bytes fall in a hole
    assert bytes(mem.read(0, 1 << 20)) == before


def test_write_never_leaves_guest_ram(tree):
    mem, cr3 = tree
    before = bytes(mem.read(0, 1 << 20))
    # a leaf whose frame lies beyond RAM (a hostile or stale entry)
    with pytest.raises(MemoryFault):
        write_virtual(mem, cr3, 0x50_0000, b"x" * 16, write_through=True)
    assert bytes(mem.read(0, 1 << 20)) == before
    # the last page of RAM is fine, one byte past it is not
    write_virtual(mem, cr3, 0x40_0FFF, b"z")
    with pytest.raises(MemoryFault):
        write_virtual(mem, cr3, 0x40_0FFF, b"zz")
