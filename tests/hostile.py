"""Small hostile test guests, one per scenario, as raw x86-64 machine code.

Each is a one-segment ELF kernel (tests/elfgen.py) the host loads like any
other; the host must stay up and report what happened. Encodings are spelled
out next to each instruction.
"""

from __future__ import annotations

import struct

from tests.elfgen import HIGH, PF_R, PF_W, PF_X, Elf, Seg

PHYS_OFFSET = 0xFFFF_8000_0000_0000

EXIT_0 = b"\x31\xc0" + b"\xe7\xf4"  # xor eax, eax ; out 0xf4, eax


def _exit(code: int) -> bytes:
    return b"\xb8" + struct.pack("<I", code) + b"\xe7\xf4"  # mov eax, code ; out 0xf4, eax


def kernel(code: bytes, *, data: bytes | None = None) -> bytes:
    """A kernel whose entry is ``code`` (RX), plus an optional RW data page."""
    segs = [Seg(HIGH, 0x100000, code, flags=PF_R | PF_X)]
    if data is not None:
        segs.append(Seg(HIGH + 0x10000, 0x110000, data, flags=PF_R | PF_W))
    return Elf(segments=segs, entry=HIGH).build()


def write_own_text() -> bytes:
    """Clear CR0.WP, then write to its own .text: only the read-only slot stops it."""
    return kernel(
        b"\x0f\x20\xc0"  # mov rax, cr0
        + b"\x48\x25\xff\xff\xfe\xff"  # and rax, ~(1 << 16)   (CR0.WP)
        + b"\x0f\x22\xc0"  # mov cr0, rax
        + b"\x48\x8d\x1d\x00\x00\x00\x00"  # lea rbx, [rip]
        + b"\xc6\x03\x90"  # mov byte [rbx], 0x90
        + _exit(0x42)
    )


def garbage_page_tables(pattern: int = 0xDEAD_BEEF_CAFE_F007) -> bytes:
    """Overwrite every PML4 entry with garbage (present, reserved bits set), then exit."""
    return kernel(
        b"\x0f\x20\xd8"  # mov rax, cr3
        + b"\x48\xbb" + struct.pack("<Q", PHYS_OFFSET)  # movabs rbx, PHYS_OFFSET
        + b"\x48\x01\xc3"  # add rbx, rax
        + b"\x48\xc7\xc1\x00\x02\x00\x00"  # mov rcx, 512
        + b"\x48\xb8" + struct.pack("<Q", pattern)  # movabs rax, pattern
        + b"\x48\x89\x03"  # L: mov [rbx], rax
        + b"\x48\x83\xc3\x08"  # add rbx, 8
        + b"\x48\xff\xc9"  # dec rcx
        + b"\x75\xf4"  # jnz L
        + _exit(0x42)
    )


def cyclic_page_tables() -> bytes:
    """Point PML4[0] at the PML4 itself (a cycle through the tables), then exit."""
    return kernel(
        b"\x0f\x20\xd8"  # mov rax, cr3
        + b"\x48\x89\xc2"  # mov rdx, rax
        + b"\x48\x83\xca\x03"  # or rdx, 3 (present, writable)
        + b"\x48\xbb" + struct.pack("<Q", PHYS_OFFSET)  # movabs rbx, PHYS_OFFSET
        + b"\x48\x01\xc3"  # add rbx, rax
        + b"\x48\x89\x13"  # mov [rbx], rdx      (PML4[0] = PML4 | P | W)
        + b"\x48\x89\x53\x08"  # mov [rbx+8], rdx (PML4[1] too)
        + _exit(0x42)
    )


