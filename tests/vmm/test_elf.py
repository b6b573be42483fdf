"""The ELF loader on synthetic files: valid kernels load, broken ones give one line."""

import pytest
from hypothesis import given, settings, strategies as st

from tests.elfgen import HIGH, PF_R, PF_W, PF_X, Elf, Seg, simple_kernel
from vmm.elf import KernelImageError, parse_kernel


def test_simple_kernel_parses():
    img = parse_kernel(simple_kernel().build())
    assert img.entry == HIGH
    assert [s.perms for s in img.segments] == ["R-X", "R--", "RW-"]
    assert img.paddr_start == 0x100000 and img.paddr_end == 0x104000
    assert not img.relocatable


def test_empty_segments_are_skipped():
    elf = simple_kernel()
    elf.segments.append(Seg(HIGH + 0x10000, 0x110000, b"", memsz=0, flags=PF_R | PF_W | PF_X))
    img = parse_kernel(elf.build())
    assert len(img.segments) == 3


def _refused(data: bytes, fragment: str):
    with pytest.raises(KernelImageError) as exc:
        parse_kernel(data)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_wx_segment_refused():
    elf = simple_kernel()
    elf.segments[0].flags = PF_R | PF_W | PF_X
    _refused(elf.build(), "writable and executable")


def test_not_elf():
    _refused(b"hello world, not an elf", "not an ELF")


def test_truncated_header():
    _refused(simple_kernel().build()[:40], "truncated")


def test_32_bit():
    elf = simple_kernel()
    elf.elf_class = 1
    _refused(elf.build(), "64-bit")


def test_wrong_machine():
    elf = simple_kernel()
    elf.machine = 183  # aarch64
    _refused(elf.build(), "x86-64")


def test_segment_beyond_file():
    data = simple_kernel().build()
    _refused(data[: len(data) - 4], "beyond the end of the file")


def test_overlapping_segments():
    elf = simple_kernel()
    elf.segments[1].vaddr = HIGH + 0x800
    elf.segments[1].paddr = 0x100800
    _refused(elf.build(), "overlap")


def test_entry_outside_executable_segment():
    elf = simple_kernel()
    elf.entry = HIGH + 0x1000  # rodata
    _refused(elf.build(), "entry point")


def test_no_loadable_segment():
    elf = simple_kernel()
    for s in elf.segments:
        s.p_type = 4  # PT_NOTE
    _refused(elf.build(), "no loadable segment")


def test_enormous_memsz():
    elf = simple_kernel()
    elf.segments[2].memsz = 1 << 40
    _refused(elf.build(), "absurd")


def test_filesz_above_memsz():
    elf = simple_kernel()
    elf.segments[1].memsz = 2
    _refused(elf.build(), "exceeds memory size")


def test_not_executable_type():
    elf = simple_kernel()
    elf.e_type = 1  # ET_REL
    _refused(elf.build(), "not an executable")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data):
    try:
        parse_kernel(data)
    except KernelImageError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_valid_kernel_never_crashes(data):
    raw = bytearray(simple_kernel().build())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, 64 + 3 * 56 - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        parse_kernel(bytes(raw))
    except KernelImageError:
        pass


def test_segment_outside_ram_refused_at_load(tmp_path):
    import subprocess
    import sys

    elf = simple_kernel()
    elf.segments[2].paddr = 0x4000_0000  # 1 GiB: beyond a 64 MiB guest
    elf.segments[2].vaddr = HIGH + 0x2000
    path = tmp_path / "far.elf"
    path.write_bytes(elf.build())
    proc = subprocess.run([sys.executable, "vmm.py", "memmap", "--kernel", str(path), "--memory", "64M"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "outside guest RAM" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_segment_below_1mib_refused():
    from vmm.boot import check_kernel_fits

    elf = simple_kernel()
    elf.segments[0].paddr = 0x1000
    img = parse_kernel(elf.build())
    with pytest.raises(KernelImageError, match="below"):
        check_kernel_fits(img, 64 << 20)


def test_fuzz_script_short_run():
    """The long-run fuzzer (scripts/fuzz.py) works; here only briefly."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/fuzz.py", "--seconds", "0.5", "--seed", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no unexpected exception" in proc.stdout
