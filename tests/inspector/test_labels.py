"""Labels: runs split wherever the owner changes, owners from the guest's records."""

from hypothesis import given, settings, strategies as st

from mm.flags import PteFlags
from mm.walker import Run
from vmm.inspector.facts import GuestFacts, InspectReport
from vmm.inspector.inspect_block import InspectBlock, Stack
from vmm.inspector.labels import (CPL3_RAM_ALIAS, CPL3_STACK, DEMAND, DIRECT_MAP, FRAMEBUFFER, HEAP, SCRATCH, Labeler,
                                  label_ranges, stack_label)
from vmm.layout import PHYS_OFFSET

FLAGS = PteFlags.PRESENT | PteFlags.WRITABLE


def _run(virt, size, phys=0x1000, page=4096):
    return Run(virt, phys, size, FLAGS, page, 1)


def test_priority_and_gaps():
    lab = Labeler([(0x3000, 0x5000, "inner"), (0x1000, 0x8000, "outer")])
    assert [(lab.starts[i], lab.ends[i], lab.names[i]) for i in range(len(lab.names))] == [
        (0x1000, 0x3000, "outer"), (0x3000, 0x5000, "inner"), (0x5000, 0x8000, "outer")]
    assert lab.label_of(0x0FFF) == "" and lab.label_of(0x3000) == "inner" and lab.label_of(0x8000) == ""


def test_a_run_is_split_at_every_edge_with_phys_following():
    lab = Labeler([(0x3000, 0x5000, "inner"), (0x1000, 0x8000, "outer")])
    pieces = list(lab.split(_run(0x0, 0xA000, phys=0x100000)))
    assert [(r.virt, r.size, r.phys, n) for r, n in pieces] == [
        (0x0, 0x1000, 0x100000, ""),
        (0x1000, 0x2000, 0x101000, "outer"),
        (0x3000, 0x2000, 0x103000, "inner"),
        (0x5000, 0x3000, 0x105000, "outer"),
        (0x8000, 0x2000, 0x108000, ""),
    ]
    whole = _run(0x3000, 0x1000)
    assert list(lab.split(whole)) == [(whole, "inner")]  # not cut: the same object


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.sampled_from("abc")), max_size=6),
    st.integers(0, 80),
    st.integers(1, 40),
)
def test_split_agrees_page_by_page(ranges, start, pages):
    """Every page of every piece has the label a page-by-page lookup gives,
    the pieces tile the run, and neighbouring pieces differ in label."""
    ranges = [(a * 4096, (a + n) * 4096, name) for a, n, name in ranges]
    lab = Labeler(ranges)
    run = _run(start * 4096, pages * 4096, phys=0x40_0000)
    pieces = list(lab.split(run))
    assert pieces[0][0].virt == run.virt and sum(r.size for r, _ in pieces) == run.size
    for (a, na), (b, nb) in zip(pieces, pieces[1:]):
        assert a.virt + a.size == b.virt and na != nb
    for piece, name in pieces:
        assert piece.phys - run.phys == piece.virt - run.virt
        for page in range(piece.virt, piece.virt + piece.size, 4096):
            expect = next((n for lo, hi, n in ranges if lo <= page < hi), "")
            assert name == expect, (hex(page), name, expect)


def _facts(**block):
    fields = dict(heap_start=0, heap_end=0, heap_free_head=0, heap_free_bytes=0, heap_large_bytes=0, frames_free=0,
                  bitmap_phys=0, bitmap_bits=0, current_task=0, demand_start=0, demand_end=0, demand_faults=0,
                  heap_allocs=0, heap_frees=0, heap_cached_bytes=0, workload_iters=0, seq=2)
    fields.update(block)
    report = InspectReport.parse({"scratch_start": "0xffffd00000000000", "scratch_size": "0x80000000000",
                                  "demand_start": "0xffffd80000000000", "demand_size": "0x40000000"})
    return GuestFacts(
        ram_size=128 << 20, kaslr_slide=0, report=report,
        memmap=[{"type": "FRAMEBUFFER", "phys_start": 0x7E00000, "end": 0x7F2C000}],
        block=InspectBlock(**fields) if block else None,
    )


def test_framebuffer_pages_in_the_direct_map_are_labelled_framebuffer():
    lab = Labeler.for_facts(_facts())
    big = Run(PHYS_OFFSET + 0x7E00000, 0x7E00000, 0x200000, FLAGS, 2 << 20, 2)
    # 300 framebuffer pages, then ordinary RAM, in one 2 MiB page of the direct map.
    assert [(r.size, n) for r, n in lab.split(big)] == [(0x12C000, FRAMEBUFFER), (0xD4000, DIRECT_MAP)]


def test_regions_from_the_report_and_the_live_block():
    f = _facts()
    names = {n for _, _, n in label_ranges(f)}
    assert SCRATCH in names and DEMAND in names  # demand region from demand_size
    lab = Labeler.for_facts(f)
    assert lab.label_of(0xFFFF_D000_0000_0000 + 0x90_0000_0000) == SCRATCH  # workload=mm's pages
    assert lab.label_of(0xFFFF_D800_0000_0000 + (1 << 30) - 1) == DEMAND
    live = _facts(heap_start=0xFFFF_C000_0020_0000, heap_end=0xFFFF_C000_0021_0000,
                  demand_start=0xFFFF_D800_0000_0000, demand_end=0xFFFF_D800_0000_1000,
                  stacks=(Stack(7, 0xFFFF_C800_0000_1000, 0xFFFF_C800_0001_1000, 0xFFFF_C800_0000_0000,
                                0xFFFF_C800_0001_1000),))
    lab = Labeler.for_facts(live)
    assert lab.label_of(0xFFFF_C000_0020_F000) == HEAP and lab.label_of(0xFFFF_C000_0021_0000) == ""
    assert lab.label_of(0xFFFF_C800_0000_1000) == stack_label(7) and lab.label_of(0xFFFF_C800_0000_0000) == ""
    assert lab.label_of(0xFFFF_D800_0000_1000) == ""  # the live block's demand end wins


def test_a_cpl3_runs_stack_and_ram_alias_are_named_by_the_report():
    f = _facts()
    report = InspectReport.parse({**f.report.fields, "cpl3_ram_alias": "0xffffe00000000000",
                                  "cpl3_stack_start": "0x40000000", "cpl3_stack_size": "0x10000"})
    lab = Labeler.for_facts(GuestFacts(ram_size=f.ram_size, kaslr_slide=0, report=report, memmap=f.memmap))
    assert lab.label_of(0x4000_0000) == lab.label_of(0x4000_FFFF) == CPL3_STACK and lab.label_of(0x4001_0000) == ""
    assert lab.label_of(0xFFFF_E000_0000_0000 + (128 << 20) - 1) == CPL3_RAM_ALIAS
    assert lab.label_of(0xFFFF_E000_0000_0000 + (128 << 20)) == ""  # the alias is RAM-size long
