"""Decoding KVM's dirty bitmap into runs of pages (no KVM needed)."""

import random

import pytest

from vmm import dirty_log
from vmm.dirty_log import SKIP_FROM


def bitmap_runs(bitmap: bytearray, first_page: int, runs: list, mask: bytearray | None = None,
                others: list | None = None) -> int:
    if mask is None:
        return dirty_log.bitmap_runs(bitmap, first_page, runs)
    return dirty_log.bitmap_runs(bitmap, first_page, runs, bytes(mask), others)


def _words(pages: set[int], nbits: int) -> bytearray:
    """KVM's layout: whole little-endian u64 words, bit i of the bitmap is page i."""
    bitmap = bytearray((nbits + 63) // 64 * 8)
    for p in pages:
        bitmap[p // 8] |= 1 << (p % 8)
    return bitmap


def _expand(runs):
    return [p for first, n in runs for p in range(first, first + n)]


@pytest.mark.parametrize("pages", [
    set(), {0}, {63}, {64}, {63, 64}, set(range(60, 200)), set(range(0, 1000, 2)), {5, 6, 7, 130, 16043},
    set(range(16044)),
])
def test_runs_list_exactly_the_set_bits(pages):
    runs: list[tuple[int, int]] = []
    found = bitmap_runs(_words(pages, 16044), 1000, runs)
    assert _expand(runs) == sorted(p + 1000 for p in pages) and found == len(pages)
    # Maximal runs: no two touch.
    assert all(a + n < b for (a, n), (b, _m) in zip(runs, runs[1:]))


def test_random_bitmaps():
    rng = random.Random(7)
    for _ in range(200):
        pages = {rng.randrange(4096) for _ in range(rng.randrange(300))}
        runs: list[tuple[int, int]] = []
        assert bitmap_runs(_words(pages, 4096), 0, runs) == len(pages)
        assert _expand(runs) == sorted(pages)


def test_a_run_that_continues_the_previous_slot_extends_it():
    runs = [(10, 6)]  # pages 10..15, from an earlier slot
    bitmap_runs(_words({0, 1, 5}, 64), 16, runs)
    assert runs == [(10, 8), (21, 1)]


# The decoder skips all-zero chunks (32 KiB of bitmap, 262,144 pages) and lines
# (256 bytes, 2,048 pages) without reading their words: bits on each side of
# those boundaries, in the last partial line and chunk, and far apart in a
# 16 GiB slot's bitmap must all be found.
LINE_PAGES, CHUNK_PAGES = 256 * 8, 32 * 1024 * 8


@pytest.mark.parametrize("pages", [
    {LINE_PAGES - 1, LINE_PAGES}, {CHUNK_PAGES - 1}, {CHUNK_PAGES}, {CHUNK_PAGES - 1, CHUNK_PAGES},
    set(range(CHUNK_PAGES - 70, CHUNK_PAGES + 70)), {0, 3 * CHUNK_PAGES + 5 * LINE_PAGES + 17},
    {4 * CHUNK_PAGES + 3 * LINE_PAGES + 63},  # the last page of a bitmap that ends mid-chunk and mid-line
])
def test_bits_beside_skipped_chunks_and_lines_are_found(pages):
    nbits = 4 * CHUNK_PAGES + 3 * LINE_PAGES + 64
    runs: list[tuple[int, int]] = []
    assert bitmap_runs(_words(pages, nbits), 0, runs) == len(pages)
    assert _expand(runs) == sorted(pages)


def test_a_16_gib_slot_with_scattered_pages():
    rng = random.Random(11)
    nbits = (16 << 30) // 4096
    pages = {rng.randrange(nbits) for _ in range(300)} | set(range(5000, 5300)) | {nbits - 1}
    runs: list[tuple[int, int]] = []
    assert bitmap_runs(_words(pages, nbits), 7, runs) == len(pages)
    assert _expand(runs) == sorted(p + 7 for p in pages)


def test_a_bitmap_of_partial_words_is_refused():
    with pytest.raises(ValueError, match="whole u64 words"):
        dirty_log.bitmap_runs(bytearray(12), 0, [])


def test_a_mask_of_another_length_is_refused():
    with pytest.raises(ValueError, match="mask 8"):
        dirty_log.bitmap_runs(bytearray(16), 0, [], bytes(8), [])


def test_small_bitmaps_are_read_word_by_word_and_large_ones_skip_zeros():
    """Both paths give the same runs, on each side of SKIP_FROM."""
    rng = random.Random(3)
    for nbytes in (SKIP_FROM - 8, SKIP_FROM, SKIP_FROM + 8, 4 * SKIP_FROM):
        nbits = nbytes * 8
        pages = {rng.randrange(nbits) for _ in range(200)} | {nbits - 1}
        runs: list[tuple[int, int]] = []
        assert bitmap_runs(_words(pages, nbits), 0, runs) == len(pages)
        assert _expand(runs) == sorted(pages)


@pytest.mark.parametrize("nbits", [4096, SKIP_FROM * 8 - 64, 6 * SKIP_FROM * 8])
def test_a_mask_splits_the_runs_in_two(nbits):
    """Bits also set in the mask go to runs, the others to others (small and
    large bitmaps). A reset may copy or zero clean pages too, so runs may be
    joined, but only over one clear bit between two set bits of the same
    list, and others never holds a page set in the mask (it is zeroed: a
    data page must not be)."""
    rng = random.Random(nbits)
    for _ in range(20):
        pages = {rng.randrange(nbits) for _ in range(rng.randrange(400))} | set(range(100, 100 + rng.randrange(300)))
        pages |= set(range(3001, 3064, 2))  # every other page: joined
        mask = {rng.randrange(nbits) for _ in range(rng.randrange(2000))} | set(range(150, 250))
        inside: list[tuple[int, int]] = []
        outside: list[tuple[int, int]] = []
        assert bitmap_runs(_words(pages, nbits), 5, inside, _words(mask, nbits), outside) == len(pages)
        got_in = {p - 5 for p in _expand(inside)}
        got_out = {p - 5 for p in _expand(outside)}
        assert pages & mask <= got_in and pages - mask <= got_out
        assert not got_out & mask
        for got, written in ((got_in, pages & mask), (got_out, pages - mask)):
            for extra in got - pages:
                assert extra - 1 in written and extra + 1 in written, extra
        for runs in (inside, outside):
            assert all(a + n < b for (a, n), (b, _m) in zip(runs, runs[1:]))


def test_every_other_page_becomes_one_run_unless_a_data_page_is_between():
    pages = set(range(64, 192, 2))  # two words, every other page
    inside: list[tuple[int, int]] = []
    outside: list[tuple[int, int]] = []
    bitmap_runs(_words(pages, 256), 0, inside, _words(set(), 256), outside)
    assert inside == [] and outside == [(64, 127)]
    # Page 101 holds data in the zygote (mask) and was not written: never zeroed.
    outside = []
    bitmap_runs(_words(pages, 256), 0, inside, _words({101}, 256), outside)
    assert inside == [] and outside == [(64, 37), (102, 89)]
    # Data pages written every other page: copied back as one run too.
    inside, outside = [], []
    bitmap_runs(_words(pages, 256), 0, inside, _words(set(range(256)), 256), outside)
    assert inside == [(64, 127)] and outside == []
    # Without a mask the runs are exact (what take() and the inspector see).
    runs: list[tuple[int, int]] = []
    bitmap_runs(_words(pages, 256), 0, runs)
    assert _expand(runs) == sorted(pages)


@pytest.mark.parametrize("nruns", [1, dirty_log._FEW_RUNS, dirty_log._FEW_RUNS + 1, 300])
def test_runs_are_exact_with_few_runs_and_many(nruns):
    """Both ways of cutting runs off the int (one by one; by their edges,
    a byte at a time) give exactly the pages set, runs of any length."""
    rng = random.Random(nruns)
    pages, at = set(), rng.randrange(70)
    for _ in range(nruns):
        n = rng.choice([1, 2, 7, 8, 9, 63, 64, 65])
        pages |= set(range(at, at + n))
        at += n + rng.randrange(1, 40)
    nbits = (at + 64) // 64 * 64
    runs: list[tuple[int, int]] = []
    assert bitmap_runs(_words(pages, nbits), 3, runs) == len(pages)
    assert len(runs) == nruns and _expand(runs) == sorted(p + 3 for p in pages)
