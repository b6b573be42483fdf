"""A running guest's heap copied whole while it is held (vmm/inspector/heap_copy.py):
the walk of the copy, made after the guest runs again, equals the walk of
guest memory made while it was still held; and snapshots of a guest whose
free list changes all the time take their heap from one hold's copy."""

import time

import pytest

from mm.walker import walk_arrays
from vmm.inspector.heap import RunTranslator
from vmm.inspector.heap_copy import HeapCopier
from vmm.inspector.snapshot import Snapshotter, read_block
from vmm.inspector.target import LocalTarget
from vmm.inspector.tlsf import walk_heap_any

from tests.inspector.test_consistency_kvm import _HOST_EMULATED, consistency_problems
from tests.watching import run_watched, snapshots_while_running

pytestmark = pytest.mark.kvm


def _same(a, b) -> bool:
    return (a.allocator == b.allocator and a.blocks == b.blocks and a.used_blocks == b.used_blocks
            and [f.kind for f in a.findings] == [f.kind for f in b.findings])


@_HOST_EMULATED
@pytest.mark.parametrize("cmdline", ["workload=mm workload_ms=2500",
                                     "workload=compute frag_blocks=1024 allocator=list workload_ms=2500"])
def test_the_walk_of_a_held_copy_equals_the_walk_of_guest_memory_at_that_moment(vmm_vm, cmdline):
    vm = vmm_vm(cmdline, timeout=60)
    target = LocalTarget(vm)
    seen = {"compared": 0, "differ": [], "heaps": set()}

    def watch():
        while not vm.running:
            time.sleep(0.001)
        while vm.running and seen["compared"] < 8:
            time.sleep(0.02)
            facts = target.facts()
            with target.paused() as parked:
                if not parked:
                    return
                block = read_block(vm.memory, facts, parked=True)
                if block is not None and block.busy and facts.report.quiet_hook:
                    # workload=mm is inside a section most of the time: to its end first.
                    if target.run_to(facts.report.quiet_hook, 0.5):
                        block = read_block(vm.memory, facts, parked=True)
                if block is None or block.busy or not block.heap_start:
                    continue
                live = facts.with_block(block)
                regs = target.control_registers()
                runs = walk_arrays(vm.memory, regs.root, maxphyaddr=facts.maxphyaddr, gbpages=facts.gbpages)
                copier = HeapCopier.plan(vm.memory, runs, *live.heap, block.heap_index, {})
                if copier is None:
                    continue
                pages = copier.copy()
                tr = RunTranslator(runs)
                held = walk_heap_any(vm.memory, tr, *live.heap, live.heap_free_head, block.heap_index)
            # The guest runs again (and changes its heap); the copy does not.
            walked = walk_heap_any(pages, tr, *live.heap, live.heap_free_head, block.heap_index)
            seen["compared"] += 1
            seen["heaps"].add((live.heap_free_head, tuple(held.blocks[:8])))
            if not _same(walked, held) or held.findings:
                seen["differ"].append((held.blocks[:4], walked.blocks[:4], held.findings, walked.findings))

    result = run_watched(vm, watch)
    assert result.exit_code == 0, result.message
    assert seen["compared"] >= 5, seen
    assert not seen["differ"], seen["differ"][:2]


@_HOST_EMULATED
def test_snapshots_of_a_changing_free_list_take_the_heap_from_one_hold(vmm_vm):
    # allocator=list: every iteration of the workload changes the free list's
    # head (1,024 free blocks: 81 heap pages, copied whole in every hold).
    vm = vmm_vm("workload=compute frag_blocks=1024 allocator=list workload_ms=2500", timeout=60)
    snapper = Snapshotter(LocalTarget(vm))
    seen = {"checked": 0, "copied": 0, "problems": []}

    def watch():
        for snap in snapshots_while_running(vm, snapper, seen["problems"]):
            if not snap.parked or snap.block is None or not snap.block.heap_start or snap.busy:
                continue
            seen["checked"] += 1
            seen["copied"] += snap.heap_copied
            if snap.heap_copied:
                assert snap.heap.head == snap.block.heap_free_head
                assert (snap.heap.heap_start, snap.heap.heap_end) == (snap.block.heap_start, snap.block.heap_end)
            # All of it: the fragmented heap is built at CPL3, whose alias of all
            # RAM maps free frames as the direct map does (no finding).
            seen["problems"] += consistency_problems(snap, vm.memory)
            time.sleep(0.02)

    result = run_watched(vm, watch)
    assert result.exit_code == 0, result.message
    assert seen["checked"] >= 10, seen
    assert seen["copied"] >= seen["checked"] // 2, seen
    assert not seen["problems"], seen["problems"][:5]
