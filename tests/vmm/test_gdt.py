from vmm import gdt


def test_known_encodings():
    # The classic flat 64-bit code and data descriptors.
    assert gdt.CODE64 == 0x00AF9B000000FFFF
    assert gdt.DATA == 0x00CF93000000FFFF


def test_code_segment_decodes_to_long_mode():
    seg = gdt.segment_from_entry(gdt.KERNEL_CS, gdt.CODE64)
    assert (seg.l, seg.db, seg.present, seg.dpl, seg.s, seg.g) == (1, 0, 1, 0, 1, 1)
    assert seg.type == 0xB  # execute/read, accessed
    assert seg.limit == 0xFFFFFFFF
    assert seg.selector == 0x08


def test_data_segment():
    seg = gdt.segment_from_entry(gdt.KERNEL_DS, gdt.DATA)
    assert (seg.l, seg.db, seg.type, seg.present) == (0, 1, 0x3, 1)


def test_bytes_match_entries():
    raw = gdt.gdt_bytes()
    assert len(raw) == 24 and raw[:8] == bytes(8)
    assert int.from_bytes(raw[8:16], "little") == gdt.CODE64


def test_round_trip_base_and_limit():
    e = gdt.gdt_entry(0x4093, 0x12345678, 0xABCDE)
    seg = gdt.segment_from_entry(0x18, e)
    assert seg.base == 0x12345678 and seg.limit == 0xABCDE and seg.g == 0
