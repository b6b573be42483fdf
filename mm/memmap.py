"""The UEFI-like memory map handed to the guest (ABI: EFI_MEMORY_DESCRIPTOR, 40 bytes).

A :class:`MemoryMap` always describes every page of ``[0, ram_size)``
exactly once: it starts as one Conventional region and :meth:`MemoryMap.carve`
splits it. :meth:`MemoryMap.parse` is the other direction, for maps read back
from guest memory: malformed input raises :class:`MemoryMapError` only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Iterable, Iterator

from .addr import PAGE_4K
from .errors import MemoryMapError

__all__ = [
    "MemoryType",
    "MemoryDescriptor",
    "MemoryMap",
    "EFI_MEMORY_WB",
    "EFI_MEMORY_RUNTIME",
    "DESCRIPTOR_SIZE",
    "DESCRIPTOR_FORMAT",
]

#: EFI_MEMORY_WB: the region supports write-back caching.
EFI_MEMORY_WB = 0x8
#: EFI_MEMORY_RUNTIME: the region must be mapped by the OS for runtime services.
EFI_MEMORY_RUNTIME = 1 << 63
#: Bytes per descriptor in our ABI (UEFI allows larger strides; parse accepts them).
DESCRIPTOR_SIZE = 40
#: type, pad, physical_start, virtual_start, number_of_pages, attribute.
DESCRIPTOR_FORMAT = "<IIQQQQ"
_STRUCT = struct.Struct(DESCRIPTOR_FORMAT)
assert _STRUCT.size == DESCRIPTOR_SIZE


class MemoryType(IntEnum):
    """EFI_MEMORY_TYPE values (UEFI spec 7.2), plus our OS-defined framebuffer type."""

    RESERVED = 0
    LOADER_CODE = 1
    LOADER_DATA = 2
    BOOT_SERVICES_CODE = 3
    BOOT_SERVICES_DATA = 4
    RUNTIME_SERVICES_CODE = 5
    RUNTIME_SERVICES_DATA = 6
    CONVENTIONAL = 7
    UNUSABLE = 8
    ACPI_RECLAIM = 9
    ACPI_NVS = 10
    MMIO = 11
    MMIO_PORT_SPACE = 12
    PAL_CODE = 13
    PERSISTENT = 14
    FRAMEBUFFER = 0x8000_0001  # in the OS-defined range 0x80000000..0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class MemoryDescriptor:
    """``num_pages`` 4 KiB pages of ``type`` starting at ``phys_start``."""

    type: MemoryType
    phys_start: int
    num_pages: int
    attribute: int = EFI_MEMORY_WB
    virt_start: int = 0

    @property
    def size(self) -> int:
        return self.num_pages * PAGE_4K

    @property
    def end(self) -> int:
        """Exclusive physical end."""
        return self.phys_start + self.size

    def pack(self) -> bytes:
        return _STRUCT.pack(int(self.type), 0, self.phys_start, self.virt_start, self.num_pages, self.attribute)

    def __str__(self) -> str:
        return f"[{self.phys_start:#_x}, {self.end:#_x}) {self.type.name}"


def _span(type_: MemoryType, start: int, end: int, attribute: int) -> MemoryDescriptor:
    return MemoryDescriptor(type_, start, (end - start) // PAGE_4K, attribute)


class MemoryMap:
    """A sorted, gap-free, non-overlapping cover of ``[0, ram_size)``."""

    def __init__(self, descriptors: Iterable[MemoryDescriptor], ram_size: int) -> None:
        self._descs = sorted(descriptors, key=lambda d: d.phys_start)
        self.ram_size = ram_size

    @classmethod
    def from_ram(cls, ram_size: int) -> "MemoryMap":
        """All of RAM as one Conventional region."""
        if ram_size <= 0 or ram_size % PAGE_4K:
            raise MemoryMapError(f"RAM size {ram_size:#_x} must be a positive multiple of 4 KiB")
        return cls([MemoryDescriptor(MemoryType.CONVENTIONAL, 0, ram_size // PAGE_4K)], ram_size)

    # -- queries --------------------------------------------------------------

    @property
    def descriptors(self) -> list[MemoryDescriptor]:
        """The descriptors, sorted by physical start (a copy)."""
        return list(self._descs)

    def __iter__(self) -> Iterator[MemoryDescriptor]:
        return iter(self._descs)

    def __len__(self) -> int:
        return len(self._descs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryMap) and (self._descs, self.ram_size) == (other._descs, other.ram_size)

    def __repr__(self) -> str:
        return f"MemoryMap(ram_size={self.ram_size:#_x}, {len(self._descs)} descriptors)"

    def find(self, paddr: int) -> MemoryDescriptor | None:
        """The descriptor containing ``paddr``."""
        for d in self._descs:
            if d.phys_start <= paddr < d.end:
                return d
        return None

    def usable_ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every Conventional region (after merging neighbours)."""
        return [(d.phys_start, d.end) for d in self.merged() if d.type == MemoryType.CONVENTIONAL]

    def usable_frames(self) -> int:
        """Number of 4 KiB frames the guest may hand out (Conventional memory)."""
        return sum(d.num_pages for d in self._descs if d.type == MemoryType.CONVENTIONAL)

    # -- editing --------------------------------------------------------------

    def carve(self, start: int, size: int, type: MemoryType, attribute: int = EFI_MEMORY_WB) -> None:
        """Give ``[start, start+size)`` the ``type``, splitting the Conventional region(s) it is in.

        Refuses (MemoryMapError) a misaligned or empty range, one reaching
        outside RAM, and one overlapping a region already carved.
        """
        end = start + size
        if size <= 0 or start % PAGE_4K or size % PAGE_4K:
            raise MemoryMapError(f"carve [{start:#_x}, +{size:#_x}): must be non-empty and 4 KiB aligned")
        if start < 0 or end > self.ram_size:
            raise MemoryMapError(f"carve [{start:#_x}, {end:#_x}) reaches outside RAM [0, {self.ram_size:#_x})")
        hit = [i for i, d in enumerate(self._descs) if d.phys_start < end and start < d.end]
        for i in hit:
            d = self._descs[i]
            if d.type != MemoryType.CONVENTIONAL:
                raise MemoryMapError(f"carve {MemoryType(type).name} [{start:#_x}, {end:#_x}) overlaps {d}")
        if not hit:
            raise MemoryMapError(f"carve [{start:#_x}, {end:#_x}): no region describes it")
        first, last = self._descs[hit[0]], self._descs[hit[-1]]
        pieces = []
        if first.phys_start < start:
            pieces.append(_span(first.type, first.phys_start, start, first.attribute))
        pieces.append(_span(MemoryType(type), start, end, attribute))
        if end < last.end:
            pieces.append(_span(last.type, end, last.end, last.attribute))
        self._descs[hit[0] : hit[-1] + 1] = pieces

    def merged(self) -> "MemoryMap":
        """A copy with adjacent descriptors of equal type and attribute merged."""
        out: list[MemoryDescriptor] = []
        for d in self._descs:
            if out and out[-1].end == d.phys_start and (out[-1].type, out[-1].attribute) == (d.type, d.attribute):
                out[-1] = replace(out[-1], num_pages=out[-1].num_pages + d.num_pages)
            else:
                out.append(d)
        return MemoryMap(out, self.ram_size)

    # -- checking -------------------------------------------------------------

    def validate(self) -> None:
        """Raise MemoryMapError unless sorted, aligned, non-overlapping and covering RAM once."""
        pos = 0
        for i, d in enumerate(self._descs):
            if d.phys_start % PAGE_4K:
                raise MemoryMapError(f"descriptor {i} ({d}) is not 4 KiB aligned")
            if d.num_pages <= 0:
                raise MemoryMapError(f"descriptor {i} at {d.phys_start:#_x} is empty")
            if d.phys_start < pos:
                raise MemoryMapError(f"descriptor {i} ({d}) overlaps the previous one (ends at {pos:#_x})")
            if d.phys_start > pos:
                raise MemoryMapError(f"hole [{pos:#_x}, {d.phys_start:#_x}) before descriptor {i} is not described")
            pos = d.end
        if pos != self.ram_size:
            raise MemoryMapError(f"map ends at {pos:#_x}, RAM at {self.ram_size:#_x}")

    # -- encoding -------------------------------------------------------------

    def to_bytes(self, desc_size: int = DESCRIPTOR_SIZE) -> bytes:
        """The descriptors as the guest reads them (``desc_size`` stride, zero padded)."""
        if desc_size < DESCRIPTOR_SIZE:
            raise MemoryMapError(f"descriptor size {desc_size} below {DESCRIPTOR_SIZE}")
        pad = bytes(desc_size - DESCRIPTOR_SIZE)
        return b"".join(d.pack() + pad for d in self._descs)

    @classmethod
    def parse(cls, data: bytes, desc_size: int = DESCRIPTOR_SIZE, ram_size: int | None = None) -> "MemoryMap":
        """Decode and validate a map; ``ram_size`` defaults to the end of the last descriptor."""
        try:
            return cls._parse(data, desc_size, ram_size)
        except MemoryMapError:
            raise
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise MemoryMapError(f"malformed memory map: {exc}") from None

    @classmethod
    def _parse(cls, data: bytes, desc_size: int, ram_size: int | None) -> "MemoryMap":
        raw = memoryview(data).cast("B")
        if desc_size < DESCRIPTOR_SIZE or desc_size % 8:
            raise MemoryMapError(f"descriptor size {desc_size} is not a multiple of 8 >= {DESCRIPTOR_SIZE}")
        if len(raw) % desc_size:
            raise MemoryMapError(f"{len(raw)} bytes is not a whole number of {desc_size}-byte descriptors")
        if len(raw) == 0:
            raise MemoryMapError("empty memory map")
        descs = []
        for i in range(len(raw) // desc_size):
            typ, _pad, start, virt, pages, attr = _STRUCT.unpack_from(raw, i * desc_size)
            try:
                mtype = MemoryType(typ)
            except ValueError:
                raise MemoryMapError(f"descriptor {i}: unknown memory type {typ:#_x}") from None
            if start + pages * PAGE_4K > 1 << 64:
                raise MemoryMapError(f"descriptor {i}: [{start:#_x}, +{pages:#_x} pages) overflows 64 bits")
            descs.append(MemoryDescriptor(mtype, start, pages, attr, virt))
        if any(b.phys_start < a.phys_start for a, b in zip(descs, descs[1:])):
            raise MemoryMapError("descriptors are not sorted by physical start")
        if ram_size is None:
            ram_size = max(d.end for d in descs)
        mm = cls(descs, ram_size)
        mm.validate()
        return mm

    def to_json(self) -> list[dict]:
        """One dict per descriptor (for ``--json`` output)."""
        return [
            {
                "type": d.type.name,
                "type_value": int(d.type),
                "phys_start": d.phys_start,
                "end": d.end,
                "pages": d.num_pages,
                "size": d.size,
                "attribute": d.attribute,
            }
            for d in self._descs
        ]
