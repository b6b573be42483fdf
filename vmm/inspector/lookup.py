"""One address at a time, as text: a virtual address's walk level by level, and
a dump of guest-physical memory.

The one rendering shared by every front end that shows them (gdb's
``monitor translate`` / ``monitor xp``, and the CLI), so the two always
print the same thing. Reads go through ``mm``'s bounds-checked physical
memory; entries are decoded, never trusted.
"""

from __future__ import annotations

from mm.addr import is_canonical
from mm.entry import LEVELS, Entry
from mm.errors import OutOfBounds
from mm.flags import ADDR_MASK, PteFlags

from ..render import flags_str

__all__ = ["translate_text", "hexdump"]

#: The most bytes a physical dump prints (64 KiB: 4096 lines).
MAX_DUMP = 1 << 16


def translate_text(physmem, cr3: int, virt: int, *, nxe: bool = True) -> str:
    """The SDM's walk of ``virt`` from ``cr3``: each level's table, index,
    entry and flags, then the physical address and the effective permissions
    (W and U only if set at every level, NX if set at any)."""
    if not is_canonical(virt):
        return f"{virt:#018x}: not canonical (bits 63:47 must all equal bit 47): #GP, no walk"
    lines = [f"{virt:#018x}  CR3 {cr3:#x}"]
    table = cr3 & ADDR_MASK
    w = u = True
    nx = False
    for lv in LEVELS:
        index = (virt >> lv.shift) & 511
        slot = table + 8 * index
        try:
            value = physmem.read_u64(slot)
        except OutOfBounds:
            lines.append(f"  {lv.name:<4} table {table:#x}[{index:3}]  entry at {slot:#x} is outside guest RAM: "
                         "the walk stops")
            return "\n".join(lines)
        e = Entry.decode(value, lv.number)
        lines.append(f"  {lv.name:<4} table {table:#x}[{index:3}] = {value:#018x}  {flags_str(PteFlags(value & ~ADDR_MASK)) if e.present else 'not present'}")
        if not e.present:
            lines.append(f"  not mapped: {lv.name} entry {index} is not present (a #PF here)")
            return "\n".join(lines)
        rsv = e.reserved_bits(nxe=nxe)
        if rsv:
            lines.append(f"  reserved bits {rsv:#x} set: the walk faults (#PF with RSVD=1)")
            return "\n".join(lines)
        w = w and bool(value & PteFlags.WRITABLE)
        u = u and bool(value & PteFlags.USER)
        nx = nx or bool(value & PteFlags.NO_EXECUTE)
        if e.is_leaf:
            phys = e.address + (virt & (lv.span - 1))
            perms = ("W" if w else "R") + ("U" if u else "S") + ("-" if nx else "X")
            ram = int(physmem.size) + int(getattr(physmem, "base", 0))
            where = "" if phys < ram else "  (outside guest RAM)"
            lines.append(f"  -> physical {phys:#x}{where}, {lv.span >> 10} KiB page, effective {perms} "
                         f"({'writable' if w else 'read-only'}, {'user' if u else 'supervisor'}, "
                         f"{'no-execute' if nx else 'executable'})")
            return "\n".join(lines)
        table = e.address
    return "\n".join(lines)  # pragma: no cover - the PT level is always a leaf


def hexdump(data: bytes, base: int) -> str:
    """16 bytes a line: address, hex, ASCII."""
    out = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hx = " ".join(f"{b:02x}" for b in chunk)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        out.append(f"{base + off:016x}  {hx:<47}  {asc}")
    return "\n".join(out)
