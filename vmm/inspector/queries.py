"""The queries QEMU-monitor and gdb-pt-dump users expect: translate, x, xp, regs.

Each query is a pure function of guest RAM (an ``mm`` physical-memory
interface) and register values, returning a result with ``to_json()`` and
``text()``. The command line (``vmm translate/x/xp/regs``) prints them as
rich tables; the gdb stub's ``monitor translate/xp/regs`` prints ``text()``,
so both show the same thing.

* ``translate``: the 4-level walk for one virtual address, one row per
  level: the table, the index, the entry's raw value and flags, and the
  permissions in effect so far (W and U are ANDed over the levels, NX is
  ORed: SDM Vol. 3A, 4.6). A walk that stops says "not mapped at level N"
  (P=0) or names the reserved bits that would fault.
* ``hexdump_virt``/``hexdump_phys``: bytes through the guest's page tables
  or straight from RAM, with the physical address of each virtual line.
* ``registers``: every register, with decoded CR0/CR4/EFER/RFLAGS bits and
  segment kinds (``vmm.registers``).

Guest memory is never trusted: a walk reads at most four entries, a dump at
most ``MAX_DUMP`` bytes, and reads outside RAM end the dump with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mm.addr import is_canonical
from mm.entry import LEVELS, Entry
from mm.errors import MMError
from mm.flags import ADDR_MASK, PteFlags

from ..cpu import decode_bits
from ..errors import UsageError
from ..registers import SEGMENTS, format_registers, rflags_bits, segment_kind

MAX_DUMP = 64 << 10

# Short names of an entry's bits, in bit order (SDM Vol. 3A, tables 4-15..4-20).
_BITS = (
    (PteFlags.PRESENT, "P"), (PteFlags.WRITABLE, "W"), (PteFlags.USER, "U"), (PteFlags.WRITE_THROUGH, "PWT"),
    (PteFlags.CACHE_DISABLE, "PCD"), (PteFlags.ACCESSED, "A"), (PteFlags.DIRTY, "D"), (PteFlags.HUGE, "PS"),
    (PteFlags.GLOBAL, "G"), (PteFlags.NO_EXECUTE, "NX"),
)


class QueryError(UsageError):
    """Bad input to a query (non-canonical address, length out of range): one line."""


def entry_flags(value: int, level: int) -> list[str]:
    names = []
    for bit, name in _BITS:
        if value & bit:
            if bit == PteFlags.HUGE and level == 1:
                name = "PAT"  # bit 7 of a 4 KiB PTE
            if bit in (PteFlags.DIRTY, PteFlags.GLOBAL) and level > 1 and not (level in (2, 3) and value & PteFlags.HUGE):
                continue  # ignored in a table pointer
            names.append(name)
    return names


def _perms(w: bool, u: bool, nx: bool) -> str:
    return ("R" + ("W" if w else "-") + ("-" if nx else "X")) + (" user" if u else " supervisor")


@dataclass
class Step:
    level: int
    name: str
    table: int  # physical address of the table read at this level
    index: int
    entry_addr: int
    raw: int
    flags: list[str]
    target: int | None  # next table, or the page a leaf maps
    leaf: bool
    page_size: int | None
    effective: str  # permissions in effect down to this level

    def to_json(self) -> dict:
        return {
            "level": self.level, "name": self.name, "table": self.table, "index": self.index,
            "entry_addr": self.entry_addr, "entry": self.raw, "flags": self.flags, "target": self.target,
            "leaf": self.leaf, "page_size": self.page_size, "effective": self.effective,
        }


@dataclass
class Walk:
    virt: int
    cr3: int
    steps: list[Step] = field(default_factory=list)
    phys: int | None = None
    page_size: int | None = None
    writable: bool | None = None
    user: bool | None = None
    executable: bool | None = None
    stopped_at: int | None = None  # level where the walk ended without a page
    reason: str | None = None

    @property
    def mapped(self) -> bool:
        return self.phys is not None

    def to_json(self) -> dict:
        return {
            "virt": self.virt, "cr3": self.cr3, "mapped": self.mapped, "phys": self.phys,
            "page_size": self.page_size, "writable": self.writable, "user": self.user,
            "executable": self.executable, "stopped_at_level": self.stopped_at, "reason": self.reason,
            "steps": [s.to_json() for s in self.steps],
        }

    def summary(self) -> str:
        if self.mapped:
            perms = _perms(bool(self.writable), bool(self.user), not self.executable)
            return (f"{self.virt:#018x} -> {self.phys:#x} ({_size(self.page_size)} page, {perms})")
        return f"{self.virt:#018x}: {self.reason}"

    def text(self) -> str:
        """Plain text, one line per level (``vmm translate`` and gdb's ``monitor translate``)."""
        lines = [f"{self.virt:#018x}  CR3 {self.cr3:#x}"]
        for s in self.steps:
            what = "-" if s.target is None else (f"page {s.target:#x}" if s.leaf else f"table {s.target:#x}")
            lines.append(
                f"  {s.name:<4} table {s.table:#x}[{s.index:3}] = {s.raw:#018x}  {' '.join(s.flags) or 'not present':<14}"
                f" -> {what:<18} {s.effective}"
            )
        lines.append("  " + self.summary())
        return "\n".join(lines)


def _size(n: int | None) -> str:
    return {4096: "4 KiB", 2 << 20: "2 MiB", 1 << 30: "1 GiB"}.get(n or 0, f"{n} bytes")


def translate(physmem, cr3: int, virt: int, *, maxphyaddr: int = 52, nxe: bool = True, gbpages: bool = True) -> Walk:
    """The hardware's walk for ``virt``, level by level, as the host reads it."""
    if not 0 <= virt < 1 << 64:
        raise QueryError(f"address {virt:#x} is not a 64-bit value")
    walk = Walk(virt, cr3)
    if not is_canonical(virt):
        walk.reason = "not canonical (bits 63:47 must all equal bit 47): #GP, no walk"
        return walk
    table = cr3 & ADDR_MASK  # CR3 bits 51:12: the root table, as in an entry
    w = u = True
    nx = False
    for lv in LEVELS:
        index = lv.index(virt)
        addr = table + 8 * index
        try:
            raw = physmem.read_u64(addr)
        except (MMError, ValueError, IndexError, OSError):
            walk.stopped_at, walk.reason = lv.number, f"the {lv.name} table at {table:#x} is outside guest RAM"
            return walk
        e = Entry.decode(raw, lv.number)
        if e.present:
            w, u = w and bool(raw & PteFlags.WRITABLE), u and bool(raw & PteFlags.USER)
            nx = nx or (nxe and bool(raw & PteFlags.NO_EXECUTE))
        leaf = e.present and e.is_leaf
        walk.steps.append(Step(
            lv.number, lv.name, table, index, addr, raw, entry_flags(raw, lv.number),
            e.address if e.present else None, leaf, int(e.page_size) if leaf else None,
            _perms(w, u, nx) if e.present else "-",
        ))
        if not e.present:
            walk.stopped_at, walk.reason = lv.number, f"not mapped at level {lv.number} ({lv.name} entry {index}: P=0)"
            return walk
        reserved = e.reserved_bits(maxphyaddr, nxe, gbpages)
        if reserved:
            walk.stopped_at = lv.number
            walk.reason = f"reserved bits {reserved:#x} set at level {lv.number} ({lv.name} entry {index}): the access faults"
            return walk
        if leaf:
            walk.phys = e.address + (virt & (lv.span - 1))
            walk.page_size = lv.span
            walk.writable, walk.user, walk.executable = w, u, not nx
            return walk
        table = e.address
    return walk  # unreachable: level 1 is always a leaf


# --- hexdumps ---------------------------------------------------------------------------------


@dataclass
class Dump:
    addr: int
    virtual: bool
    data: bytes
    phys: list[int | None] = field(default_factory=list)  # physical address of each 16-byte line (virtual dumps)
    note: str | None = None

    def to_json(self) -> dict:
        out = {"addr": self.addr, "space": "virtual" if self.virtual else "physical", "length": len(self.data),
               "hex": self.data.hex(), "note": self.note}
        if self.virtual:
            out["phys"] = self.phys
        return out

    def lines(self) -> list[tuple[int, int | None, bytes]]:
        out = []
        for i in range(0, len(self.data), 16):
            out.append((self.addr + i, self.phys[i // 16] if self.virtual and i // 16 < len(self.phys) else None,
                        self.data[i : i + 16]))
        return out

    def text(self) -> str:
        rows = []
        for addr, phys, chunk in self.lines():
            hexpart = " ".join(chunk[j : j + 8].hex(" ") for j in range(0, len(chunk), 8))
            ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
            where = f" (phys {phys:#x})" if phys is not None else ""
            rows.append(f"{addr:016x}{where}  {hexpart:<48}  |{ascii_}|")
        if self.note:
            rows.append(self.note)
        return "\n".join(rows)


def _check_len(length: int) -> None:
    if not 0 < length <= MAX_DUMP:
        raise QueryError(f"length {length} is outside 1..{MAX_DUMP}")


def hexdump_phys(physmem, ram_size: int, paddr: int, length: int) -> Dump:
    _check_len(length)
    if not 0 <= paddr < ram_size:
        raise QueryError(f"physical address {paddr:#x} is outside guest RAM (0..{ram_size:#x})")
    n = min(length, ram_size - paddr)
    d = Dump(paddr, False, physmem.read(paddr, n))
    if n < length:
        d.note = f"stopped at the end of guest RAM ({ram_size:#x})"
    return d


def hexdump_virt(physmem, cr3: int, virt: int, length: int, **walk_kw) -> Dump:
    """Bytes at ``virt`` through the page tables, page by page; stops at the first unmapped page."""
    _check_len(length)
    if not is_canonical(virt):
        raise QueryError(f"address {virt:#x} is not canonical")
    data = bytearray()
    phys_of: dict[int, int] = {}
    cur, end = virt, virt + length
    note = None
    while cur < end:
        w = translate(physmem, cr3, cur, **walk_kw)
        if not w.mapped:
            note = f"stopped at {cur:#x}: {w.reason}"
            break
        page_end = (cur | (w.page_size - 1)) + 1
        n = min(end, page_end) - cur
        data += physmem.read(w.phys, n)
        phys_of[cur] = w.phys
        cur += n
    if not data and note:
        raise QueryError(f"{virt:#x}: {note.split(': ', 1)[1]}")
    d = Dump(virt, True, bytes(data), note=note)
    # the physical address of each 16-byte line (from the page it starts in)
    starts = sorted(phys_of)
    for i in range(0, len(data), 16):
        a = virt + i
        base = max(s for s in starts if s <= a)
        d.phys.append(phys_of[base] + (a - base))
    return d


# --- registers -----------------------------------------------------------------------------------


@dataclass
class Registers:
    values: dict[str, int]

    def to_json(self) -> dict:
        out: dict = {"registers": dict(self.values)}
        v = self.values
        out["decoded"] = {
            "cr0": decode_bits("cr0", v["cr0"]), "cr4": decode_bits("cr4", v["cr4"]),
            "efer": decode_bits("efer", v["efer"]), "rflags": rflags_bits(v["rflags"]),
        }
        if "cs_attr" in v:
            out["decoded"]["segments"] = {s: segment_kind(v[f"{s}_attr"], s) for s in SEGMENTS}
        return out

    def text(self) -> str:
        return format_registers(self.values)
