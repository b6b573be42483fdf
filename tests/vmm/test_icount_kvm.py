"""The instruction counter: single-stepping between two marker OUTs."""

import pytest

from tests.elfgen import icount_kernel
from vmm.elf import parse_kernel
from vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("nops", [0, 1, 25])
def test_counts_exactly_the_instructions_between_the_markers(nops):
    with Vm(parse_kernel(icount_kernel(nops).build()), VmConfig(memory=16 << 20, timeout=30)) as vm:
        result = vm.run()
    assert result.exit_code == 0, result.message
    assert result.instruction_counts == {7: nops + 1}  # the NOPs and the MOV before the stop OUT


def test_guest_hot_paths_are_counted(boot):
    r = boot("bench=icount")
    assert r.exit_code == 0, r.message
    names = {rep.get("icount_id"): rep.get("name") for rep in r.reports if rep.get("unit") == "instructions"}
    assert set(names) == {str(k) for k in r.instruction_counts}
    assert all(10 < n < 100_000 for n in r.instruction_counts.values()), r.instruction_counts
