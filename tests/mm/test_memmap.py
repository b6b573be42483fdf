from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm.errors import MemoryMapError
from mm.memmap import (
    DESCRIPTOR_FORMAT,
    DESCRIPTOR_SIZE,
    EFI_MEMORY_WB,
    MemoryDescriptor,
    MemoryMap,
    MemoryType,
)

T = MemoryType
MiB = 1 << 20


def test_abi_constants():
    assert DESCRIPTOR_SIZE == 40 == struct.calcsize(DESCRIPTOR_FORMAT)
    assert T.CONVENTIONAL == 7 and T.FRAMEBUFFER == 0x8000_0001 and T.PERSISTENT == 14
    d = MemoryDescriptor(T.LOADER_DATA, 0x1000, 3)
    assert (d.end, d.size, d.attribute, d.virt_start) == (0x4000, 0x3000, EFI_MEMORY_WB, 0)
    assert d.pack() == struct.pack("<IIQQQQ", 2, 0, 0x1000, 0, 3, 8)


def abi_map(ram: int = 64 * MiB) -> MemoryMap:
    """The physical layout of docs/ABI.md."""
    mm = MemoryMap.from_ram(ram)
    mm.carve(0, 0x1000, T.RESERVED)
    mm.carve(0x1000, 0x4000, T.LOADER_DATA)
    mm.carve(0x1_0000, 0x8_0000, T.LOADER_DATA)
    mm.carve(0x9_0000, 0x1_0000, T.LOADER_DATA)
    mm.carve(0xA_0000, 0x4_0000, T.RESERVED)
    mm.carve(0xE_0000, 0x1_0000, T.ACPI_RECLAIM)
    mm.carve(0xF_0000, 0x1_0000, T.ACPI_NVS)
    mm.carve(0x10_0000, 0x2_0000, T.LOADER_CODE)
    mm.carve(0x12_0000, 0x1_0000, T.LOADER_DATA)
    mm.carve(ram - 0x13_0000, 0x12_C000, T.FRAMEBUFFER)
    return mm


def test_carve_abi_layout():
    mm = abi_map()
    mm.validate()
    types = [(d.phys_start, d.type) for d in mm.descriptors]
    assert types[:3] == [(0, T.RESERVED), (0x1000, T.LOADER_DATA), (0x5000, T.CONVENTIONAL)]
    assert mm.find(0x10_0000).type == T.LOADER_CODE and mm.find(1 << 40) is None
    fb = [d for d in mm if d.type == T.FRAMEBUFFER][0]
    assert fb.num_pages == 0x12C
    merged = mm.merged()
    merged.validate()
    assert len(merged) == len(mm) - 1  # the page-table pool and the boot stack (both LoaderData) merge
    assert mm.usable_frames() == sum(e - s for s, e in mm.usable_ranges()) // 4096
    assert mm.usable_frames() == sum(d.num_pages for d in mm if d.type == T.CONVENTIONAL)


@pytest.mark.parametrize(
    "start,size,match",
    [
        (0x1000, 0x1000, "overlaps"),  # already LoaderData
        (0x0, 0x3000, "overlaps"),  # partly over the reserved null page
        (64 * MiB - 0x1000, 0x2000, "outside RAM"),
        (0x20_0800, 0x1000, "aligned"),
        (0x20_0000, 0, "aligned"),
        (-0x1000, 0x2000, "outside RAM"),
    ],
)
def test_carve_refusals(start, size, match):
    mm = abi_map()
    with pytest.raises(MemoryMapError, match=match):
        mm.carve(start, size, T.LOADER_DATA)
    mm.validate()  # untouched


