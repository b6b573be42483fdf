"""Build small synthetic ELF64 files for loader tests (no toolchain needed)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PF_X, PF_W, PF_R = 1, 2, 4
HIGH = 0xFFFF_FFFF_8000_0000


@dataclass
class Seg:
    vaddr: int
    paddr: int
    data: bytes
    memsz: int | None = None
    flags: int = PF_R
    p_type: int = 1  # PT_LOAD
    offset: int | None = None  # default: laid out page-aligned after headers


@dataclass
class Elf:
    segments: list[Seg] = field(default_factory=list)
    entry: int = HIGH
    e_type: int = 2  # ET_EXEC
    machine: int = 62
    elf_class: int = 2
    data_enc: int = 1

    def build(self) -> bytes:
        phoff = 64
        phnum = len(self.segments)
        body = bytearray()
        base = 0x1000
        offsets = []
        for seg in self.segments:
            if seg.offset is not None:
                offsets.append(seg.offset)
                continue
            # keep vaddr % 4096 == offset % 4096
            pos = base + len(body)
            pos += (seg.vaddr - pos) % 0x1000
            body += bytes(pos - base - len(body))
            offsets.append(pos)
            body += seg.data
        ident = b"\x7fELF" + bytes([self.elf_class, self.data_enc, 1, 0]) + bytes(8)
        ehdr = struct.pack(
            "<16sHHIQQQIHHHHHH", ident, self.e_type, self.machine, 1, self.entry, phoff, 0, 0, 64, 56, phnum, 64, 0, 0
        )
        phdrs = b"".join(
            struct.pack(
                "<IIQQQQQQ",
                s.p_type,
                s.flags,
                off,
                s.vaddr,
                s.paddr,
                len(s.data),
                s.memsz if s.memsz is not None else len(s.data),
                0x1000,
            )
            for s, off in zip(self.segments, offsets)
        )
        head = ehdr + phdrs
        assert len(head) <= base
        return head + bytes(base - len(head)) + bytes(body)


def simple_kernel() -> Elf:
    """A valid three-segment higher-half kernel: text RX, rodata R, data RW."""
    # `out 0xf4, eax` with eax = 0: mov eax, 0 ; out 0xf4, eax ; hlt
    code = b"\xb8\x00\x00\x00\x00\xe7\xf4\xf4"
    return Elf(
        segments=[
            Seg(HIGH, 0x100000, code, flags=PF_R | PF_X),
            Seg(HIGH + 0x1000, 0x101000, b"rodata", flags=PF_R),
            Seg(HIGH + 0x2000, 0x102000, b"data", memsz=0x2000, flags=PF_R | PF_W),
        ],
        entry=HIGH,
    )


def icount_kernel(nops: int) -> Elf:
    """Counts ``nops`` NOPs (plus the one MOV that sets up the stop port)
    between the instruction counter's start and stop OUTs, then exits 0."""
    code = (
        b"\xb8\x07\x00\x00\x00"  # mov eax, 7 (the count's id)
        + b"\x66\xba\x10\x05"  # mov dx, 0x510 (start)
        + b"\xef"  # out dx, eax
        + b"\x90" * nops
        + b"\x66\xba\x14\x05"  # mov dx, 0x514 (stop)
        + b"\xef"  # out dx, eax
        + b"\x31\xc0\xe7\xf4"  # xor eax, eax ; out 0xf4, eax
    )
    return Elf(segments=[Seg(HIGH, 0x100000, code, flags=PF_R | PF_X)], entry=HIGH)
