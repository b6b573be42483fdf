from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mm.addr import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PageSize,
    PhysAddr,
    VirtAddr,
    align_down,
    align_up,
    canonicalize,
    is_aligned,
    is_canonical,
)
from mm.errors import AddressError, MMError


def test_page_sizes():
    assert (PAGE_4K, PAGE_2M, PAGE_1G) == (4096, 2 << 20, 1 << 30)
    assert [int(s) for s in PageSize] == [PAGE_4K, PAGE_2M, PAGE_1G]


@pytest.mark.parametrize("v", [0, 0x7FFF_FFFF_FFFF, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF])
def test_canonical_accepted(v):
    assert VirtAddr(v) == v and is_canonical(v)


@pytest.mark.parametrize("v", [0x8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, 0x0001_0000_0000_0000, -1, 1 << 64])
def test_non_canonical_refused(v):
    with pytest.raises(AddressError) as ei:
        VirtAddr(v)
    assert isinstance(ei.value, MMError) and ei.value.addr == v


def test_phys_limits():
    assert PhysAddr((1 << 52) - 1) == (1 << 52) - 1
    for bad in (1 << 52, -1):
        with pytest.raises(AddressError):
            PhysAddr(bad)


def test_canonicalize():
    assert canonicalize(0x8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert canonicalize(0x7FFF_FFFF_F000) == 0x7FFF_FFFF_F000
    assert canonicalize(0xFFFF_8000_0000_1234) == 0xFFFF_8000_0000_1234


@given(st.integers(0, 511), st.integers(0, 511), st.integers(0, 511), st.integers(0, 511), st.integers(0, 4095))
def test_index_round_trip(a, b, c, d, off):
    v = VirtAddr.from_index(a, b, c, d, off)
    assert is_canonical(v)
    assert v.indices() == (a, b, c, d, off)


def test_from_index_refuses_out_of_range():
    with pytest.raises(AddressError):
        VirtAddr.from_index(512)
    with pytest.raises(AddressError):
        VirtAddr.from_index(0, offset=4096)


@given(st.integers(0, 1 << 60), st.sampled_from([1, 8, PAGE_4K, PAGE_2M, PAGE_1G]))
def test_alignment(x, a):
    lo, hi = align_down(x, a), align_up(x, a)
    assert lo <= x <= hi and hi - lo in (0, a)
    assert is_aligned(lo, a) and is_aligned(hi, a)
    assert is_aligned(x, a) == (lo == x)
