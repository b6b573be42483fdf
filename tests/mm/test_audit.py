from __future__ import annotations

from mm.addr import PageSize
from mm.audit import (
    audit_all,
    audit_guard_pages,
    audit_outside_ram,
    audit_pt_aliases,
    audit_reserved_bits,
    audit_user_in_kernel_half,
    audit_wx,
)
from mm.findings import Severity
from mm.flags import PteFlags
from mm.walker import walk, walk_arrays

from .conftest import POOL, new_mapper

F = PteFlags
DIRECT = 0xFFFF_8000_0000_0000
KERNEL = 0xFFFF_FFFF_8000_0000
STACK = KERNEL + 0x10_0000


def guest():
    """A small ABI-like guest: direct map, kernel text/data, a guarded stack, one bad page of each kind."""
    m = new_mapper(forbid_wx=False)
    m.map_range(DIRECT, 0, 1 << 30, F.WRITABLE | F.NO_EXECUTE, PageSize.SIZE_2M)
    m.map_range(KERNEL, 0x10_0000, 0x4000, F.PRESENT)
    m.map_range(STACK, 0x20_0000, 0x4000, F.WRITABLE | F.NO_EXECUTE)
    return m


def test_clean_guest_has_only_expected_findings():
    m = guest()
    runs = list(walk(m.mem, m.root))
    assert audit_wx(runs) == [] and audit_user_in_kernel_half(runs) == []
    assert audit_guard_pages(m.mem, m.root, [(STACK, STACK + 0x4000)]) == []
    assert audit_reserved_bits(m.mem, m.root) == []
    assert audit_outside_ram(m.mem, m.root) == [f for f in audit_outside_ram(m.mem, m.root) if f.kind == "leaf_outside_ram"]
    # The direct map covers the page tables writable: reported unless excluded.
    aliases = audit_pt_aliases(m.mem, m.root)
    assert [f.virt for f in aliases] == [DIRECT] and "page-table frame" in aliases[0].detail
    assert audit_pt_aliases(m.mem, m.root, exclude=[(DIRECT, DIRECT + (1 << 30))]) == []


def test_each_problem_is_found():
    m = guest()
    m.map(KERNEL + 0x40_0000, 0x30_0000, PageSize.SIZE_4K, F.WRITABLE)  # W+X
    m.map(KERNEL + 0x60_0000, 0x31_0000, PageSize.SIZE_4K, F.USER | F.NO_EXECUTE)  # user page in kernel half
    m.map(STACK + 0x4000, 0x20_4000, PageSize.SIZE_4K, F.NO_EXECUTE)  # guard page above the stack mapped
    m.map(0x1000, POOL, PageSize.SIZE_4K, F.WRITABLE | F.NO_EXECUTE | F.USER)  # user-writable PML4
    m.mem.write_u64(m.root + 8 * 3, POOL | 0x81)  # PS is reserved in a PML4E
    m.mem.write_u64(m.root + 8 * 4, 0x7000_0000 | 3)  # PML4[4] -> a table outside RAM
    runs = walk_arrays(m.mem, m.root)
    assert [f.virt for f in audit_wx(runs)] == [KERNEL + 0x40_0000]
    assert [f.virt for f in audit_user_in_kernel_half(runs)] == [KERNEL + 0x60_0000]
    guard = audit_guard_pages(m.mem, m.root, [(STACK, STACK + 0x4000)])
    assert [(f.kind, f.virt) for f in guard] == [("guard_page_missing", STACK + 0x4000)]
    assert [f.virt for f in audit_pt_aliases(m.mem, m.root, exclude=[(DIRECT, DIRECT + (1 << 30))])] == [0x1000]
    assert [f.level for f in audit_reserved_bits(m.mem, m.root)] == [4]
    assert "table_outside_ram" in {f.kind for f in audit_outside_ram(m.mem, m.root)}
    everything = audit_all(m.mem, m.root, guard_ranges=[(STACK, STACK + 0x4000)],
                           pt_alias_exclude=[(DIRECT, DIRECT + (1 << 30))])
    kinds = {f.kind for f in everything}
    assert kinds >= {"wx", "user_in_kernel_half", "guard_page_missing", "pt_alias_writable", "reserved_bits",
                     "table_outside_ram"}
    assert [f.severity for f in everything] == sorted((f.severity for f in everything), reverse=True)
    assert everything[0].severity == Severity.ERROR
