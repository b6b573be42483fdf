import pytest

from mm.errors import OutOfBounds
from mm.physmem import PhysicalMemory
from vmm.memory import GuestMemory, GuestMemoryError, check_ram_size


def test_sparse_64g_costs_nothing():
    with GuestMemory(64 << 30) as mem:
        mem.write(63 << 30, b"top")
        assert mem.read(63 << 30, 3) == b"top"
        assert mem.resident_bytes() < 1 << 20


@pytest.mark.parametrize("paddr,n", [(-1, 1), (16 << 20, 1), ((16 << 20) - 1, 2), (0, (16 << 20) + 1), (1 << 63, 8)])
def test_out_of_bounds_refused(paddr, n):
    # mm's error, the one every guest-physical access raises (exit code 2 at the command line)
    with GuestMemory(16 << 20) as mem:
        for op in (lambda: mem.read(paddr, n), lambda: mem.write(paddr, bytes(max(n, 0))),
                   lambda: mem.view(paddr, n), lambda: mem.zero(paddr, n)):
            with pytest.raises(OutOfBounds):
                op()
        if n == 8:
            with pytest.raises(OutOfBounds):
                mem.read_u64(paddr)


def test_large_write_is_checked_before_the_file():
    # writes of a page or more go through pwrite(2): the bounds check comes first
    with GuestMemory(16 << 20) as mem:
        with pytest.raises(OutOfBounds):
            mem.write((16 << 20) - 4096, bytes(8192))
        assert mem.resident_bytes() == 0


@pytest.mark.parametrize("size,msg", [(0, "positive"), (4097, "4 KiB"), (1 << 20, "minimum"), (65 << 30, "maximum")])
def test_bad_sizes(size, msg):
    with pytest.raises(GuestMemoryError, match=msg):
        check_ram_size(size)


def test_u64_and_zero():
    with GuestMemory(16 << 20) as mem:
        mem.write_u64(0x1000, 0x1122334455667788)
        assert mem.read_u64(0x1000) == 0x1122334455667788
        mem.zero(0x1000, 8)
        assert mem.read_u64(0x1000) == 0


@pytest.mark.parametrize("shared", [True, False])
def test_guest_ram_is_the_mm_interface(shared):
    # No wrapper: the walker's table reads and the VMM's byte writes are one mapping.
    with GuestMemory(16 << 20, shared=shared) as mem:
        assert isinstance(mem, PhysicalMemory) and (mem.base, mem.size) == (0, 16 << 20)
        mem.write(0x3000, (0x5000 | 3).to_bytes(8, "little") * 2)
        mem.write(0x10000, bytes(range(256)) * 32)  # a pwrite(2) when shared
        table = mem.read_table(0x3000)
        assert list(table[:3]) == [0x5003, 0x5003, 0]
        assert mem.read(0x10000 + 255, 2) == b"\xff\x00"
        assert list(mem.read_u64s([0x3000, 0x3008])) == [0x5003, 0x5003]
        mem.write_u64s(0x3000, table[:1] + 1)
        assert mem.read_u64(0x3000) == 0x5004


def test_close_releases_the_mapping():
    mem = GuestMemory(16 << 20)
    mem.read_table(0)  # numpy views exist now
    mem.close()
    mem.close()  # idempotent
    assert mem.mmap is None and mem.fd is None


def _bits(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}


@pytest.mark.parametrize("shared", [True, False])
def test_data_pages_are_the_pages_with_a_nonzero_byte(shared):
    """Written pages with a nonzero byte (first, last, middle byte) are set;
    pages never written (holes of the memfd) and pages written with zeros
    (allocated, still zero) are clear; the last page of RAM counts too."""
    size = 16 << 20
    with GuestMemory(size, shared=shared) as mem:
        mem.write(0, b"\x01")
        mem.write(5 * 4096 + 4095, b"\x02")
        mem.write(700 * 4096, bytes(3 * 4096))  # allocated, zero
        mem.write(701 * 4096 + 2048, b"\x00\x03")
        mem.write(size - 1, b"\x04")
        mem.write(2000 * 4096, b"\x05" * (3 * 4096))  # a run across pages (pwrite on a memfd)
        bits = mem.data_pages()
        assert len(bits) % 8 == 0 and len(bits) * 8 >= size // 4096
        assert _bits(bits) == {0, 5, 701, size // 4096 - 1, 2000, 2001, 2002}


def test_a_copy_on_write_ram_reads_its_image_for_data_pages():
    with GuestMemory(16 << 20) as image:
        image.write(3 * 4096, b"\x09")
        with GuestMemory(16 << 20, copy_on_write_of=image.fd) as cow:
            cow.write(4 * 4096, b"\x01")
            assert _bits(cow.data_pages()) == {3, 4}


def test_put_back_zeroes_exactly_the_zero_runs():
    with GuestMemory(16 << 20) as mem:
        mem.write(0, b"\xff" * (64 * 4096))
        mem.put_back(None, (), [(1, 1), (3, 2), (10, 20)])  # short runs (a slice copy) and a long one (memset)
        data = mem.read(0, 64 * 4096)
        zeroed = {1, 3, 4} | set(range(10, 30))
        for page in range(64):
            chunk = data[page * 4096 : (page + 1) * 4096]
            assert chunk == (bytes(4096) if page in zeroed else b"\xff" * 4096), page
        for bad in ([(4095, 2)], [(-1, 1)], [(0, 4097)]):
            with pytest.raises(OutOfBounds):
                mem.put_back(None, (), bad)
