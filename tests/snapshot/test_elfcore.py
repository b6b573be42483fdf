"""The ELF core container on its own: what the writer lays out, what the
reader refuses (every refusal is a CoreFormatError naming the problem)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.snapshot import elfcore as E

RAM = 1 << 20


def _ram_with(pages: dict[int, int]) -> bytearray:
    ram = bytearray(RAM)
    for page, byte in pages.items():
        ram[page * 4096 : (page + 1) * 4096] = bytes([byte]) * 4096
    return ram


def _write(tmp_path, ram, runs, notes=None, name="c.core"):
    path = tmp_path / name

    def copy(fd, off, paddr, size):
        os.pwrite(fd, bytes(ram[paddr : paddr + size]), off)

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        loads = E.write_core(fd, notes or [E.Note(b"TEST", 7, b"hello")], runs, copy, vaddr_base=0xFFFF_8000_0000_0000)
    finally:
        os.close(fd)
    return path, loads


def _read(path, ram_size=RAM):
    fd = os.open(path, os.O_RDONLY)
    try:
        return E.read_core(fd, ram_size=(lambda notes: ram_size) if ram_size else None)
    finally:
        os.close(fd)


def test_roundtrip_keeps_notes_and_every_byte(tmp_path):
    ram = _ram_with({1: 0xAA, 2: 0xBB, 7: 0xCC, 255: 0x11})
    runs = E.merge_runs([(4096, 8192), (7 * 4096, 4096), (255 * 4096, 4096)])
    assert runs == [(4096, 8192), (7 * 4096, 4096), (255 * 4096, 4096)]
    path, loads = _write(tmp_path, ram, runs, [E.Note(b"A", 1, b"x" * 5), E.Note(b"BB", 2, b"")])
    core = _read(path)
    assert [(n.name, n.type, n.desc) for n in core.notes] == [(b"A", 1, b"xxxxx"), (b"BB", 2, b"")]
    assert [(ld.paddr, ld.size) for ld in core.loads] == runs
    data = path.read_bytes()
    for ld in core.loads:
        assert ld.offset % 4096 == 0
        assert data[ld.offset : ld.offset + ld.size] == ram[ld.paddr : ld.end]
        assert core.entry_vaddr[ld.paddr] == 0xFFFF_8000_0000_0000 + ld.paddr
    assert len(data) == loads[-1].offset + loads[-1].size


def test_merge_runs_joins_neighbours_and_respects_the_limit():
    assert E.merge_runs([(8192, 4096), (0, 4096), (4096, 4096)]) == [(0, 12288)]
    runs = [(i * 8192, 4096) for i in range(10)]
    merged = E.merge_runs(runs, limit=4)
    assert len(merged) == 4
    covered = set()
    for a, n in merged:
        covered.update(range(a, a + n, 4096))
    assert all(a in covered for a, _ in runs)  # filling gaps never drops data


def _mutate(path, offset, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


PH0 = 64  # first program header (the PT_NOTE)
PH1 = 64 + 56  # first PT_LOAD


@pytest.mark.parametrize(
    "offset,fmt,value,fragment",
    [
        (0, "<I", 0x464C457F ^ 1, "bad magic"),
        (4, "<B", 1, "not ELF64"),
        (5, "<B", 2, "little-endian"),
        (6, "<B", 2, "version"),
        (16, "<H", 2, "not a core file"),
        (18, "<H", 3, "wrong machine"),
        (54, "<H", 32, "header sizes"),
        (56, "<H", 0xFFFF, "out of range"),
        (56, "<H", 0, "out of range"),
        (32, "<Q", 1 << 40, "outside the file"),
        (PH0, "<I", 0x6474E550, "unexpected program header type"),
        (PH1, "<I", 4, "more than one PT_NOTE"),
        (PH1 + 40, "<Q", 8192 + 4096, "p_memsz"),
        (PH1 + 24, "<Q", 4096 + 12, "not page aligned"),
        (PH1 + 8, "<Q", 1 << 40, "past the end of the file"),
        (PH1 + 24, "<Q", RAM - 4096, "RAM size"),
        (PH0 + 32, "<Q", 1 << 30, "past the end"),
        (PH0 + 32, "<Q", E.MAX_NOTES_BYTES + 1, "past the end"),
    ],
)
def test_reader_refuses_malformed_headers(tmp_path, offset, fmt, value, fragment):
    ram = _ram_with({1: 1, 2: 2, 100: 3})
    path, _ = _write(tmp_path, ram, [(4096, 8192), (100 * 4096, 4096)])
    _read(path)  # fine before
    _mutate(path, offset, fmt, value)
    with pytest.raises(E.CoreFormatError, match=fragment):
        _read(path)


def test_reader_refuses_overlapping_segments(tmp_path):
    ram = _ram_with({1: 1, 2: 2, 100: 3})
    path, _ = _write(tmp_path, ram, [(4096, 8192), (100 * 4096, 4096)])
    _mutate(path, PH1 + 56 + 24, "<Q", 8192)  # second load now starts inside the first
    with pytest.raises(E.CoreFormatError, match="overlap"):
        _read(path)


@pytest.mark.parametrize("cut", [0, 10, 63, 64 + 56, 300, 4096 + 100])
def test_truncated_files_are_refused(tmp_path, cut):
    path, _ = _write(tmp_path, _ram_with({1: 1}), [(4096, 4096)])
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(E.CoreFormatError):
        _read(path)


@pytest.mark.parametrize(
    "blob,fragment",
    [
        (b"\x01\x00\x00\x00", "truncated"),
        (struct.pack("<III", 0, 0, 1), "name size"),
        (struct.pack("<III", 200, 0, 1), "name size"),
        (struct.pack("<III", 4, 1 << 30, 1) + b"abc\0", "past the end"),
        (struct.pack("<III", 4, 0, 1) + b"abcd", "NUL-terminated"),
        (struct.pack("<III", 4, 0, 1) + b"a\0c\0", "NUL-terminated"),
    ],
)
def test_bad_notes_are_refused(blob, fragment):
    with pytest.raises(E.CoreFormatError, match=fragment):
        E.decode_notes(blob)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_note_parser_never_crashes(blob):
    try:
        E.decode_notes(blob)
    except E.CoreFormatError:
        pass
