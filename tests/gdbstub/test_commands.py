"""Payloads decoded into typed commands; malformed ones refused with BadCommand."""

from __future__ import annotations

import pytest

from vmm.gdbstub import commands as C


@pytest.mark.parametrize(
    "payload, cmd",
    [
        (b"?", C.QueryHalt()),
        (b"g", C.ReadRegisters()),
        (b"G0011", C.WriteRegisters(b"\x00\x11")),
        (b"p10", C.ReadRegister(16)),
        (b"P10=ffff", C.WriteRegister(16, b"\xff\xff")),
        (b"mffffffff80000000,8", C.ReadMemory(0xFFFFFFFF80000000, 8)),
        (b"M10,2:abcd", C.WriteMemory(0x10, b"\xab\xcd")),
        (b"X10,2:}\x03}]", C.WriteMemory(0x10, b"#}")),
        (b"X10,0:", C.WriteMemory(0x10, b"")),
        (b"c", C.Resume(False)),
        (b"s1000", C.Resume(True, 0x1000)),
        (b"C05", C.Resume(False, None, 5)),
        (b"vCont;c", C.Resume(False)),
        (b"vCont;s:1;c", C.Resume(True)),
        (b"vCont;s:p1.1;c", C.Resume(True)),
        (b"vCont?", C.VContQuery()),
        (b"Z0,ffffffff80001000,1", C.Breakpoint(True, 0, 0xFFFFFFFF80001000, 1)),
        (b"z1,1000,1", C.Breakpoint(False, 1, 0x1000, 1)),
        (b"Z2,1000,8", C.Breakpoint(True, 2, 0x1000, 8)),
        (b"D", C.Detach()),
        (b"D;1", C.Detach()),
        (b"k", C.Kill()),
        (b"vKill;1", C.Kill()),
        (b"qSupported:multiprocess+;xmlRegisters=i386", C.Supported((b"multiprocess+", b"xmlRegisters=i386"))),
        (b"QStartNoAckMode", C.StartNoAck()),
        (b"qXfer:features:read:target.xml:0,ffb", C.XferRead("features", "target.xml", 0, 0xFFB)),
        (b"qRcmd,7074", C.Monitor("pt")),
        (b"Hg0", C.Simple("thread")),
        (b"qOffsets", C.Simple("qOffsets")),
        (b"qSymbol::", C.Simple("qSymbol")),
        (b"vMustReplyEmpty", C.Unknown(b"vMustReplyEmpty")),
        (b"qXfer:exec-file:read:1:0,100", C.XferRead("exec-file", "1", 0, 0x100)),
        (b"", C.Unknown(b"")),
    ],
)
def test_decode(payload, cmd):
    assert C.decode(payload) == cmd


@pytest.mark.parametrize(
    "payload",
    [
        b"m", b"m10", b"m10,", b"mzz,4", b"m-1,4", b"m 10,4", b"m1,+4",
        b"m10000000000000000,1",  # 65-bit address
        b"m0,%x" % (C.MAX_LENGTH + 1),  # oversize length
        b"M10,2:abc", b"M10,2:abcdef", b"M10,2", b"X10,2:}", b"X10,3:ab",
        b"p", b"pxyz", b"P1", b"P1=zz", b"Gabc",
        b"Z0,1000", b"Zq,1000,1", b"vCont;", b"vCont;x", b"vCont;r1,2",
        b"qRcmd,7", b"qXfer:features:read:target.xml:0",
        b"C", b"sgg",
    ],
)
def test_malformed_is_refused(payload):
    with pytest.raises(C.BadCommand):
        C.decode(payload)
