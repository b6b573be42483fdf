"""Exit dispatch fed synthetic exits: no VM needed."""

import struct

from vmm import exits as X
from vmm import kvm_abi as K
from vmm.abi import COM1_BASE, EXIT_PORT, ExitCode
from vmm.devices import ExitDevice, InstructionCounter, PortBus, Stop, Uart16550
from vmm.exit_handling import PARK, ExitPolicy, handle_exit


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


# --- policy that depends on run state (ExitPolicy) -------------------------------------
def test_write_to_read_only_slot_is_a_kernel_write():
    bus, _ = _bus()
    policy = ExitPolicy(read_only=[(0x200000, 0x400000)])
    stop = handle_exit(X.Mmio(0x201000, 8, True, b"\0" * 8), bus, policy)
    assert stop.exit_code == ExitCode.KERNEL_WRITE and "0x201000" in stop.message
    # A read there, or a write just past the slot, is unbacked MMIO as before.
    assert handle_exit(X.Mmio(0x201000, 8, False, b""), bus, policy).exit_code == ExitCode.UNBACKED_MMIO
    assert handle_exit(X.Mmio(0x400000, 8, True, b"\0" * 8), bus, policy).exit_code == ExitCode.UNBACKED_MMIO


def test_debug_exit_at_run_to_address_parks():
    bus, _ = _bus()
    policy = ExitPolicy(run_to=0xFFFF_8000_0010_0000)
    assert handle_exit(X.Debug(1, 0xFFFF_8000_0010_0000), bus, policy) is PARK
    # Elsewhere nobody owns the debug exit: the run stops with a host error.
    assert handle_exit(X.Debug(1, 0x1234), bus, policy).exit_code == ExitCode.HOST_ERROR


def test_debug_exit_while_counting_is_one_step():
    bus, _ = _bus()
    stepping = []
    icount = InstructionCounter(stepping.append)
    policy = ExitPolicy(icount=icount)
    icount.io_out(0, (7).to_bytes(4, "little"))  # the guest's start marker
    for _ in range(3):
        assert handle_exit(X.Debug(1, 0x1000), bus, policy) is None
    icount.io_out(4, (7).to_bytes(4, "little"))  # stop marker
    assert icount.counts == {7: 3} and stepping == [True, False]
    # Counting is over: the next debug exit is nobody's.
    assert handle_exit(X.Debug(1, 0x1000), bus, policy).exit_code == ExitCode.HOST_ERROR


def test_interrupted_parks():
    bus, _ = _bus()
    assert handle_exit(X.Interrupted(), bus) is PARK


# --- the decoder reads the layout kvm_abi defines ----------------------------------------
def test_unpacker_formats_follow_the_ctypes_layout():
    head, at = K.unpacker((K.KVM_RUN_EXIT_REASON, K.u32), (K.KVM_RUN_EXIT_UNION, K.kvm_run_io))
    assert (head.format, at) == ("<I20xBBHIQ", 8)
    assert K.unpacker((0, K.kvm_run_mmio))[0].format == "<Q8sIB"
    assert K.unpacker((0, K.kvm_coalesced_mmio))[0].format == "<QII8s"


def _kvm_run() -> tuple[K.kvm_run, bytearray]:
    buf = bytearray(4096)
    return K.kvm_run.from_buffer(buf), buf


def test_decode_reads_what_the_ctypes_mirror_wrote():
    run, buf = _kvm_run()
    run.exit_reason = K.KVM_EXIT_IO
    io = run.u.io
    io.direction, io.size, io.port, io.count, io.data_offset = K.KVM_EXIT_IO_OUT, 2, 0x3F8, 3, 0x400
    buf[0x400:0x406] = b"abcdef"
    assert X.decode(buf) == X.IoOut(0x3F8, 2, b"abcdef")
    run.exit_reason = K.KVM_EXIT_MMIO
    m = run.u.mmio
    m.phys_addr, m.len, m.is_write = 0xFEE0_0030, 4, 1
    m.data[:4] = [1, 2, 3, 4]
    assert X.decode(buf) == X.Mmio(0xFEE0_0030, 4, True, b"\1\2\3\4")
    run.exit_reason = K.KVM_EXIT_DEBUG
    run.u.debug.arch.exception, run.u.debug.arch.pc = 1, 0xFFFF_FFFF_8000_1234
    assert X.decode(buf) == X.Debug(1, 0xFFFF_FFFF_8000_1234)
    run.exit_reason = K.KVM_EXIT_SYSTEM_EVENT
    run.u.system_event.type = 2
    assert X.decode(buf) == X.SystemEvent(2)
    run.exit_reason = K.KVM_EXIT_INTR
    assert X.decode(buf) == X.Interrupted()


def test_bound_decoder_refills_one_port_write_and_decodes_the_rest():
    run, buf = _kvm_run()
    decode = X.decoder_for(buf)
    run.exit_reason = K.KVM_EXIT_IO
    io = run.u.io
    io.direction, io.size, io.port, io.count, io.data_offset = K.KVM_EXIT_IO_OUT, 1, 0x3F8, 1, 0x400
    buf[0x400] = ord("a")
    first = decode()
    assert first == X.IoOut(0x3F8, 1, b"a")
    io.port, buf[0x400] = 0x3FF, ord("b")
    assert decode() is first and first == X.IoOut(0x3FF, 1, b"b")  # the same object, refilled
    io.data_offset = len(buf)  # data past the mapping: not a port write we can read
    assert decode() == X.UnknownExit(K.KVM_EXIT_IO)
    io.direction, io.data_offset = K.KVM_EXIT_IO_IN, 0x400
    assert decode() == X.IoIn(0x3FF, 1, 1, 0x400)