def test_carve_across_conventional_pieces():
    mm = MemoryMap.from_ram(16 * MiB)
    mm.carve(MiB, MiB, T.CONVENTIONAL, attribute=EFI_MEMORY_WB | 1)
    mm.carve(MiB // 2, 2 * MiB, T.LOADER_DATA)
    mm.validate()
    assert [(d.phys_start, d.type) for d in mm] == [(0, T.CONVENTIONAL), (MiB // 2, T.LOADER_DATA), (MiB * 5 // 2, T.CONVENTIONAL)]


@pytest.mark.parametrize(
    "descs,ram,match",
    [
        ([(T.CONVENTIONAL, 0, 2), (T.RESERVED, 0x1000, 2)], 0x3000, "overlaps"),
        ([(T.CONVENTIONAL, 0, 1), (T.RESERVED, 0x2000, 1)], 0x3000, "hole"),
        ([(T.CONVENTIONAL, 0, 1)], 0x2000, "ends at"),
        ([(T.CONVENTIONAL, 0x800, 1)], 0x1800, "aligned"),
        ([(T.CONVENTIONAL, 0, 0), (T.CONVENTIONAL, 0, 1)], 0x1000, "empty"),
        ([(T.CONVENTIONAL, 0x1000, 1)], 0x2000, "hole"),
    ],
)
def test_validate_failures(descs, ram, match):
    mm = MemoryMap([MemoryDescriptor(t, s, n) for t, s, n in descs], ram)
    with pytest.raises(MemoryMapError, match=match):
        mm.validate()


carves = st.lists(
    st.tuples(st.integers(0, 255), st.integers(1, 16), st.sampled_from([t for t in T if t != T.CONVENTIONAL])),
    max_size=20,
)


@settings(max_examples=100, deadline=None)
@given(carves, st.sampled_from([40, 48, 64]))
def test_parse_round_trip(requests, desc_size):
    mm = MemoryMap.from_ram(256 * 4096)
    for page, n, t in requests:
        try:
            mm.carve(page * 4096, n * 4096, t)
        except MemoryMapError:
            continue
    mm.validate()
    data = mm.to_bytes(desc_size)
    assert len(data) == len(mm) * desc_size
    assert MemoryMap.parse(data, desc_size, ram_size=256 * 4096) == mm
    assert MemoryMap.parse(data, desc_size) == mm


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([40, 48, 7, 0, -40]), st.none() | st.integers(-1, 1 << 66))
def test_parse_fuzz_only_raises_memorymaperror(data, desc_size, ram):
    try:
        mm = MemoryMap.parse(data, desc_size, ram)
    except MemoryMapError as exc:
        assert "\n" not in str(exc)
    else:
        mm.validate()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_parse_fuzz_mutated_valid_maps(data):
    raw = bytearray(abi_map().to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        MemoryMap.parse(bytes(raw), ram_size=64 * MiB)
    except MemoryMapError:
        pass


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty"),
        (b"\0" * 39, "whole number"),
        (struct.pack("<IIQQQQ", 99, 0, 0, 0, 1, 8), "unknown memory type"),
        (struct.pack("<IIQQQQ", 7, 0, 0xFFFF_FFFF_FFFF_F000, 0, 2, 8), "overflows"),
        (struct.pack("<IIQQQQ", 7, 0, 0x1000, 0, 1, 8) + struct.pack("<IIQQQQ", 7, 0, 0, 0, 1, 8), "sorted"),
    ],
)
def test_parse_errors(data, match):
    with pytest.raises(MemoryMapError, match=match):
        MemoryMap.parse(data)


def test_parse_rejects_non_bytes():
    with pytest.raises(MemoryMapError):
        MemoryMap.parse(12345)  # type: ignore[arg-type]


def test_to_json():
    js = abi_map().to_json()
    json.dumps(js)
    assert js[0] == {"type": "RESERVED", "type_value": 0, "phys_start": 0, "end": 0x1000, "pages": 1,
                     "size": 0x1000, "attribute": EFI_MEMORY_WB}
    assert {d["type"] for d in js} >= {"CONVENTIONAL", "FRAMEBUFFER", "ACPI_NVS"}


def test_from_ram_refuses_bad_size():
    for bad in (0, 4097, -4096):
        with pytest.raises(MemoryMapError):
            MemoryMap.from_ram(bad)
