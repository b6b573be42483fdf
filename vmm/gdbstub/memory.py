"""gdb's view of memory: virtual addresses through the guest's current CR3.

Translation uses the project's own walker (``mm.walker``) over guest RAM,
never KVM_TRANSLATE: that ioctl sets Accessed bits in the guest's tables
(HOST.md), and a debugger that changes what it looks at is no debugger.
Guest RAM itself goes through ``mm``'s bounds-checked physical-memory
interface, so no guest-controlled entry can make the host touch anything
outside it.

- Reads return the mapped prefix of the range (gdb accepts a short ``m``
  reply); a range whose first byte is unmapped or non-canonical is an error.
- Writes are all or nothing: every page of the range must be mapped, inside
  RAM, and writable by the guest kernel's effective permissions (W at every
  level), unless ``write_through`` is on (``monitor write-through on``),
  which ignores W as a debugger poking at read-only text expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm.addr import VIRT_ADDR_BITS, is_canonical
from mm.flags import ADDR_MASK, PteFlags
from mm.walker import walk_arrays

__all__ = ["MemoryFault", "Pieces", "pieces", "read_virtual", "write_virtual", "EFER_NXE"]

EFER_NXE = 1 << 11  # IA32_EFER.NXE: bit 63 of an entry is XD, not reserved


class MemoryFault(Exception):
    """Why gdb's access failed; ``code`` is the errno-style value sent as ``Exx``."""

    def __init__(self, addr: int, reason: str, code: int = 14):  # 14 = EFAULT
        super().__init__(f"{addr:#x}: {reason}")
        self.addr = addr
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class Pieces:
    """``(phys, length, writable)`` pieces backing the mapped prefix of a range."""

    parts: list[tuple[int, int, bool]]

    @property
    def length(self) -> int:
        return sum(n for _p, n, _w in self.parts)


def pieces(physmem, cr3: int, addr: int, n: int, *, nxe: bool = True) -> Pieces:
    """The physical pieces of the longest mapped prefix of ``[addr, addr + n)``."""
    if not is_canonical(addr):
        raise MemoryFault(addr, "non-canonical address")
    end = addr + n
    if n and not is_canonical(end - 1):
        half = 1 << (VIRT_ADDR_BITS - 1)  # the lower half's end (the levels decide the width)
        end = half if addr < half else (1 << 64)  # stop at the canonical hole / top
    runs = walk_arrays(physmem, cr3 & ADDR_MASK, addr, end, nxe=nxe, max_tables=64)
    parts: list[tuple[int, int, bool]] = []
    cur = addr
    ram = int(physmem.size) + int(getattr(physmem, "base", 0))
    for virt, phys, size, flags in zip(runs.virt.tolist(), runs.phys.tolist(), runs.size.tolist(), runs.flags.tolist()):
        if virt != cur:
            break
        if phys + size > ram:
            size = max(0, ram - phys)  # a leaf pointing past RAM: stop where RAM ends
            if size:
                parts.append((phys, size, bool(flags & PteFlags.WRITABLE)))
            cur += size
            break
        parts.append((phys, size, bool(flags & PteFlags.WRITABLE)))
        cur += size
    if not parts and n:
        raise MemoryFault(addr, "not mapped")
    return Pieces(parts)


def read_virtual(physmem, cr3: int, addr: int, n: int, *, nxe: bool = True) -> bytes:
    """Up to ``n`` bytes at ``addr``: the mapped prefix (at least one byte) or MemoryFault."""
    if n == 0:
        return b""
    return b"".join(physmem.read(p, size) for p, size, _w in pieces(physmem, cr3, addr, n, nxe=nxe).parts)


def write_virtual(physmem, cr3: int, addr: int, data: bytes, *, write_through: bool = False, nxe: bool = True) -> None:
    """Write all of ``data`` at ``addr`` or nothing (MemoryFault says why)."""
    if not data:
        return
    ps = pieces(physmem, cr3, addr, len(data), nxe=nxe)
    if ps.length < len(data):
        raise MemoryFault(addr + ps.length, "not mapped (or not guest RAM); nothing written")
    if not write_through:
        off = 0
        for _p, size, writable in ps.parts:
            if not writable:
                raise MemoryFault(addr + off, "read-only in the guest's page tables (monitor write-through on "
                                  "to write anyway); nothing written", code=13)  # 13 = EACCES
            off += size
    mv = memoryview(data)
    for p, size, _w in ps.parts:
        physmem.write(p, mv[:size])
        mv = mv[size:]
