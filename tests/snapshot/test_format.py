"""pyvmm's notes inside the core file: round trip, sizes pinned to the KVM
structures, and a loader that refuses every malformed file with one error
type (fuzzed)."""

from __future__ import annotations

import ctypes as C
import json
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm import kvm_abi as K
from vmm.abi import BOOT_INFO_SIZE
from vmm.snapshot import elfcore as E
from vmm.snapshot import format as F
from tests.snapgen import RAM, load_bytes, sample_state, snapshot_bytes



def _state(**meta) -> F.SnapshotState:
    return sample_state(**meta)


def _file_bytes(state=None, notes=None, runs=((0x1000, 0x2000),)) -> bytes:
    return snapshot_bytes(state, notes, runs)


def _load(data: bytes):
    return load_bytes(data)


def test_sizes_are_the_kvm_structures():
    assert F.FIXED_SIZES[F.NoteType.REGS] == C.sizeof(K.kvm_regs) == 144
    assert F.FIXED_SIZES[F.NoteType.SREGS] == C.sizeof(K.kvm_sregs) == 312
    assert F.FIXED_SIZES[F.NoteType.XSAVE] == C.sizeof(K.kvm_xsave) == 4096
    assert F.FIXED_SIZES[F.NoteType.XCRS] == C.sizeof(K.kvm_xcrs) == 392
    assert F.FIXED_SIZES[F.NoteType.EVENTS] == C.sizeof(K.kvm_vcpu_events) == 64
    assert F.FIXED_SIZES[F.NoteType.DEBUGREGS] == C.sizeof(K.kvm_debugregs) == 128
    assert F.FIXED_SIZES[F.NoteType.BOOT_INFO] == BOOT_INFO_SIZE


def test_roundtrip():
    core, state = _load(_file_bytes())
    assert state.vcpu.regs.rip == 0xFFFF_FFFF_8000_1234
    assert state.vcpu.sregs.cr3 == 0x10000 and state.vcpu.sregs.efer == 0xD00
    assert state.vcpu.msrs == {0x10: 12345, 0xC0000082: 0xFFFF_FFFF_8000_0000}
    assert (state.vcpu.tsc, state.vcpu.tsc_khz) == (12345, 2_600_000)
    assert state.vcpu.xcrs.nr_xcrs == 1 and state.boot_info.ram_size == RAM
    assert state.meta["cmdline"] == "tests=all" and state.memory_size == RAM
    assert [(ld.paddr, ld.size) for ld in core.loads] == [(0x1000, 0x2000)]


def _replace(notes, kind, desc):
    return [E.Note(n.name, n.type, desc) if n.type == kind else n for n in notes]


@pytest.mark.parametrize(
    "kind,delta,fragment",
    [(F.NoteType.REGS, -8, "too short"), (F.NoteType.SREGS, 8, "too long"), (F.NoteType.XSAVE, -1, "too short"),
     (F.NoteType.EVENTS, 4, "too long"), (F.NoteType.VERSION, -4, "too short"), (F.NoteType.TSC, 8, "too long")],
)
def test_notes_of_the_wrong_size_are_refused(kind, delta, fragment):
    notes = F.encode_state(_state())
    desc = next(n.desc for n in notes if n.type == kind)
    desc = desc[:delta] if delta < 0 else desc + bytes(delta)
    with pytest.raises(E.CoreFormatError, match=fragment):
        _load(_file_bytes(notes=_replace(notes, kind, desc)))


@pytest.mark.parametrize("kind", F.REQUIRED)
def test_missing_notes_are_refused(kind):
    notes = [n for n in F.encode_state(_state()) if n.type != kind]
    with pytest.raises(E.CoreFormatError):
        _load(_file_bytes(notes=notes))


def test_duplicate_and_unknown_notes_are_refused():
    notes = F.encode_state(_state())
    with pytest.raises(E.CoreFormatError, match="twice"):
        _load(_file_bytes(notes=notes + [notes[1]]))
    with pytest.raises(E.CoreFormatError, match="unknown"):
        _load(_file_bytes(notes=notes + [E.Note(F.OWNER, F.NOTE_BASE + 99, b"")]))
    # Other owners' notes are kept, not interpreted.
    _core, state = _load(_file_bytes(notes=notes + [E.Note(b"CORE", 1, b"x")]))
    assert state.extra_notes == [E.Note(b"CORE", 1, b"x")]


@pytest.mark.parametrize(
    "meta_bytes,fragment",
    [(b"{", "not valid JSON"), (b"[]", "not a JSON object"), (b"\xff\xfe", "not valid JSON"),
     (json.dumps({"memory_size": RAM}).encode(), "lacks"), (b"[" * 100000, "not valid JSON")],
)
def test_bad_metadata_is_refused(meta_bytes, fragment):
    notes = _replace(F.encode_state(_state()), F.NoteType.META, meta_bytes)
    with pytest.raises(E.CoreFormatError, match=fragment):
        _load(_file_bytes(notes=notes))


@pytest.mark.parametrize("field,value", [("memory_size", "big"), ("kaslr_slide", True), ("memmap", {})])
def test_metadata_types_are_checked(field, value):
    with pytest.raises(E.CoreFormatError, match=field):
        _load(_file_bytes(_state(**{field: value})))


def test_wrong_version_is_refused():
    notes = _replace(F.encode_state(_state()), F.NoteType.VERSION, struct.pack("<II", 99, 0))
    with pytest.raises(E.CoreFormatError, match="version 99"):
        _load(_file_bytes(notes=notes))


@pytest.mark.parametrize("size", [RAM - 0x1000, 1 << 20, (64 << 30) + 4096])
def test_segments_past_ram_and_bad_ram_sizes_are_refused(size):
    with pytest.raises(E.CoreFormatError):
        _load(_file_bytes(_state(memory_size=size), runs=[(RAM - 0x2000, 0x2000)]))


# --- fuzz: the loader's only failure is its own error type -----------------------------------
_SEED = None


def _seed() -> bytes:
    global _SEED
    if _SEED is None:
        _SEED = _file_bytes(runs=[(0x1000, 0x1000), (0x5000, 0x2000)])
    return _SEED


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    limit = min(len(b), 0x3000)  # headers and notes: where the parser looks
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.5:
            b[rng.randrange(limit)] = rng.randrange(256)
        elif op < 0.75:
            if limit <= 8:  # truncated below one u64: nothing to overwrite
                continue
            pos = rng.randrange(limit - 8)
            b[pos : pos + 8] = struct.pack("<Q", rng.choice([0, 1, 4096, 1 << 63, (1 << 64) - 1, rng.getrandbits(64)]))
        elif op < 0.9:
            del b[rng.randrange(len(b)) :]
            limit = min(limit, len(b)) or 1
            if not b:
                break
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(b)


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_fuzz_loader(seed):
    data = mutate(random.Random(seed), _seed())
    try:
        core, state = _load(data)
    except E.CoreFormatError:
        return
    # Accepted: then everything it says is within bounds.
    for ld in core.loads:
        assert ld.end <= state.memory_size and ld.offset + ld.size <= core.file_size
