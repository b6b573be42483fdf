"""Exit dispatch fed synthetic exits: no VM needed."""

import struct

from vmm import exits as X
from vmm import kvm_abi as K
from vmm.abi import COM1_BASE, EXIT_PORT, ExitCode
from vmm.devices import ExitDevice, PortBus, Stop, Uart16550
from vmm.vm import handle_exit


def _bus():
    bus = PortBus()
    out = bytearray()
    uart = Uart16550(out.extend)
    bus.add(COM1_BASE, 8, uart)
    bus.add(EXIT_PORT, 4, ExitDevice())
    return bus, out


def _run_bytes(reason_union: bytes, extra: bytes = b"") -> bytes:
    run = bytearray(2352)
    run[32 : 32 + len(reason_union)] = reason_union
    run[0x100 : 0x100 + len(extra)] = extra
    return bytes(run)


def test_decode_io_out():
    run = _run_bytes(struct.pack("<BBHIQ", 1, 1, 0x3F8, 1, 0x100), b"A")
    ex = X.decode_exit(K.KVM_EXIT_IO, run)
    assert ex == X.IoOut(0x3F8, 1, b"A")


def test_decode_io_in():
    run = _run_bytes(struct.pack("<BBHIQ", 0, 1, 0x3FD, 1, 0x100))
    assert X.decode_exit(K.KVM_EXIT_IO, run) == X.IoIn(0x3FD, 1, 1, 0x100)


def test_decode_bogus_data_offset_is_unknown():
    run = _run_bytes(struct.pack("<BBHIQ", 1, 4, 0xF4, 1, 1 << 40))
    assert isinstance(X.decode_exit(K.KVM_EXIT_IO, run), X.UnknownExit)


def test_decode_internal_error():
    run = _run_bytes(struct.pack("<II3Q", 1, 3, 7, 8, 9))
    ex = X.decode_exit(K.KVM_EXIT_INTERNAL_ERROR, run)
    assert ex == X.InternalError(1, (7, 8, 9)) and "emulation" in ex.description


def test_unknown_reason_is_a_value():
    assert X.decode_exit(999, bytes(2352)) == X.UnknownExit(999)


def test_serial_output_goes_to_console():
    bus, out = _bus()
    assert handle_exit(X.IoOut(0x3F8, 1, b"hi"), bus) is None
    assert bytes(out) == b"hi"


def test_lsr_reads_transmitter_empty():
    bus, _ = _bus()
    assert handle_exit(X.IoIn(0x3FD, 1, 1, 0), bus)[0] & 0x20


def test_exit_device_stops_with_guest_code():
    bus, _ = _bus()
    stop = handle_exit(X.IoOut(EXIT_PORT, 4, (3).to_bytes(4, "little")), bus)
    assert stop == Stop(3, "exit", "guest exited with status 3")


def test_unknown_port():
    bus, _ = _bus()
    stop = handle_exit(X.IoOut(0x80, 1, b"\0"), bus)
    assert stop.exit_code == ExitCode.UNKNOWN_PORT and "0x80" in stop.message


def test_mmio_hlt_shutdown_fail_entry():
    bus, _ = _bus()
    assert handle_exit(X.Mmio(0xFEE00000, 4, True, b"\0" * 4), bus).exit_code == ExitCode.UNBACKED_MMIO
    assert handle_exit(X.Hlt(), bus).exit_code == ExitCode.HALTED
    assert handle_exit(X.Shutdown(), bus).exit_code == ExitCode.TRIPLE_FAULT
    assert handle_exit(X.FailEntry(0x21), bus).exit_code == ExitCode.FAIL_ENTRY
    assert handle_exit(X.InternalError(1, ()), bus).exit_code == ExitCode.EMULATION_FAILURE
    assert handle_exit(X.UnknownExit(77), bus).exit_code == ExitCode.HOST_ERROR
