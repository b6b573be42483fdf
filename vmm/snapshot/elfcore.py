"""ELF64 core files (ET_CORE, x86-64): the container of a snapshot.

Pure file format, no KVM and no pyvmm knowledge beyond "x86-64 little
endian": a writer that lays out one PT_NOTE and one PT_LOAD per run of guest
RAM, and a hardened reader that trusts nothing in the file.

Layout written (every offset computed here, nothing implied):

    0            ELF header (64 bytes)
    64           program headers: PT_NOTE, then PT_LOAD sorted by p_paddr
    ...          note records (4-byte aligned: namesz, descsz, type, name, desc)
    page aligned PT_LOAD data, back to back (each a multiple of 4 KiB)

PT_LOAD: ``p_paddr`` is the guest-physical address, ``p_vaddr`` where the
guest's direct map shows it (like Linux's /proc/vmcore), ``p_filesz ==
p_memsz`` (Volatility's ELF layer only maps such segments; a "bss" tail
would mean a reader must invent zeros, and RAM that is not in a segment
already reads as zero).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# --- ELF constants (from the System V ABI / <elf.h>) --------------------------------
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ELFOSABI_SYSV = 0
ET_CORE = 4
EM_X86_64 = 62
PT_NULL = 0
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF  # "the real count is elsewhere": never written, refused

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type
assert EHDR.size == 64 and PHDR.size == 56 and NHDR.size == 12

PAGE = 4096
# Far below PN_XNUM; a writer with more runs merges the smallest zero gaps.
MAX_LOADS = 60_000
MAX_NOTES_BYTES = 64 << 20  # all notes together
MAX_NOTE_NAME = 64


class CoreFormatError(ValueError):
    """The file is not a well-formed ELF64 x86-64 core file (one line, says where)."""


@dataclass(frozen=True)
class Note:
    name: bytes  # without the NUL
    type: int
    desc: bytes


@dataclass(frozen=True)
class Load:
    """One PT_LOAD: ``size`` bytes of guest-physical ``paddr`` at file ``offset``."""

    paddr: int
    size: int
    offset: int = 0

    @property
    def end(self) -> int:
        return self.paddr + self.size


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def encode_notes(notes: Iterable[Note]) -> bytes:
    out = bytearray()
    for n in notes:
        name = n.name + b"\0"
        out += NHDR.pack(len(name), len(n.desc), n.type)
        out += name + bytes(_align(len(name), 4) - len(name))
        out += n.desc + bytes(_align(len(n.desc), 4) - len(n.desc))
    return bytes(out)


def decode_notes(data: bytes) -> list[Note]:
    """Parse a PT_NOTE payload; every length is checked against what is left."""
    notes, pos, end = [], 0, len(data)
    while pos < end:
        if end - pos < NHDR.size:
            raise CoreFormatError(f"note at offset {pos} of the note segment is truncated (header)")
        namesz, descsz, ntype = NHDR.unpack_from(data, pos)
        pos += NHDR.size
        if namesz == 0 or namesz > MAX_NOTE_NAME:
            raise CoreFormatError(f"note name size {namesz} is out of range (1..{MAX_NOTE_NAME})")
        if _align(namesz, 4) + _align(descsz, 4) > end - pos:
            raise CoreFormatError(f"note of type {ntype} runs past the end of the note segment")
        name = data[pos : pos + namesz]
        if name[-1:] != b"\0" or b"\0" in name[:-1]:
            raise CoreFormatError(f"note name {name!r} is not one NUL-terminated string")
        pos += _align(namesz, 4)
        desc = data[pos : pos + descsz]
        pos += _align(descsz, 4)
        notes.append(Note(bytes(name[:-1]), ntype, bytes(desc)))
    return notes


def merge_runs(runs: list[tuple[int, int]], limit: int = MAX_LOADS) -> list[tuple[int, int]]:
    """Sorted, page-aligned (start, size) runs, adjacent ones joined; above
    ``limit`` runs, the smallest zero gaps are filled (stored) until it fits."""
    joined: list[list[int]] = []
    for start, size in sorted(runs):
        if size <= 0:
            continue
        if joined and start <= joined[-1][0] + joined[-1][1]:
            joined[-1][1] = max(joined[-1][1], start + size - joined[-1][0])
        else:
            joined.append([start, size])
    if len(joined) > limit:
        gaps = sorted(range(1, len(joined)), key=lambda i: joined[i][0] - (joined[i - 1][0] + joined[i - 1][1]))
        fill = set(gaps[: len(joined) - limit])
        out: list[list[int]] = []
        for i, (start, size) in enumerate(joined):
            if i in fill:
                out[-1][1] = start + size - out[-1][0]
            else:
                out.append([start, size])
        joined = out
    return [(a, b) for a, b in joined]


def layout(notes_size: int, runs: list[tuple[int, int]]) -> tuple[int, list[Load]]:
    """File offset of the notes and of every run (page aligned)."""
    notes_off = EHDR.size + PHDR.size * (1 + len(runs))
    pos = _align(notes_off + notes_size, PAGE)
    loads = []
    for paddr, size in runs:
        loads.append(Load(paddr, size, pos))
        pos += size
    return notes_off, loads


def write_core(
    fd: int,
    notes: list[Note],
    runs: list[tuple[int, int]],
    copy: Callable[[int, int, int, int], None],
    *,
    vaddr_base: int = 0,
) -> list[Load]:
    """Write a core file to ``fd`` (positioned anywhere; written with pwrite).

    ``runs`` are (guest-physical start, size), sorted, disjoint, page
    aligned. ``copy(fd, file_offset, paddr, size)`` puts that much guest RAM
    into the file: the caller picks how (sendfile from a memfd, pwrite).
    """
    for paddr, size in runs:
        if paddr % PAGE or size % PAGE or size <= 0:
            raise ValueError(f"run {paddr:#x}+{size:#x} is not page aligned")
    if len(runs) > MAX_LOADS:
        raise ValueError(f"{len(runs)} runs; merge_runs() first")
    blob = encode_notes(notes)
    if len(blob) > MAX_NOTES_BYTES:
        raise ValueError(f"notes are {len(blob)} bytes, the limit is {MAX_NOTES_BYTES}")
    notes_off, loads = layout(len(blob), runs)
    phnum = 1 + len(loads)
    ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV]) + bytes(8)
    head = bytearray(EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, EHDR.size, 0, 0, EHDR.size, PHDR.size, phnum, 0, 0, 0))
    head += PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(blob), len(blob), 4)
    for ld in loads:
        head += PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, ld.offset, vaddr_base + ld.paddr, ld.paddr, ld.size, ld.size, PAGE)
    head += blob
    _pwrite_all(fd, bytes(head), 0)
    for ld in loads:
        copy(fd, ld.offset, ld.paddr, ld.size)
    end = loads[-1].offset + loads[-1].size if loads else len(head)
    os.ftruncate(fd, end)
    return loads


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@dataclass
class CoreFile:
    """A parsed and validated core file (header, loads, notes); data stays on disk."""

    file_size: int
    loads: list[Load]
    notes: list[Note]
    entry_vaddr: dict[int, int]  # paddr -> p_vaddr, for tools that want it

    def notes_named(self, name: bytes) -> list[Note]:
        return [n for n in self.notes if n.name == name]


def read_core(fd: int, *, ram_size: Callable[[list[Note]], int] | None = None) -> CoreFile:
    """Parse and check a core file open at ``fd``.

    Checked: magic, class, byte order, version, type, machine, header sizes,
    that every program header and the notes lie inside the file, exactly one
    PT_NOTE, PT_LOAD with p_filesz == p_memsz, page aligned, sorted and
    disjoint, data inside the file. ``ram_size(notes)`` (if given) says how
    much RAM the notes describe; segments past it are refused.
    """
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):  # before the size: a directory's st_size is fs-specific (4096 ext4, 40 tmpfs)
        raise CoreFormatError("is a directory, not a core file")
    size = st.st_size
    if size < EHDR.size:
        raise CoreFormatError(f"file is {size} bytes, shorter than an ELF header")
    head = os.pread(fd, EHDR.size, 0)
    (ident, e_type, e_machine, e_version, _entry, e_phoff, _shoff, _flags, e_ehsize, e_phentsize, e_phnum,
     _shentsize, _shnum, _shstrndx) = EHDR.unpack(head)
    if ident[:4] != ELFMAG:
        raise CoreFormatError("not an ELF file (bad magic)")
    if ident[4] != ELFCLASS64:
        raise CoreFormatError(f"not ELF64 (class {ident[4]})")
    if ident[5] != ELFDATA2LSB:
        raise CoreFormatError(f"not little-endian (data encoding {ident[5]})")
    if ident[6] != EV_CURRENT or e_version != EV_CURRENT:
        raise CoreFormatError(f"unsupported ELF version {ident[6]}/{e_version}")
    if e_type != ET_CORE:
        raise CoreFormatError(f"not a core file (e_type {e_type}, expected ET_CORE {ET_CORE})")
    if e_machine != EM_X86_64:
        raise CoreFormatError(f"wrong machine {e_machine} (expected x86-64, {EM_X86_64})")
    if e_ehsize != EHDR.size or e_phentsize != PHDR.size:
        raise CoreFormatError(f"unexpected header sizes (ehsize {e_ehsize}, phentsize {e_phentsize})")
    if e_phnum == 0 or e_phnum == PN_XNUM or e_phnum > MAX_LOADS + 1:
        raise CoreFormatError(f"program header count {e_phnum} is out of range")
    if e_phoff < EHDR.size or e_phoff + e_phnum * PHDR.size > size:
        raise CoreFormatError("program headers lie outside the file (truncated?)")
    raw = os.pread(fd, e_phnum * PHDR.size, e_phoff)
    note_hdr = None
    loads: list[Load] = []
    vaddrs: dict[int, int] = {}
    for i in range(e_phnum):
        p_type, _pflags, off, vaddr, paddr, filesz, memsz, _align_ = PHDR.unpack_from(raw, i * PHDR.size)
        if p_type == PT_NULL:
            continue
        if off + filesz > size:
            raise CoreFormatError(f"segment {i} ({filesz:#x} bytes at file offset {off:#x}) runs past the end of the file ({size:#x}): truncated?")
        if p_type == PT_NOTE:
            if note_hdr is not None:
                raise CoreFormatError("more than one PT_NOTE segment")
            if filesz > MAX_NOTES_BYTES:
                raise CoreFormatError(f"note segment is {filesz} bytes, the limit is {MAX_NOTES_BYTES}")
            note_hdr = (off, filesz)
        elif p_type == PT_LOAD:
            if filesz != memsz:
                raise CoreFormatError(f"PT_LOAD {i} has p_filesz {filesz:#x} != p_memsz {memsz:#x}")
            if paddr % PAGE or filesz % PAGE or off % PAGE or filesz == 0:
                raise CoreFormatError(f"PT_LOAD {i} at {paddr:#x}+{filesz:#x} (file {off:#x}) is not page aligned")
            loads.append(Load(paddr, filesz, off))
            vaddrs[paddr] = vaddr
        else:
            raise CoreFormatError(f"unexpected program header type {p_type:#x} (segment {i})")
    if note_hdr is None:
        raise CoreFormatError("no PT_NOTE segment")
    notes = decode_notes(os.pread(fd, note_hdr[1], note_hdr[0]))
    loads.sort(key=lambda ld: ld.paddr)
    for a, b in zip(loads, loads[1:]):
        if b.paddr < a.end:
            raise CoreFormatError(f"PT_LOAD segments overlap at guest-physical {b.paddr:#x}")
    if ram_size is not None:
        limit = ram_size(notes)
        for ld in loads:
            if ld.end > limit:
                raise CoreFormatError(
                    f"PT_LOAD {ld.paddr:#x}+{ld.size:#x} runs past the guest's RAM size {limit:#x}"
                )
    return CoreFile(size, loads, notes, vaddrs)
