import pytest

from vmm.devices import BusError, Device, PortBus, ReportDevice
from vmm.memory import GuestMemory
from vmm.reports import ReportError, decode_report, encode_report
from vmm.abi import ReportKind


def test_bus_refuses_overlap():
    bus = PortBus()
    bus.add(0x3F8, 8, Device())
    with pytest.raises(BusError):
        bus.add(0x3FC, 4, Device())
    with pytest.raises(BusError):
        bus.add(0x3F0, 9, Device())
    bus.add(0x3F0, 8, Device())
    assert bus.lookup(0x3F7)[1] == 7
    assert bus.lookup(0x400) is None


def test_report_round_trip():
    raw = encode_report(ReportKind.TEST_RESULT, {"name": "heap", "status": "pass"})
    rep = decode_report(raw)
    assert rep.kind == ReportKind.TEST_RESULT and rep.fields == {"name": "heap", "status": "pass"}


@pytest.mark.parametrize(
    "raw",
    [b"", b"RRPT", b"XXXX" + bytes(12), encode_report(1, {"a": 1})[:-1], encode_report(1, {"a": 1})[:8] + (1).to_bytes(4, "little") + bytes(4) + b"\xff"],
)
def test_bad_reports(raw):
    with pytest.raises(ReportError):
        decode_report(raw)


def test_report_device_reads_guest_memory_bounds_checked():
    with GuestMemory(16 << 20) as mem:
        dev = ReportDevice(mem)
        mem.write(0x5000, encode_report(ReportKind.READY, {"x": "1"}))
        dev.io_out(0, (0x5000).to_bytes(4, "little"))
        assert dev.reports[0].kind == ReportKind.READY
        dev.io_out(0, (0xFFFFFFF0).to_bytes(4, "little"))  # outside RAM
        mem.write(0x6000, encode_report(ReportKind.READY, {})[:8] + (1 << 16).to_bytes(4, "little") + bytes(4))
        dev.io_out(0, (0x6000).to_bytes(4, "little"))  # payload too long
        assert len(dev.reports) == 1 and len(dev.errors) == 2
        assert "outside guest RAM" in dev.errors[0]


from hypothesis import given, settings, strategies as st


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_report_decoder_fuzz(raw):
    try:
        rep = decode_report(raw)
    except ReportError:
        return
    assert isinstance(rep.fields, dict)


#: Report keys: 1-12 of [a-z0-9_]. The same strings st.from_regex gives, four times faster to draw.
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=40), max_size=8))
def test_report_round_trip_property(fields):
    rep = decode_report(encode_report(ReportKind.INFO, fields))
    assert rep.fields == fields
