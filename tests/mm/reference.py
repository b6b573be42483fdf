"""Scalar reference walkers for the tests: the SDM's lookup, entry by entry.

The vectorised walker in ``mm.walker`` is checked against these; they are
slow and trust well-formed trees, so they live with the tests, not in ``mm``.
"""

from __future__ import annotations

from mm.addr import PHYS_ADDR_BITS, PageSize, is_canonical
from mm.entry import LEVELS, Entry
from mm.errors import OutOfBounds
from mm.flags import ADDR_MASK, PteFlags
from mm.physmem import PhysicalMemory
from mm.levels import linear_bits
from mm.walker import DEFAULT_LEAF_FLAGS, Run, Translation


def naive_translate(
    mem: PhysicalMemory, cr3: int, virt: int, *, maxphyaddr: int = PHYS_ADDR_BITS, nxe: bool = True,
    gbpages: bool = True, leaf_flags: PteFlags | int = DEFAULT_LEAF_FLAGS, levels=LEVELS,
) -> Translation | None:
    """The SDM's lookup for one address, entry by entry, one step per level (reference for tests)."""
    if not is_canonical(virt, linear_bits(levels)):
        return None
    table = cr3 & ADDR_MASK
    w = u = True
    nx = False
    for lv in levels:
        try:
            e = Entry.decode(mem.read_u64(table + 8 * ((virt >> lv.shift) & 511)), lv.number)
        except OutOfBounds:
            return None
        if not e.present or e.reserved_bits(maxphyaddr, nxe, gbpages):
            return None
        w, u = w and bool(e.value & PteFlags.WRITABLE), u and bool(e.value & PteFlags.USER)
        nx = nx or bool(e.value & PteFlags.NO_EXECUTE)
        if e.is_leaf:
            keep = int(leaf_flags)
            flags = PteFlags.PRESENT | (e.value & keep & ~PteFlags.PAT_HUGE)
            pat = e.value & (1 << 7) if lv.number == 1 else e.value & PteFlags.PAT_HUGE
            if pat and keep & PteFlags.PAT_HUGE:
                flags |= PteFlags.PAT_HUGE
            flags |= (PteFlags.WRITABLE if w else 0) | (PteFlags.USER if u else 0) | (PteFlags.NO_EXECUTE if nx else 0)
            off = virt & (lv.span - 1)
            return Translation(virt, e.address + off, PteFlags(flags), PageSize(lv.span), lv.number)
        table = e.address
    return None


def naive_walk(mem: PhysicalMemory, cr3: int, *, max_tables: int = 4096, **kw) -> list[Run]:
    """One uncoalesced Run per present leaf, found entry by entry (reference for tests).

    Follows every present non-leaf entry (no sharing rules), so use it on
    well-formed trees only.
    """
    out: list[Run] = []
    budget = [max_tables]

    def rec(table: int, li: int, base: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise RuntimeError("naive_walk: too many tables")
        lv = LEVELS[li]
        for i in range(512):
            lin = base | (i << lv.shift)
            try:
                raw = mem.read_u64(table + 8 * i)
            except OutOfBounds:
                return
            e = Entry.decode(raw, lv.number)
            if not e.present or e.reserved_bits(**{k: v for k, v in kw.items() if k != "leaf_flags"}):
                continue
            virt = lin | ((1 << 64) - (1 << 48)) if lin >= 1 << 47 else lin
            if e.is_leaf:
                t = naive_translate(mem, cr3, virt, **kw)
                if t is not None:
                    out.append(Run(virt, t.phys, lv.span, t.flags, t.page_size, t.level))
            else:
                rec(e.address, li + 1, lin)

    rec(cr3 & ADDR_MASK, 0, 0)
    return out
