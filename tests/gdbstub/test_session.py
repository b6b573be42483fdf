"""Protocol rules of a session and the breakpoint table, without a VM."""

from __future__ import annotations

import pytest

from vmm.gdbstub import commands as C
from vmm.gdbstub import regs as R
from vmm.gdbstub.breakpoints import (
    GUESTDBG_ENABLE, GUESTDBG_SINGLESTEP, GUESTDBG_USE_HW_BP, GUESTDBG_USE_SW_BP, BreakpointTable, dr7_for,
)
from vmm.gdbstub.memory import MemoryFault
from vmm.gdbstub.packets import MAX_PACKET, unescape
from vmm.gdbstub.session import DetachAction, KillAction, ResumeAction, Session, StopEvent, stop_reply


class _Target:
    """Registers in a dict, memory in a bytearray at 0x1000; records calls."""

    def __init__(self):
        self.regs = {r.name: 0 for r in R.REGISTERS if r.group != "float"}
        self.regs["rip"] = 0xFFFFFFFF80001000
        self.mem = bytearray(range(256)) * 16
        self.bps = []
        self.monitor_text = "x" * 20000

    def registers(self):
        return dict(self.regs)

    def set_registers(self, values):
        self.regs.update(values)

    def read_memory(self, addr, n):
        if not 0x1000 <= addr < 0x1000 + len(self.mem):
            raise MemoryFault(addr, "not mapped")
        off = addr - 0x1000
        return bytes(self.mem[off : off + n])

    def write_memory(self, addr, data):
        self.read_memory(addr, len(data))
        self.mem[addr - 0x1000 : addr - 0x1000 + len(data)] = data

    def breakpoint(self, insert, kind, addr):
        self.bps.append((insert, kind, addr))

    def monitor(self, command):
        return self.monitor_text

    def offsets(self):
        return 0x2B600000


@pytest.fixture
def s():
    return Session(_Target())


def h(s, payload):
    return s.handle(C.decode(payload))


def test_supported_and_noack(s):
    assert b"PacketSize=%x" % MAX_PACKET in h(s, b"qSupported:multiprocess+")
    assert b"qXfer:features:read+" in h(s, b"qSupported")
    assert h(s, b"QStartNoAckMode") == b"OK" and s.no_ack


def test_target_xml_is_served_in_chunks_that_reassemble(s):
    out = b""
    off = 0
    while True:
        reply = h(s, b"qXfer:features:read:target.xml:%x,100" % off)
        assert reply[:1] in (b"m", b"l")
        chunk = unescape(reply[1:])
        out += chunk
        off += len(chunk)
        if reply[:1] == b"l":
            break
    assert out.decode() == R.target_xml()
    assert h(s, b"qXfer:features:read:other.xml:0,100").startswith(b"E")


def test_registers_memory_and_errors(s):
    g = h(s, b"g")
    assert len(g) == 2 * sum(r.size for r in R.REGISTERS)
    assert h(s, b"p%x" % R.BY_NAME["rip"]) == (0xFFFFFFFF80001000).to_bytes(8, "little").hex().encode()
    assert h(s, b"P%x=0100000000000000" % R.BY_NAME["rax"]) == b"OK" and s.target.regs["rax"] == 1
    assert h(s, b"P%x=0800" % R.BY_NAME["cs"]).startswith(b"E")  # selectors are not writable
    assert h(s, b"p%x" % len(R.REGISTERS)).startswith(b"E")
    assert h(s, b"m1000,4") == b"00010203"
    assert h(s, b"m0,4") == b"E0e"
    assert h(s, b"M1000,2:ffee") == b"OK" and s.target.mem[:2] == b"\xff\xee"
    assert h(s, b"m1000,0") == b""


def test_resume_detach_kill_and_breakpoints(s):
    assert h(s, b"vCont;s:1") == ResumeAction(True)
    assert h(s, b"c") == ResumeAction(False)
    assert h(s, b"s1234") == ResumeAction(True) and s.target.regs["rip"] == 0x1234
    assert h(s, b"D") == DetachAction()
    assert h(s, b"k") == KillAction()
    assert h(s, b"Z0,1000,1") == b"OK" and s.target.bps == [(True, 0, 0x1000)]
    assert h(s, b"Z2,1000,8") == b""  # watchpoints: not supported (gdb can fall back)
    assert h(s, b"vCont?") == b"vCont;c;C;s;S"


def test_monitor_output_is_split_into_o_packets_then_ok(s):
    out = h(s, b"qRcmd," + b"pt".hex().encode())
    assert out[-1] == b"OK"
    assert all(p.startswith(b"O") and len(p) <= MAX_PACKET for p in out[:-1])
    text = b"".join(bytes.fromhex(p[1:].decode()) for p in out[:-1]).decode()
    assert text == "x" * 20000 + "\n"


def test_stop_reply_expedites_pc_and_says_why():
    regs = {"rbp": 1, "rsp": 2, "rip": 0xFFFFFFFF80001000}
    r = stop_reply(StopEvent(5, "hwbreak"), regs)
    assert r.startswith(b"T05")
    assert b"%02x:%s;" % (R.PC_REGNUM, (0xFFFFFFFF80001000).to_bytes(8, "little").hex().encode()) in r
    assert b"hwbreak:;" in r


def test_breakpoint_table_uses_four_debug_registers_then_steps():
    t = BreakpointTable()
    for i in range(6):
        assert t.insert(0, 0x1000 * (i + 1)) == ("hw" if i < 4 else "step")
    control, regs = t.guest_debug(step=False)
    assert control == GUESTDBG_ENABLE | GUESTDBG_USE_HW_BP | GUESTDBG_SINGLESTEP
    assert regs[:4] == [0x1000, 0x2000, 0x3000, 0x4000]
    assert regs[7] == dr7_for(4) == 0b01010101  # L0..L3, RW=00 LEN=00 (execute)
    t.remove(0, 0x2000)  # a stepped breakpoint moves into the freed register
    assert len(t.hardware) == 4 and len(t.stepped) == 1
    t.remove(0, 0x5000)
    t.remove(0, 0x6000)
    assert not t.overflow
    assert t.guest_debug(step=False)[0] == GUESTDBG_ENABLE | GUESTDBG_USE_HW_BP
    t.clear()
    assert t.guest_debug(step=False) == (0, [0] * 8)  # guest debugging off: full speed
    assert t.guest_debug(step=True)[0] == GUESTDBG_ENABLE | GUESTDBG_SINGLESTEP


def test_breakpoint_table_int3_on_vmx_svm():
    t = BreakpointTable(software_int3=True)
    assert t.insert(0, 0x1000) == "int3"
    t.planted(0x1000, b"\x55")
    assert t.insert(1, 0x2000) == "hw"  # hbreak still uses a debug register
    control, _ = t.guest_debug(step=False)
    assert control & GUESTDBG_USE_SW_BP and control & GUESTDBG_USE_HW_BP
    assert t.remove(0, 0x1000) == b"\x55"
