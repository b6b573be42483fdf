"""Fault reports: disassembly around RIP, frame-pointer backtraces, register text.

Pure tests feed synthetic memory; the kvm tests run the guest's failure
scenarios through the CLI the way a user would (`vmm run -q -c scenario=...`).
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys

import pytest

from vmm.diagnostics import backtrace, diagnose, disassemble
from vmm.elf import Symbol, Symbolizer
from vmm.registers import format_registers, segment_kind

pytest.importorskip("capstone")

BASE = 0xFFFF_FFFF_8000_0000
# push rbp; mov rbp, rsp; mov rax, [rax]; ud2; pop rbp; ret
FUNC = bytes.fromhex("55 4889e5 488b00 0f0b 5d c3")
FAULT_AT = BASE + 4  # mov rax, [rax]
PAGE = FUNC + b"\x90" * (4096 - len(FUNC))


def _reader(regions: dict[int, bytes]):
    def read(virt: int, n: int):
        for start, data in regions.items():
            if start <= virt and virt + n <= start + len(data):
                return data[virt - start : virt - start + n]
        return None

    return read


def _syms():
    return Symbolizer([Symbol("_RNvCs1_6kernel6victim", BASE, len(FUNC)), Symbol("caller", BASE + 0x100, 0x40)])


def test_disassembly_decodes_from_the_function_start_and_marks_rip():
    insns, notes = disassemble(_reader({BASE: PAGE}), FAULT_AT, _syms())
    assert not notes
    texts = [(i.addr - BASE, i.text, i.current) for i in insns]
    assert texts[:4] == [(0, "push rbp", False), (1, "mov rbp, rsp", False), (4, "mov rax, qword ptr [rax]", True), (7, "ud2", False)]
    cur = next(i for i in insns if i.current)
    assert cur.raw == bytes.fromhex("488b00")
    assert cur.symbol.endswith("victim+0x4")


def test_disassembly_of_unmapped_code_says_so():
    insns, notes = disassemble(_reader({}), FAULT_AT, _syms())
    assert insns == [] and "not mapped" in notes[0]


def test_rip_inside_an_instruction_decodes_from_rip():
    insns, notes = disassemble(_reader({BASE: PAGE}), BASE + 2, _syms())
    assert insns[0].addr == BASE + 2 and insns[0].current
    assert "not an instruction boundary" in notes[0]


def test_backtrace_follows_the_frame_pointer_chain():
    stack = 0xFFFF_C800_0000_1000
    # frame 1 at stack+0x40: saved rbp -> stack+0x80, return into caller+0x10
    # frame 2 at stack+0x80: saved rbp 0 (outermost), return into caller+0x20
    mem = bytearray(0x100)
    struct.pack_into("<QQ", mem, 0x40, stack + 0x80, BASE + 0x110)
    struct.pack_into("<QQ", mem, 0x80, 0, BASE + 0x120)
    frames, notes = backtrace(_reader({stack: bytes(mem)}), FAULT_AT, stack + 0x40, _syms())
    assert [f.addr for f in frames] == [FAULT_AT, BASE + 0x110, BASE + 0x120]
    assert frames[1].symbol == "caller+0x10" and not notes


def test_backtrace_return_address_past_the_function_end_names_the_caller():
    # A call that ends its function returns to the next symbol's first byte.
    stack = 0xFFFF_C800_0000_1000
    mem = struct.pack("<QQ", 0, BASE + 0x100)
    frames, _ = backtrace(_reader({stack: mem}), FAULT_AT, stack, Symbolizer([Symbol("before", BASE + 0xF0, 0x10), Symbol("caller", BASE + 0x100, 0x40)]))
    assert frames[1].symbol == "before+0x10"


@pytest.mark.parametrize(
    "chain,why",
    [
        ("loop", "does not move up"),
        ("misaligned", "not 8-byte aligned"),
        ("unmapped", "not mapped"),
    ],
)
def test_backtrace_never_trusts_the_stack(chain, why):
    stack = 0xFFFF_C800_0000_1000
    mem = bytearray(0x100)
    if chain == "loop":
        struct.pack_into("<QQ", mem, 0x40, stack + 0x40, BASE + 0x110)
    elif chain == "misaligned":
        struct.pack_into("<QQ", mem, 0x40, stack + 0x83, BASE + 0x110)
    else:
        struct.pack_into("<QQ", mem, 0x40, stack + 0x10000, BASE + 0x110)
    frames, notes = backtrace(_reader({stack: bytes(mem)}), FAULT_AT, stack + 0x40, _syms())
    assert len(frames) == 2 and why in notes[-1]


def test_rendered_report_has_code_and_backtrace():
    d = diagnose(_reader({BASE: PAGE}), FAULT_AT, 0, _syms())
    text = d.render()
    assert re.search(r"=> ffffffff80000004 <kernel::victim\+0x4>\s+48 8b 00\s+mov rax, qword ptr \[rax\]", text), text
    assert "#0  ffffffff80000004 kernel::victim+0x4" in text


def test_segment_kinds():
    assert segment_kind(0xA09B, "cs") == "code64 DPL0"
    assert segment_kind(0xC0F3, "ss") == "data DPL3"
    assert segment_kind(0x008B, "tr") == "tss64-busy"
    assert segment_kind(0x10000, "ldt") == "unusable"


def _cli(*args):
    return subprocess.run([sys.executable, "vmm.py", "run", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.kvm
def test_triple_fault_report_under_quiet(guest_kernel_path):
    """-q hides console and banner, never why the guest stopped: registers with
    segments and descriptor tables, the faulting instruction disassembled with
    its symbol, and the frame-pointer backtrace up to kernel_main."""
    proc = _cli("--kernel", str(guest_kernel_path), "-q", "-c", "scenario=triplefault")
    err = proc.stderr
    assert proc.returncode == 100, err
    assert proc.stdout == ""  # no console
    assert "KVM backend" not in err  # no banner
    assert "triple-faulted" in err.splitlines()[0]
    for field in ("cs=0008", "ss=0010", "tr=", "gdtr=", "idtr=0000000000000000/0000", "cr2=", "efer=", "cr0[PE"):
        assert field in err, field
    # the guest loads an empty IDT, then ud2: the #UD cannot be delivered
    assert re.search(r"=> [0-9a-f]{16} <kernel::scenario_triple_fault\+0x[0-9a-f]+>\s+0f 0b\s+ud2", err), err
    assert re.search(r"lidt", err)
    bt = err[err.index("backtrace"):]
    assert "#0" in bt and "kernel::scenario_triple_fault" in bt and "kernel::kernel_main+" in bt


@pytest.mark.kvm
def test_guest_page_fault_report_under_quiet(guest_kernel_path):
    proc = _cli("--kernel", str(guest_kernel_path), "-q", "-c", "scenario=pagefault")
    err = proc.stderr
    assert proc.returncode == 5, err
    assert "guest fault (page_fault)" in err and "address 0xdeadb000" in err
    # the load from 0xdeadb000 is the marked instruction
    assert re.search(r"=> [0-9a-f]{16} <kernel::scenario_page_fault\+0x[0-9a-f]+>\s+[0-9a-f ]+\s+mov \w+, qword ptr \[\w+\]", err), err
    assert re.search(r"#1\s+[0-9a-f]{16} kernel::kernel_main\+0x", err), err


@pytest.mark.kvm
def test_quiet_clean_exit_still_says_how_it_ended(guest_kernel_path):
    proc = _cli("--kernel", str(guest_kernel_path), "-q")
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "exit code 0" in proc.stderr


def test_format_registers_without_segments():
    regs = {n: 0 for n in "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags cr0 cr2 cr3 cr4 efer".split()}
    regs["rflags"] = 0x246
    text = format_registers(regs)
    assert "[PF ZF IF]" in text and "gdtr" not in text
