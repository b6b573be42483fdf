"""Pin the host side of the guest/host ABI (docs/ABI.md)."""

import ctypes as C

import pytest

from vmm import abi

BOOT_INFO_OFFSETS = {
    "magic": 0, "version": 8, "size": 12, "phys_offset": 16, "ram_size": 24, "memmap_phys": 32,
    "memmap_count": 40, "memmap_desc_size": 44, "kernel_phys_start": 48, "kernel_phys_end": 56,
    "kernel_link_base": 64, "kaslr_slide": 72, "boot_pt_phys": 80, "boot_pt_end": 88, "fb_phys": 96,
    "fb_width": 104, "fb_height": 108, "fb_stride": 112, "fb_format": 116, "cmdline_phys": 120,
    "cmdline_len": 128, "flags": 132, "rng_seed": 136, "tsc_khz": 144, "backend": 152, "reserved": 156,
}


def test_boot_info_size():
    assert C.sizeof(abi.BootInfo) == abi.BOOT_INFO_SIZE == 160


@pytest.mark.parametrize("field,offset", sorted(BOOT_INFO_OFFSETS.items()))
def test_boot_info_offsets(field, offset):
    assert getattr(abi.BootInfo, field).offset == offset


def test_magic_is_ascii_tag():
    assert abi.BOOT_INFO_MAGIC.to_bytes(8, "little") == b"PYVMMBI1"
    assert abi.REPORT_MAGIC.to_bytes(4, "little") == b"RRPT"


def test_report_header():
    assert C.sizeof(abi.ReportHeader) == abi.REPORT_HEADER_SIZE == 16


def test_exit_codes_do_not_collide():
    values = [c.value for c in abi.ExitCode]
    assert len(values) == len(set(values))
    guest = {abi.ExitCode.SUCCESS, abi.ExitCode.TEST_FAILURE, abi.ExitCode.PANIC, abi.ExitCode.STACK_OVERFLOW, abi.ExitCode.GUEST_FAULT}
    assert all(c < 100 for c in guest)
