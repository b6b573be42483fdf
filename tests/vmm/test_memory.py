import pytest

from vmm.memory import GuestMemory, GuestMemoryError, check_ram_size


def test_sparse_64g_costs_nothing():
    with GuestMemory(64 << 30) as mem:
        mem.write(63 << 30, b"top")
        assert mem.read(63 << 30, 3) == b"top"
        assert mem.resident_bytes() < 1 << 20


@pytest.mark.parametrize("paddr,n", [(-1, 1), (16 << 20, 1), ((16 << 20) - 1, 2), (0, (16 << 20) + 1), (1 << 63, 8)])
def test_out_of_bounds_refused(paddr, n):
    with GuestMemory(16 << 20) as mem:
        with pytest.raises(GuestMemoryError):
            mem.read(paddr, n)
        with pytest.raises(GuestMemoryError):
            mem.write(paddr, bytes(max(n, 0)))


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
