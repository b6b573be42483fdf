"""The exit-storm guest: a tiny synthetic kernel that does N port writes.

Each ``out`` is one port-I/O exit to COM1's scratch register (no console
output), then the guest writes 0 to the exit port: a pure measure of exit
round trips, with no guest work in between. One PT_LOAD segment, ET_EXEC at
the kernel link base; built here so the benchmark needs neither the guest
toolchain nor the test tree.
"""

from __future__ import annotations

import struct

from ..elf import KernelImage, parse_kernel

LINK_BASE = 0xFFFF_FFFF_8000_0000
LOAD_PHYS = 0x10_0000
_PF_R, _PF_X = 4, 1


def storm_code(n: int) -> bytes:
    if not 0 < n < 1 << 32:
        raise ValueError(f"exit count {n} outside 1..2^32-1")
    return (
        b"\xb9" + n.to_bytes(4, "little")  # mov ecx, n
        + b"\x66\xba\xff\x03"  # mov dx, 0x3ff (COM1 scratch register)
        + b"\xee"  # L: out dx, al
        + b"\xff\xc9"  # dec ecx
        + b"\x75\xfb"  # jnz L
        + b"\x31\xc0"  # xor eax, eax
        + b"\xe7\xf4"  # out 0xf4, eax (exit device: status 0)
    )


def storm_elf(n: int) -> bytes:
    """An ELF64 ET_EXEC image: header, one program header, code at offset 0x1000."""
    code = storm_code(n)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, little-endian, version 1
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, LINK_BASE, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, _PF_R | _PF_X, 0x1000, LINK_BASE, LOAD_PHYS, len(code), len(code), 0x1000)
    head = ehdr + phdr
    return head + bytes(0x1000 - len(head)) + code


def storm_kernel(n: int) -> KernelImage:
    return parse_kernel(storm_elf(n))
