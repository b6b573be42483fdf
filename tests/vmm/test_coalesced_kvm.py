"""Serial output through KVM's coalesced port-I/O ring: same console, fewer exits."""

from __future__ import annotations

import pytest

from vmm import kvm_abi as K
from vmm.kvm import Kvm
from vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


def _boot(image, coalesce: bool):
    # slide 0: the console mentions addresses; both boots must print the same text
    with Vm(image, VmConfig(memory=64 << 20, slide=0, timeout=60, coalesce_serial=coalesce)) as vm:
        return vm._ring, vm.run()


def test_console_is_the_same_with_fewer_exits(guest_image):
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            supported = vm.check_extension(K.KVM_CAP_COALESCED_PIO) > 0
        finally:
            vm.close()
    ring, coalesced = _boot(guest_image, True)
    _, plain = _boot(guest_image, False)
    assert plain.exit_code == coalesced.exit_code == 0
    # Every byte, in order, as with one exit per byte (TSC lines aside: timing differs).
    strip = lambda out: [ln for ln in out.decode().splitlines() if "tsc" not in ln and " us" not in ln and " ms" not in ln]  # noqa: E731
    assert strip(coalesced.serial) == strip(plain.serial)
    if not supported:
        assert ring is None
        pytest.skip("this host has no KVM_CAP_COALESCED_PIO: serial output exits per byte")
    assert ring is not None
    # The guest polls LSR once per 16-byte FIFO load: the THR writes between are buffered.
    assert coalesced.exits * 3 < plain.exits, (coalesced.exits, plain.exits)
    assert [r.kind for r in coalesced.reports] == [r.kind for r in plain.reports]
