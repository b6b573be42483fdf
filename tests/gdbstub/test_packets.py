"""The packet layer: framing, checksums, escapes, RLE, acks, resynchronisation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vmm.gdbstub import commands as C
from vmm.gdbstub.packets import (
    MAX_PACKET,
    Ack,
    BadChecksum,
    Framer,
    Interrupt,
    Malformed,
    Nack,
    Oversize,
    Packet,
    PacketError,
    checksum,
    encode,
    escape,
    rle_expand,
    unescape,
)


def test_encode_known_packet():
    # gdb manual: "$OK#9a"
    assert encode(b"OK") == b"$OK#9a"
    assert encode(b"") == b"$#00"


def test_framer_acks_interrupt_and_packets_in_one_stream():
    f = Framer()
    ev = f.feed(b"+-\x03junk$g#67$m0,4#fd")
    assert ev == [Ack(), Nack(), Interrupt(), Packet(b"g"), Packet(b"m0,4")]


def test_framer_split_anywhere():
    data = b"$qSupported:multiprocess+;swbreak+#c9"
    expected = Framer().feed(data)
    assert len(expected) == 1 and isinstance(expected[0], (Packet, BadChecksum))
    for cut in range(len(data)):
        f = Framer()
        assert f.feed(data[:cut]) + f.feed(data[cut:]) == expected


def test_bad_checksum_and_non_hex_checksum():
    assert Framer().feed(b"$g#00") == [BadChecksum(b"g", 0x67, 0)]
    assert Framer().feed(b"$g#zz") == [BadChecksum(b"g", 0x67, None)]
    # int() would accept " 7" or "+7": the framer must not
    assert Framer().feed(b"$g# 7")[0] == BadChecksum(b"g", 0x67, None)


def test_dollar_inside_payload_restarts_like_gdb():
    assert Framer().feed(b"$m0,$g#67") == [Packet(b"g")]


def test_oversize_is_dropped_without_buffering_and_framer_recovers():
    f = Framer(limit=64)
    body = b"M0,100:" + b"00" * 500
    ev = f.feed(b"$" + body + b"#%02x" % checksum(body))
    assert ev == [Oversize(len(body))]
    assert len(f._body) <= 64
    assert f.feed(b"$g#67") == [Packet(b"g")]


def test_mid_packet_state():
    f = Framer()
    f.feed(b"$m0,")
    assert f.mid_packet
    f.feed(b"4#fd")
    assert not f.mid_packet


def test_escape_roundtrip_special_bytes():
    raw = bytes(b"a$b#c}d*e")
    esc = escape(raw)
    assert not any(c in esc for c in b"$#*")
    assert unescape(esc) == raw
    with pytest.raises(PacketError):
        unescape(b"abc}")


def test_rle_expansion_as_gdb_documents():
    # "0* " means 0 and 3 more copies ("' ' is 32, 32 - 29 = 3")
    assert rle_expand(b"0* ") == b"0000"
    with pytest.raises(PacketError):
        rle_expand(b"*5")
    with pytest.raises(PacketError):
        rle_expand(b"0*\x01")  # count below 29
    with pytest.raises(PacketError):
        rle_expand(b"0*~" * 1000, limit=100)
    body = b"0*!"
    assert Framer().feed(b"$" + body + b"#%02x" % checksum(body)) == [Packet(b"00000")]


def test_bad_rle_with_good_checksum_is_malformed():
    body = b"*!"
    assert Framer().feed(b"$" + body + b"#%02x" % checksum(body)) == [Malformed(body, "run-length marker without a byte to repeat or a count")]


def test_outgoing_payload_with_framing_bytes_is_refused():
    for bad in (b"a#b", b"$", b"x*y"):
        with pytest.raises(PacketError):
            encode(bad)


# --- fuzz -------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_fuzz_framer_never_raises_and_bounds_memory(data, cuts):
    f = Framer(limit=128)
    pos = 0
    events = []
    for c in sorted(cuts) + [len(data)]:
        events += f.feed(data[pos:c])
        pos = max(pos, c)
        assert len(f._body) <= 128
    for e in events:
        assert isinstance(e, (Packet, BadChecksum, Malformed, Oversize, Interrupt, Ack, Nack))
        if isinstance(e, Packet):
            try:
                C.decode(e.payload)
            except C.BadCommand:
                pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_binary_payload_roundtrip_through_the_wire(raw):
    """Any binary data escaped, framed, split and reassembled comes back intact."""
    wire = encode(b"X0," + b"%x" % len(raw) + b":" + escape(raw))
    f = Framer()
    ev = f.feed(wire[: len(wire) // 2]) + f.feed(wire[len(wire) // 2 :])
    assert len(ev) == 1 and isinstance(ev[0], Packet)
    cmd = C.decode(ev[0].payload)
    assert cmd == C.WriteMemory(0, raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decode_only_raises_badcommand(payload):
    try:
        C.decode(payload)
    except C.BadCommand:
        pass


def test_max_packet_is_advertised_size():
    assert MAX_PACKET >= 2 * 4096 + 16  # one 4 KiB m reply fits