# CPUID.80000008H:EAX[7:0] is MAXPHYADDR: the guest asks its own vCPU, so the
# CR3 guests below mean the same thing on a 36-bit and on a 52-bit host.
_MAXPHYADDR_TO_ECX = (
    b"\xb8\x08\x00\x00\x80"  # mov eax, 0x80000008
    + b"\x0f\xa2"  # cpuid
    + b"\x0f\xb6\xc8"  # movzx ecx, al        (ecx = MAXPHYADDR)
)
_RAX_1_SHL_CL = b"\xb8\x01\x00\x00\x00" + b"\x48\xd3\xe0"  # mov eax, 1 ; shl rax, cl

#: Offset of the ``mov cr3, rax`` in :func:`cr3_reserved_bits` (for the RIP check).
CR3_RESERVED_MOV_OFFSET = len(_MAXPHYADDR_TO_ECX) + len(_RAX_1_SHL_CL) + 6


def cr3_outside_ram() -> bytes:
    """Load CR3 with 2^(MAXPHYADDR-1) + 0x5000: a legal value (no reserved bit)
    far outside RAM (MAXPHYADDR >= 36, guest RAM <= 64 GiB), then exit."""
    return kernel(
        _MAXPHYADDR_TO_ECX
        + b"\xff\xc9"  # dec ecx
        + _RAX_1_SHL_CL
        + b"\x48\x0d\x00\x50\x00\x00"  # or rax, 0x5000
        + b"\x0f\x22\xd8"  # mov cr3, rax
        + EXIT_0
    )


def cr3_reserved_bits() -> bytes:
    """Set bit MAXPHYADDR (reserved: SDM 4.5.2) in the current CR3 and load it:
    MOV to CR3 raises #GP, which with no IDT becomes a triple fault."""
    return kernel(
        _MAXPHYADDR_TO_ECX
        + _RAX_1_SHL_CL
        + b"\x0f\x20\xdb"  # mov rbx, cr3
        + b"\x48\x09\xd8"  # or rax, rbx
        + b"\x0f\x22\xd8"  # mov cr3, rax       (#GP)
        + EXIT_0
    )


def serial_spam(n: int) -> bytes:
    return kernel(
        b"\xb9" + struct.pack("<I", n)  # mov ecx, n
        + b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
        + b"\xb0\x41"  # mov al, 'A'
        + b"\xee"  # L: out dx, al
        + b"\xff\xc9"  # dec ecx
        + b"\x75\xfb"  # jnz L
        + EXIT_0
    )


def endless_loop() -> bytes:
    return kernel(b"\xeb\xfe")  # jmp $


def triple_fault() -> bytes:
    return kernel(b"\x0f\x0b")  # ud2 with no IDT: #UD -> #DF -> shutdown


def unknown_port() -> bytes:
    return kernel(b"\xb0\x01" + b"\xe6\x80" + EXIT_0)  # mov al, 1 ; out 0x80, al


def mmio_write(virt: int) -> bytes:
    """Store to ``virt`` (the test maps it to an address beyond RAM first)."""
    return kernel(b"\x48\xbb" + struct.pack("<Q", virt) + b"\x89\x03" + EXIT_0)  # movabs rbx ; mov [rbx], eax


def report_outside_ram(addr: int = 0xFFFF_F000) -> bytes:
    """Point the report channel outside RAM, then at a bogus header, then exit 0."""
    return kernel(
        b"\xb8" + struct.pack("<I", addr) + b"\x66\xba\x00\x05" + b"\xef"  # mov eax, addr ; mov dx, 0x500 ; out dx, eax
        + b"\xb8\x00\x10\x00\x00" + b"\xef"  # mov eax, 0x1000 (the GDT: not a report) ; out dx, eax
        + EXIT_0
    )


def end_flag_at(addr: int) -> bytes:
    """Name ``addr`` as the end-of-work flag the host writes (port 0x524), then exit 0."""
    return kernel(
        b"\xb8" + struct.pack("<I", addr)  # mov eax, addr
        + b"\x66\xba\x24\x05"  # mov dx, 0x524
        + b"\xef"  # out dx, eax
        + EXIT_0,
        data=bytes(16),
    )
