"""translate / x / xp / regs: pure tests on tables built by the mapper, then the
CLI against a guest booted to READY and against a running guest's control socket."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from mm.addr import PageSize
from mm.flags import PteFlags as F
from mm.frames import BumpFrameAllocator
from mm.mapper import Mapper
from mm.physmem import BufferMemory
from mm.walker import translate as walker_translate
from vmm.inspector.queries import QueryError, hexdump_phys, hexdump_virt, translate

RAM = 8 << 20
KERNEL = 0xFFFF_FFFF_8000_0000


@pytest.fixture
def space():
    mem = BufferMemory(bytearray(RAM))
    m = Mapper.new(mem, BumpFrameAllocator(0x10000, 0x100000), forbid_wx=False)
    m.map(KERNEL, 0x200000, PageSize.SIZE_4K, F.PRESENT)  # read-only, executable
    m.map(KERNEL + 0x1000, 0x201000, PageSize.SIZE_4K, F.PRESENT | F.WRITABLE | F.NO_EXECUTE)
    m.map(0x40000000, 0x400000, PageSize.SIZE_2M, F.PRESENT | F.WRITABLE | F.USER)
    mem.write(0x200FF0, bytes(range(16)))
    mem.write(0x201000, b"next page!")
    return mem, m.root


def test_walk_level_by_level(space):
    mem, cr3 = space
    w = translate(mem, cr3, KERNEL + 0x123)
    assert [s.name for s in w.steps] == ["PML4", "PDPT", "PD", "PT"]
    assert [s.index for s in w.steps] == [511, 510, 0, 0]
    assert w.phys == 0x200123 and w.page_size == 4096
    assert (w.writable, w.user, w.executable) == (False, False, True)
    assert w.steps[-1].effective == "R-X supervisor" and w.steps[0].effective == "RWX supervisor"
    assert w.steps[0].entry_addr == cr3 + 8 * 511
    assert "P" in w.steps[-1].flags and "W" not in w.steps[-1].flags
    assert "-> 0x200123 (4 KiB page, R-X supervisor)" in w.text()


def test_huge_page_stops_at_level_2(space):
    mem, cr3 = space
    w = translate(mem, cr3, 0x40012345)
    assert len(w.steps) == 3 and w.steps[-1].leaf and "PS" in w.steps[-1].flags
    assert w.phys == 0x412345 and w.page_size == 2 << 20 and w.user and w.writable


@pytest.mark.parametrize("virt,level", [(0x7000_0000_1234, 4), (0xFFFF_FFFF_0000_0000, 3), (KERNEL + 0x200000, 2), (KERNEL + 0x5000, 1)])
def test_not_mapped_at_level_n(space, virt, level):
    mem, cr3 = space
    w = translate(mem, cr3, virt)
    assert not w.mapped and w.stopped_at == level
    assert w.reason.startswith(f"not mapped at level {level} (")


def test_reserved_bits_fault(space):
    mem, cr3 = space
    pte = translate(mem, cr3, KERNEL).steps[-1]
    mem.write_u64(pte.entry_addr, pte.raw | (1 << 51))  # above a 46-bit MAXPHYADDR
    w = translate(mem, cr3, KERNEL, maxphyaddr=46)
    assert not w.mapped and w.stopped_at == 1 and "reserved bits 0x8000000000000" in w.reason


def test_non_canonical():
    w = translate(BufferMemory(bytearray(RAM)), 0x10000, 0x0000_8000_0000_0000)
    assert not w.mapped and "not canonical" in w.reason and not w.steps


def test_agrees_with_the_walker(space):
    mem, cr3 = space
    rng = random.Random(16)
    probes = [KERNEL + rng.randrange(0x3000), 0x40000000 + rng.randrange(4 << 20)] + [rng.getrandbits(48) for _ in range(50)]
    for v in probes:
        v = v if v < 1 << 47 else v | 0xFFFF_0000_0000_0000
        ours, ref = translate(mem, cr3, v), walker_translate(mem, cr3, v)
        assert ours.mapped == (ref is not None), hex(v)
        if ref is not None:
            assert ours.phys == ref.phys and ours.writable == bool(ref.flags & F.WRITABLE)
            assert ours.executable == (not ref.flags & F.NO_EXECUTE) and ours.user == bool(ref.flags & F.USER)


def test_virtual_dump_crosses_pages_and_stops_at_a_hole(space):
    mem, cr3 = space
    d = hexdump_virt(mem, cr3, KERNEL + 0xFF0, 0x2000)
    assert d.data[:16] == bytes(range(16)) and d.data[16:26] == b"next page!"
    assert len(d.data) == 0x1010 and d.note.startswith(f"stopped at {KERNEL + 0x2000:#x}: not mapped at level 1")
    assert d.phys[0] == 0x200FF0 and d.phys[1] == 0x201000
    assert "|................|" in d.text() and "next page!" in d.text()
    with pytest.raises(QueryError, match="0x1000: not mapped at level 3"):
        hexdump_virt(mem, cr3, 0x1000, 16)


def test_physical_dump_bounds():
    mem = BufferMemory(bytearray(RAM))
    mem.write(RAM - 4, b"end!")
    d = hexdump_phys(mem, RAM, RAM - 4, 64)
    assert d.data == b"end!" and "end of guest RAM" in d.note
    with pytest.raises(QueryError, match="outside guest RAM"):
        hexdump_phys(mem, RAM, RAM, 16)
    with pytest.raises(QueryError, match="outside 1.."):
        hexdump_phys(mem, RAM, 0, 0)


# --- the command line -------------------------------------------------------------------------


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "vmm.py", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["x"], "the following arguments are required"),
        (["xp", "0x1000", "ten"], "'ten' is not a number"),
        (["translate", "0x1", "0x2"], "usage: vmm translate [SOCKET] VA"),
        (["regs", "/nonexistent-dir/vm.sock"], "no VM control socket"),
    ],
)
def test_bad_input_is_one_line(vmm_cli, args, fragment):
    proc = vmm_cli(*args)
    assert proc.returncode == 2 and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.kvm
def test_queries_on_a_guest_booted_to_ready(guest_kernel_path):
    k = ["--kernel", str(guest_kernel_path), "--no-kaslr"]
    w = json.loads(_cli("translate", "0xffffffff80000000", *k, "--json").stdout)
    assert w["mapped"] and w["phys"] == 0x100000 and w["executable"] and not w["writable"]
    assert [s["name"] for s in w["steps"]] == ["PML4", "PDPT", "PD", "PT"]
    # the same bytes through the tables and straight from RAM
    x = json.loads(_cli("x", "0xffffffff80000000", "32", *k, "--json").stdout)
    xp = json.loads(_cli("xp", hex(w["phys"]), "32", *k, "--json").stdout)
    assert x["hex"] == xp["hex"] and len(bytes.fromhex(x["hex"])) == 32
    table = _cli("translate", "0x1234", *k)
    assert table.returncode == 0 and "not mapped at level 4" in table.stdout
    regs = _cli("regs", *k)
    assert regs.returncode == 0
    for word in ("rip", "gdtr", "idtr", "tr", "code64 DPL0", "tss64-busy", "PE MP ET NE WP PG", "LME LMA NXE"):
        assert word in regs.stdout, word


@pytest.mark.kvm
def test_queries_against_a_control_socket(guest_kernel_path, tmp_path):
    sock = tmp_path / "vm.sock"
    vm = subprocess.Popen([sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "-q", "-c", "workload=mm",
                           "--control", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert vm.poll() is None, vm.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        regs = json.loads(_cli("regs", str(sock), "--json").stdout)
        r = regs["registers"]
        assert r["cs"] == 0x08 and r["rip"] >= 0xFFFF_FFFF_8000_0000
        assert "PG" in regs["decoded"]["cr0"] and "NXE" in regs["decoded"]["efer"]
        rip = r["rip"]
        w = json.loads(_cli("translate", str(sock), hex(rip), "--json").stdout)
        assert w["mapped"] and w["executable"] and not w["user"]
        x = _cli("x", str(sock), hex(w["virt"] & ~0xF), "16")
        assert x.returncode == 0 and f"{w['phys'] & ~0xF:#x}" in x.stdout
        xp = json.loads(_cli("xp", str(sock), "0", "16", "--json").stdout)
        assert xp["space"] == "physical" and xp["length"] == 16
        assert vm.poll() is None  # the VM kept running through all of it
    finally:
        vm.terminate()
        vm.wait(timeout=30)
