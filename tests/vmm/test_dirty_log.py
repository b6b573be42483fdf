"""Decoding KVM's dirty bitmap into runs of pages (no KVM needed)."""

import ctypes as C
import random

import pytest

from vmm.dirty_log import bitmap_runs


def _words(pages: set[int], nbits: int):
    bitmap = (C.c_uint64 * ((nbits + 63) // 64))()
    for p in pages:
        bitmap[p // 64] |= 1 << (p % 64)
    return memoryview(bitmap).cast("B").cast("Q")


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
