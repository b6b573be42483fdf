"""Randomized kernel stacks and heap, task stack overflow (host side)."""

from __future__ import annotations

import pytest

from vmm.abi import INSPECT_BLOCK_SIZE, STACK_IN_USE, ExitCode, InspectBlockRaw, ReportKind

pytestmark = pytest.mark.kvm

STACKS_START = 0xFFFF_C800_0000_0000


def info(r):
    (i,) = r.reports_of(ReportKind.INFO)
    return i


def test_stack_and_heap_differ_across_boots(boot):
    a, b = boot("", fresh=True), boot("", fresh=True)  # boot-time randomness: cold boots
    assert a.exit_code == b.exit_code == 0
    ia, ib = info(a), info(b)
    for i in (ia, ib):
        assert i.get("entropy") in ("rdrand", "seed")
        assert i.get("entropy") == "seed" or i.get("rdrand") == "1"
        assert i.int("stack_base") >= STACKS_START
    # 8192 stack slots and 32736 heap positions: equal twice is ~1e-8.
    assert (ia.int("stack_base"), ia.int("heap_start")) != (ib.int("stack_base"), ib.int("heap_start"))


def test_seed_fallback_reported_and_random(boot):
    a, b = boot("rng=seed", fresh=True), boot("rng=seed", fresh=True)
    assert info(a).get("entropy") == info(b).get("entropy") == "seed"
    assert info(a).int("stack_base") != info(b).int("stack_base")


def test_task_stack_overflow_names_task_and_guard(vmm_boot):
    run = vmm_boot("scenario=stackoverflow")
    assert run.exit_code == ExitCode.STACK_OVERFLOW, run.describe()
    (f,) = run.reports_of(ReportKind.FAULT)
    assert f.get("kind") == "stack_overflow"
    assert f.int("task") != 0 and f.get("task_name") == "overflow"
    # The faulting address is in the low guard page of that task's stack,
    # which the inspect block still describes.
    (ins,) = run.reports_of(ReportKind.INSPECT)
    block = InspectBlockRaw.from_buffer_copy(run.read_phys(ins.int("inspect_block_phys"), INSPECT_BLOCK_SIZE))
    mine = [r for r in block.stacks if r.flags & STACK_IN_USE and r.task_id == f.int("task")]
    assert len(mine) == 1
    base, top, glow, ghigh = mine[0].base, mine[0].top, mine[0].guard_low, mine[0].guard_high
    assert glow <= f.int("addr") < glow + 4096 == base
    assert top - base == 64 << 10 and ghigh == top
    assert run.translate(glow) is None and run.translate(ghigh) is None


def test_wx_self_check_reported(boot):
    i = info(boot(""))
    assert i.get("wx_ok") == "1"
    assert i.int("wx_violations") == 0 and i.int("user_leaves") == 0
    assert i.int("cr0_wp") == 1 and i.int("efer_nxe") == 1
    assert i.int("wx_leaves") > 100
