"""The slid page-table template equals what the mapper builds for that slide."""

import random

import pytest


from mm import BufferMemory
from mm.walker import walk_arrays
from tests.elfgen import simple_kernel
from vmm.boot import KASLR_ALIGN, _slid_pool, boot_plan, build_page_tables, slide_range
from vmm.boot_plan import build_pool
from vmm.elf import parse_kernel
from vmm.layout import PT_POOL_START
from vmm.memory import GuestMemory


def _runs(buf: bytes, root: int, ram: int):
    mem = bytearray(PT_POOL_START) + bytearray(buf)
    mem += bytearray(max(0, (1 << 20) - len(mem)))
    runs = walk_arrays(BufferMemory(mem), root)
    return [tuple(int(x) for x in row) for row in zip(runs.virt, runs.phys, runs.size, runs.flags, runs.page_size)]


@pytest.fixture(scope="module")
def image():
    img = parse_kernel(simple_kernel().build())
    img.elf_type = 3  # pretend relocatable: slides are allowed
    return img


def test_template_matches_mapper_for_random_slides(image):
    ram = 64 << 20
    rng = random.Random(5)
    n = slide_range(image)
    slides = {0, KASLR_ALIGN, (n - 1) * KASLR_ALIGN, 511 * KASLR_ALIGN, 512 * KASLR_ALIGN}
    slides |= {rng.randrange(n) * KASLR_ALIGN for _ in range(40)}
    for slide in sorted(slides):
        with GuestMemory(ram) as mem:
            tables = build_page_tables(mem, image, slide, use_1g=False)
            fast = mem.read(PT_POOL_START, tables.pool_end - PT_POOL_START)
        scratch, root, _, end = build_pool(ram, image, slide, False)
        assert tables.cr3 == root
        assert _runs(fast, root, ram) == _runs(bytes(scratch[: end - PT_POOL_START]), root, ram), hex(slide)
        assert fast == bytes(scratch[: end - PT_POOL_START]), hex(slide)  # byte for byte, even


def test_the_template_path_is_taken(image, guest_image):
    for img in (image, guest_image):
        assert boot_plan(img, 128 << 20, False).tables is not None


@pytest.fixture(scope="module")
def big_image():
    """Spans two PD entries: some slides put it across a 1 GiB boundary."""
    elf = simple_kernel()
    elf.segments[-1].memsz = 3 << 20
    img = parse_kernel(elf.build())
    img.elf_type = 3
    return img


@pytest.mark.parametrize("use_1g", [False, True])
def test_a_straddling_slide_falls_back_to_the_mapper_with_the_same_bytes(big_image, use_1g):
    ram = 64 << 20
    t = boot_plan(big_image, ram, use_1g).tables
    assert t is not None and t.size == 4 << 20  # two PD entries
    assert [shift for _, shift in t.tables] == [30, 21]  # the kernel's PDPT, then its PD
    straddling = 511 * KASLR_ALIGN  # base at -1 GiB - 2 MiB: its second PD entry is in the next PD
    assert _slid_pool(t, straddling) is None and _slid_pool(t, 510 * KASLR_ALIGN) is not None
    assert _slid_pool(t, KASLR_ALIGN // 2) is None  # a slide that would change the PTs
    for slide in (0, 510 * KASLR_ALIGN, straddling, 600 * KASLR_ALIGN):
        with GuestMemory(ram) as mem:
            tables = build_page_tables(mem, big_image, slide, use_1g=use_1g)
            fast = mem.read(PT_POOL_START, tables.pool_end - PT_POOL_START)
        scratch, root, _, end = build_pool(ram, big_image, slide, use_1g)
        assert tables.cr3 == root and fast == bytes(scratch[: end - PT_POOL_START]), hex(slide)
