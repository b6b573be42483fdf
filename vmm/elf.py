"""Kernel ELF parsing and validation (pure: no VM, no guest memory).

``parse_kernel(data)`` turns an ELF64 x86-64 kernel into a ``KernelImage``:
its loadable segments with their permissions, its entry point, its
R_X86_64_RELATIVE relocations (a static-PIE kernel can be slid for KASLR) and
its symbols. Anything malformed raises ``KernelImageError`` with one line
that names the problem; no other exception escapes for any input bytes.

Symbols are read on first use (``KernelImage.symbols``): only a fault
report, a symbolized RIP or a debugger needs them (reading .symtab with
pyelftools cost about 70 ms with its import, against 0.3 ms for the rest of
the parse; the parser here reads it in a few ms), so a plain boot never pays
for it.

This is the project's one ELF parser: the guest build's ET_DYN fix-up
(``mark_pie``) and the symbol table go through it too.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .demangle import demangle_all
from .errors import UsageError

PF_X, PF_W, PF_R = 1, 2, 4
PT_LOAD, PT_DYNAMIC = 1, 2
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
DT_NULL, DT_RELA, DT_RELASZ, DT_RELAENT = 0, 7, 8, 9
DT_FLAGS_1, DF_1_PIE = 0x6FFFFFFB, 0x08000000
SHT_SYMTAB = 2
STT_OBJECT, STT_FUNC = 1, 2
R_X86_64_NONE, R_X86_64_RELATIVE = 0, 8
ELF_MAGIC = b"\x7fELF"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
_RELA = struct.Struct("<QQq")  # Elf64_Rela, 24 bytes
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym, 24 bytes
_MAX_SYMBOLS = 1 << 20
_MAX_SEGMENTS = 64
_MAX_MEMSZ = 1 << 32  # no kernel segment is 4 GiB


class KernelImageError(UsageError):
    """The kernel file cannot be loaded; the message says why in one line."""


@dataclass(frozen=True)
class Segment:
    vaddr: int
    paddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int  # PF_R | PF_W | PF_X

    @property
    def readable(self) -> bool:
        return bool(self.flags & PF_R)

    @property
    def writable(self) -> bool:
        return bool(self.flags & PF_W)

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)

    @property
    def perms(self) -> str:
        return ("R" if self.readable else "-") + ("W" if self.writable else "-") + ("X" if self.executable else "-")


@dataclass(frozen=True)
class Symbol:
    name: str  # as in .symtab (mangled); Symbolizer shows it demangled
    addr: int
    size: int


@dataclass
class KernelImage:
    data: bytes
    elf_type: int
    entry: int
    segments: list[Segment]
    relocations: list[tuple[int, int]]  # (r_offset, addend) of R_X86_64_RELATIVE
    path: str = "<memory>"
    # Where the symbols come from on first use: .symtab by default, a cache
    # (vmm.kernel_cache) when the kernel file has one.
    symbol_loader: Callable[[], list[Symbol]] | None = field(default=None, repr=False, compare=False)
    _symbols: list[Symbol] | None = field(default=None, repr=False, compare=False)
    # The kernel file's cache (vmm.kernel_cache.KernelCache), if it has one.
    cache: object | None = field(default=None, repr=False, compare=False)

    @property
    def symbols(self) -> list[Symbol]:
        if self._symbols is None:
            self._symbols = self.symbol_loader() if self.symbol_loader is not None else read_symbols(self.data)
        return self._symbols

    @symbols.setter
    def symbols(self, value: list[Symbol]) -> None:
        self._symbols = list(value)

    @property
    def symbols_loaded(self) -> bool:
        return self._symbols is not None

    @property
    def relocatable(self) -> bool:
        return self.elf_type == ET_DYN

    @property
    def vaddr_start(self) -> int:
        return min(s.vaddr for s in self.segments) & ~0xFFF

    @property
    def vaddr_end(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments)

    @property
    def paddr_start(self) -> int:
        return min(s.paddr for s in self.segments) & ~0xFFF

    @property
    def paddr_end(self) -> int:
        """Exclusive and page aligned."""
        return (max(s.paddr + s.memsz for s in self.segments) + 0xFFF) & ~0xFFF

    def symbolizer(self, slide: int = 0) -> "Symbolizer":
        """A symbolizer that reads the symbols when it first resolves an address."""
        return Symbolizer(lambda: self.symbols, slide)


class Symbolizer:
    """Resolve an address to ``symbol+offset`` using the kernel's .symtab.

    ``symbols`` is a list, or a callable returning one: then it is called on
    the first lookup, so a symbolizer costs nothing until it is used. Names
    stay mangled until one is shown: the first lookup demangles all of them
    in one c++filt batch (``vmm.demangle``), so booting never pays for it.
    """

    def __init__(self, symbols, slide: int = 0):
        self._source = symbols
        self._addrs: list[int] | None = None
        self._syms: list[Symbol] = []
        self._names: list[str] | None = None
        self.slide = slide
        if not callable(symbols):
            self._index()

    def _index(self) -> None:
        symbols = self._source() if callable(self._source) else self._source
        funcs = sorted((s for s in symbols if s.addr), key=lambda s: s.addr)
        self._addrs = [s.addr + self.slide for s in funcs]
        self._syms = funcs

    def _demangled(self) -> list[str]:
        if self._names is None:
            self._names = demangle_all([s.name for s in self._syms])
        return self._names

    def resolve(self, addr: int) -> tuple[str, int, int] | None:
        """(demangled name, offset into it, the symbol's slid start) or None."""
        if self._addrs is None:
            self._index()
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        sym = self._syms[i]
        off = addr - self._addrs[i]
        if sym.size and off >= sym.size:
            return None
        return self._demangled()[i], off, self._addrs[i]

    def lookup(self, addr: int) -> str | None:
        hit = self.resolve(addr)
        if hit is None:
            return None
        name, off, _start = hit
        return f"{name}+{off:#x}" if off else name

    def format(self, addr: int) -> str:
        name = self.lookup(addr)
        return f"{addr:#018x} <{name}>" if name else f"{addr:#018x}"


def load_kernel_file(path: str | Path) -> KernelImage:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise KernelImageError(f"kernel {p}: no such file") from None
    except IsADirectoryError:
        raise KernelImageError(f"kernel {p}: is a directory") from None
    except OSError as exc:
        raise KernelImageError(f"kernel {p}: cannot read ({exc.strerror})") from None
    try:
        image = parse_kernel(data)
    except KernelImageError as exc:
        raise KernelImageError(f"kernel {p}: {exc}") from None
    image.path = str(p)
    return image


@dataclass(frozen=True)
class _Header:
    type: int
    entry: int
    phoff: int
    phnum: int
    shoff: int
    shentsize: int
    shnum: int


def _header(data: bytes) -> _Header:
    """The ELF header, checked: ELF64, little-endian, x86-64, an executable with sane program headers."""
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        raise KernelImageError("not an ELF file")
    if len(data) < _EHDR.size:
        raise KernelImageError(f"truncated ELF header ({len(data)} bytes, need {_EHDR.size})")
    (ident, e_type, e_machine, _ver, e_entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, _shstrndx) = _EHDR.unpack_from(data)
    if ident[4] != 2:
        raise KernelImageError("not a 64-bit ELF (ELFCLASS32 or invalid class); a 64-bit x86-64 kernel is required")
    if ident[5] != 1:
        raise KernelImageError("not a little-endian ELF")
    if e_machine != EM_X86_64:
        raise KernelImageError(f"ELF machine {e_machine} is not x86-64 ({EM_X86_64})")
    if e_type not in (ET_EXEC, ET_DYN):
        raise KernelImageError(f"ELF type {e_type} is not an executable (ET_EXEC or ET_DYN)")
    if e_phnum == 0:
        raise KernelImageError("no program headers (no loadable segment)")
    if e_phentsize != _PHDR.size:
        raise KernelImageError(f"program header size {e_phentsize}, expected {_PHDR.size}")
    if e_phnum > _MAX_SEGMENTS:
        raise KernelImageError(f"{e_phnum} program headers, more than {_MAX_SEGMENTS}")
    if e_phoff + e_phnum * _PHDR.size > len(data):
        raise KernelImageError("program headers extend beyond the end of the file (truncated?)")
    return _Header(e_type, e_entry, e_phoff, e_phnum, e_shoff, e_shentsize, e_shnum)


def _program_headers(data: bytes, h: _Header):
    for i in range(h.phnum):
        yield i, _PHDR.unpack_from(data, h.phoff + i * _PHDR.size)


def _dynamic(data: bytes, h: _Header) -> tuple[int, int] | None:
    """(offset, size) of PT_DYNAMIC, if any."""
    for _i, (p_type, _fl, p_offset, _va, _pa, p_filesz, _memsz, _al) in _program_headers(data, h):
        if p_type == PT_DYNAMIC:
            return p_offset, p_filesz
    return None


def parse_kernel(data: bytes) -> KernelImage:
    h = _header(data)
    e_type, e_entry = h.type, h.entry
    segments: list[Segment] = []
    dynamic = _dynamic(data, h)
    for i, (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align) in _program_headers(data, h):
        if p_type != PT_LOAD or p_memsz == 0:
            continue  # empty segments are skipped
        where = f"segment {i} (vaddr {p_vaddr:#x})"
        if p_filesz > p_memsz:
            raise KernelImageError(f"{where}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
        if p_memsz > _MAX_MEMSZ:
            raise KernelImageError(f"{where}: memory size {p_memsz:#x} is absurd (over 4 GiB)")
        if p_offset + p_filesz > len(data):
            raise KernelImageError(f"{where}: extends beyond the end of the file (truncated?)")
        if (p_flags & PF_W) and (p_flags & PF_X):
            raise KernelImageError(f"{where}: is both writable and executable (W^X)")
        if (p_vaddr & 0xFFF) != (p_paddr & 0xFFF) or (p_vaddr & 0xFFF) != (p_offset & 0xFFF):
            raise KernelImageError(f"{where}: vaddr, paddr and offset disagree modulo 4 KiB")
        if not _canonical(p_vaddr) or not _canonical(p_vaddr + p_memsz - 1):
            raise KernelImageError(f"{where}: virtual range is not canonical")
        segments.append(Segment(p_vaddr, p_paddr, p_offset, p_filesz, p_memsz, p_flags))
    if not segments:
        raise KernelImageError("no loadable segment")

    _check_overlaps(segments)
    if not any(s.executable and s.vaddr <= e_entry < s.vaddr + s.memsz for s in segments):
        raise KernelImageError(f"entry point {e_entry:#x} is not inside an executable segment")

    relocs = _relative_relocations(data, segments, dynamic) if e_type == ET_DYN else []
    return KernelImage(
        data=data,
        elf_type=e_type,
        entry=e_entry,
        segments=segments,
        relocations=relocs,
    )


def mark_pie(image: bytearray) -> bool:
    """Set e_type to ET_DYN on an ET_EXEC image that GNU ld linked as a static PIE.

    GNU ld marks a PIE whose first segment is not at address 0 as ET_EXEC
    although it keeps ``_DYNAMIC``, ``DF_1_PIE`` and the relative
    relocations; the host only slides ET_DYN images. Returns True if the
    image is (now) a relocatable static PIE. KernelImageError if it is not
    an ELF64 x86-64 executable at all.
    """
    h = _header(image)
    dynamic = _dynamic(image, h)
    if dynamic is not None and _dynamic_tags(image, dynamic).get(DT_FLAGS_1, 0) & DF_1_PIE:
        if h.type == ET_EXEC:
            struct.pack_into("<H", image, 16, ET_DYN)  # e_type
        return True
    return h.type == ET_DYN


def _canonical(addr: int) -> bool:
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def _check_overlaps(segments: list[Segment]) -> None:
    for key, what in ((lambda s: s.vaddr, "virtual"), (lambda s: s.paddr, "physical")):
        # Compare at page granularity: each segment is mapped in whole pages.
        spans = sorted(((key(s) & ~0xFFF, (key(s) + s.memsz + 0xFFF) & ~0xFFF) for s in segments))
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise KernelImageError(f"segments overlap in {what} memory at {b0:#x}")


def _file_offset(segments: list[Segment], vaddr: int, n: int) -> int | None:
    for s in segments:
        if s.vaddr <= vaddr and vaddr + n <= s.vaddr + s.filesz:
            return s.offset + (vaddr - s.vaddr)
    return None


def _dynamic_tags(data: bytes, dynamic: tuple[int, int]) -> dict[int, int]:
    off, size = dynamic
    if off + size > len(data):
        raise KernelImageError("dynamic section extends beyond the end of the file")
    tags: dict[int, int] = {}
    for pos in range(off, off + size - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        tags[tag] = val
    return tags


def _relative_relocations(data: bytes, segments: list[Segment], dynamic) -> list[tuple[int, int]]:
    if dynamic is None:
        return []
    tags = _dynamic_tags(data, dynamic)
    if DT_RELA not in tags:
        return []
    rela, relasz, relaent = tags[DT_RELA], tags.get(DT_RELASZ, 0), tags.get(DT_RELAENT, _RELA.size)
    if relaent != _RELA.size:
        raise KernelImageError(f"relocation entry size {relaent}, expected {_RELA.size}")
    start = _file_offset(segments, rela, relasz)
    if start is None:
        # Not inside a loaded segment: look it up through the section table.
        start = rela if rela + relasz <= len(data) else None
    if start is None:
        raise KernelImageError("relocation table lies outside the file")
    out = []
    for pos in range(start, start + relasz, _RELA.size):
        r_offset, r_info, addend = _RELA.unpack_from(data, pos)
        rtype = r_info & 0xFFFFFFFF
        if rtype == R_X86_64_NONE:
            continue
        if rtype != R_X86_64_RELATIVE:
            raise KernelImageError(f"unsupported relocation type {rtype} at {r_offset:#x} (only R_X86_64_RELATIVE)")
        if _file_offset(segments, r_offset, 8) is None and not any(
            s.vaddr <= r_offset and r_offset + 8 <= s.vaddr + s.memsz for s in segments
        ):
            raise KernelImageError(f"relocation at {r_offset:#x} is outside every segment")
        out.append((r_offset, addend & 0xFFFFFFFFFFFFFFFF))
    return out


def _section(data: bytes, h: _Header, index: int) -> tuple[int, int, int, int, int] | None:
    """(sh_type, sh_offset, sh_size, sh_link, sh_entsize) of section ``index``, if it lies in the file."""
    if not (0 <= index < h.shnum) or h.shentsize != _SHDR.size:
        return None
    pos = h.shoff + index * _SHDR.size
    if pos + _SHDR.size > len(data):
        return None
    _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize = _SHDR.unpack_from(data, pos)
    if sh_offset + sh_size > len(data):
        return None
    return sh_type, sh_offset, sh_size, sh_link, sh_entsize


def read_symbols(data: bytes) -> list[Symbol]:
    """Function and object symbols of the SHT_SYMTAB (.symtab); none if absent or damaged.

    Symbols are a convenience (they name RIPs), so a damaged table gives none
    rather than an error; every read is bounds-checked against the file.
    """
    try:
        h = _header(data)
    except KernelImageError:
        return []
    for i in range(min(h.shnum, 1 << 16)):
        sec = _section(data, h, i)
        if sec is None or sec[0] != SHT_SYMTAB:
            continue
        _t, off, size, link, entsize = sec
        strtab = _section(data, h, link)
        if entsize != _SYM.size or strtab is None:
            return []
        str_off, str_size = strtab[1], strtab[2]
        out = []
        for pos in range(off, off + min(size, _MAX_SYMBOLS * _SYM.size) - _SYM.size + 1, _SYM.size):
            st_name, st_info, _other, _shndx, st_value, st_size = _SYM.unpack_from(data, pos)
            if (st_info & 0xF) not in (STT_FUNC, STT_OBJECT) or not st_value or st_name >= str_size:
                continue
            end = data.find(b"\0", str_off + st_name, str_off + str_size)
            if end < 0:
                continue
            name = bytes(data[str_off + st_name : end]).decode("utf-8", "replace")
            out.append(Symbol(name, st_value, st_size))
        return out
    return []
