"""Hostile page tables: findings, bounded work, no exception, no read outside memory."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm.findings import Severity, WalkReport
from mm.flags import PteFlags
from mm.physmem import BufferMemory
from mm.walker import translate, walk
from tests.mm.reference import naive_translate

F = PteFlags
P, W, PS = int(F.PRESENT), int(F.WRITABLE), int(F.HUGE)


class CountingMemory(BufferMemory):
    """BufferMemory that records how many tables were read."""

    def __init__(self, buf):
        super().__init__(buf)
        self.tables_read = 0

    def read_tables(self, paddrs):
        self.tables_read += len(paddrs)
        return super().read_tables(paddrs)


def walk_all(mem, cr3, **kw):
    report = WalkReport(max_findings=kw.pop("max_findings", 1000))
    t0 = time.perf_counter()
    runs = list(walk(mem, cr3, report=report, **kw))
    return runs, report, time.perf_counter() - t0


def kinds(report):
    return {f.kind for f in report.findings}


def test_self_referencing_pml4_is_bounded():
    mem = CountingMemory(bytearray(0x4000))
    for i in range(512):
        mem.write_u64(0x1000 + 8 * i, 0x1000 | P | W)  # every entry points at the PML4 itself
    runs, report, dt = walk_all(mem, 0x1000)
    assert {"cycle", "shared_table"} <= kinds(report)
    assert mem.tables_read <= 4  # once per level
    # Hardware view: PML4 read as PT maps each page to the PML4 frame (recursive mapping).
    assert runs and all(r.phys == 0x1000 for r in runs)
    assert dt < 1.0


def test_ancestor_cycle():
    mem = BufferMemory(bytearray(0x5000))
    mem.write_u64(0x1000, 0x2000 | P | W)  # PML4 -> PDPT
    mem.write_u64(0x2000, 0x3000 | P | W)  # PDPT -> PD
    mem.write_u64(0x3000, 0x2000 | P | W)  # PD -> the PDPT again (used as a PT)
    runs, report, _ = walk_all(mem, 0x1000)
    cyc = [f for f in report.findings if f.kind == "cycle"]
    assert cyc and cyc[0].level == 2 and cyc[0].table == 0x3000 and cyc[0].entry == 0x2000 | P | W
    # The PDPT read as a PT: its entry 0 maps virt 0 to frame 0x3000, as the CPU would.
    assert [(r.virt, r.phys, r.size) for r in runs] == [(0, 0x3000, 0x1000)]
    assert translate(mem, 0x1000, 0) == naive_translate(mem, 0x1000, 0)


def test_fan_out_is_bounded():
    """Every entry of every level points at the same next table: 512**4 paths, 4 table reads."""
    mem = CountingMemory(bytearray(0x6000))
    for table, nxt in ((0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)):
        mem.write_u64s(table, np.full(512, nxt | P | W, dtype=np.uint64))
    mem.write_u64s(0x4000, np.arange(512, dtype=np.uint64) * np.uint64(0x1000) + np.uint64(P))
    runs, report, dt = walk_all(mem, 0x1000, max_findings=50)
    assert mem.tables_read == 4 and dt < 1.0
    assert [(r.virt, r.size) for r in runs] == [(0, 512 * 0x1000)]
    assert len(report.findings) == 50 and report.suppressed > 0


def test_cr3_outside_ram():
    mem = BufferMemory(bytearray(0x2000))
    for cr3 in (0x2000, 0x1_0000_0000, 0x2FFF):
        runs, report, _ = walk_all(mem, cr3)
        assert runs == [] and kinds(report) == {"cr3_outside_ram"}
    assert translate(mem, 0x5000, 0) is None


def test_cr3_above_maxphyaddr():
    runs, report, _ = walk_all(BufferMemory(bytearray(0x2000)), 1 << 45, maxphyaddr=40)
    assert runs == [] and report.findings[0].kind == "reserved_bits"


def test_entries_outside_ram():
    mem = BufferMemory(bytearray(0x3000))
    mem.write_u64(0x1000, 0x7_0000_0000 | P | W)  # PML4[0] -> a table beyond RAM
    mem.write_u64(0x1008, 0x2000 | P | W)  # PML4[1] -> PDPT
    mem.write_u64(0x2000, 0x4000_0000 | P | PS)  # 1 GiB leaf far beyond RAM: still mapped
    runs, report, _ = walk_all(mem, 0x1000)
    assert kinds(report) == {"table_outside_ram", "leaf_outside_ram"}
    assert [(r.virt, r.phys, r.size) for r in runs] == [(1 << 39, 0x4000_0000, 1 << 30)]
    bad = report.of_kind("table_outside_ram")[0]
    assert bad.severity == Severity.ERROR and bad.virt == 0 and bad.level == 4 and bad.table == 0x1000


def test_reserved_bits_drop_the_subtree():
    mem = BufferMemory(bytearray(0x5000))
    mem.write_u64(0x1000, 0x2000 | P | W | PS)  # PS in a PML4E is reserved
    mem.write_u64(0x1008, 0x2000 | P | W)
    mem.write_u64(0x2000, 0x3000 | P | W)
    mem.write_u64(0x3000, 0x20_0000 | 0x2000 | P | PS)  # bit 13 of a 2 MiB leaf is reserved
    mem.write_u64(0x3008, 0x40_0000 | 0x1000 | P | PS)  # bit 12 is PAT: fine
    mem.write_u64(0x2008, (1 << 45) | P | PS)  # above MAXPHYADDR=40
    runs, report, _ = walk_all(mem, 0x1000, maxphyaddr=40)
    assert [(r.virt, r.phys) for r in runs] == [((1 << 39) + (1 << 21), 0x40_0000)]
    assert len(report.of_kind("reserved_bits")) == 3
    assert runs[0].flags & F.PAT_HUGE
    # Without 1 GiB page support a PDPTE with PS=1 is reserved too.
    mem.write_u64(0x2010, (1 << 30) | P | PS)
    assert translate(mem, 0x1000, (1 << 39) + (2 << 30)) is not None
    assert translate(mem, 0x1000, (1 << 39) + (2 << 30), gbpages=False) is None


def test_table_cap():
    mem = BufferMemory(bytearray(0x40_0000))
    mem.write_u64(0x1000, 0x2000 | P | W)
    mem.write_u64(0x2000, 0x3000 | P | W)
    # One PD pointing at 200 distinct PTs, each with one leaf.
    for i in range(200):
        mem.write_u64(0x3000 + 8 * i, 0x10_0000 + 0x1000 * i | P | W)
        mem.write_u64(0x10_0000 + 0x1000 * i, 0x1000 * i | P)
    runs, report, _ = walk_all(mem, 0x1000, max_tables=50)
    assert report.truncated and report.tables_visited == 50 and "table_limit" in kinds(report)
    assert sum(r.size for r in runs) == 47 * 0x1000


#: Random words, and present entries pointing inside the 64 KiB RAM with odd bits.
PRESENT_HEAVY = st.integers(0, (1 << 64) - 1) | st.builds(
    lambda frame, bits: (frame << 12) | bits | P,
    st.integers(0, 15),
    st.sampled_from([0, W, PS, PS | W, 1 << 63, 0x2000, 1 << 51, int(F.USER)]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PRESENT_HEAVY, min_size=1, max_size=64), st.integers(0, 2**32 - 1), st.integers(0, 15), st.data())
def test_random_garbage_never_escapes(pool, seed, root, data):
    """RAM filled from a pool of random entries (many present, many pointing inside
    RAM): no exception, bounded, and every reported run is what the CPU would translate."""
    rng = np.random.default_rng(seed)
    words = np.array(pool + [0], dtype=np.uint64)[rng.integers(0, len(pool) + 1, 0x10000 // 8)]
    mem = BufferMemory(bytearray(0x10000))
    mem.write_u64s(0, words)
    runs, report, dt = walk_all(mem, root * 0x1000, max_tables=64)
    assert dt < 2.0 and report.tables_visited <= 64
    assert all(r.size > 0 for r in runs)
    assert [r.virt for r in runs] == sorted(r.virt for r in runs)
    for r in runs[:10]:
        for v in (r.virt, r.end - 1, r.virt + data.draw(st.integers(0, r.size - 1))):
            t = naive_translate(mem, root * 0x1000, v)
            assert t is not None and t.phys == r.phys + (v - r.virt) and t.flags == r.flags
