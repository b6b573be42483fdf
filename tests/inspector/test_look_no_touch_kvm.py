"""Looking does not touch: no inspection entry point changes a byte of guest RAM.

Every entry point runs against a guest stopped at READY, with all of RAM
hashed before and after. The control at the end shows the hash would see a
change as small as the Accessed bit that KVM_TRANSLATE sets in a table entry
(shared/HOST.md), which is why nothing that observes a guest may use it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from vmm.inspector.control import ControlServer, RemoteTarget
from vmm.inspector.physical import physical_view
from vmm.inspector.snapshot import take_snapshot
from vmm.inspector.target import LocalTarget
from vmm.inspector.views import heap_view, inspect
from vmm.layout import PHYS_OFFSET

pytestmark = pytest.mark.kvm
RAM = 64 << 20
CHUNK = 4 << 20


def ram_hash(vm) -> str:
    h = hashlib.blake2b(digest_size=32)
    for off in range(0, vm.memory.size, CHUNK):
        h.update(vm.memory.read(off, min(CHUNK, vm.memory.size - off)))
    return h.hexdigest()


@pytest.fixture
def stopped_vm(vmm_ready):
    # Cold: the control server shares the VM's RAM memfd, and a fork's
    # copy-on-write RAM has no memfd of its own.
    return vmm_ready(memory=RAM, dirty_log=True, fresh=True)


def test_inspection_entry_points_leave_ram_unchanged(stopped_vm, tmp_path):
    vm = stopped_vm
    before = ram_hash(vm)
    local = LocalTarget(vm)
    snap = take_snapshot(local)
    view = inspect(snap, vm.memory)
    assert view.runs and view.physical is not None
    assert heap_view(snap, vm.memory) is not None
    assert physical_view(snap, vm.memory) is not None
    inspect(take_snapshot(local), vm.memory, previous=snap)  # a diff
    local.dirty_pages()
    assert ram_hash(vm) == before, "a local inspection changed guest RAM"

    path = str(tmp_path / "vm.sock")
    with ControlServer(vm, path):
        with RemoteTarget(path) as remote:
            rsnap = take_snapshot(remote)
            assert inspect(rsnap, remote.physmem).runs
            remote.dirty_pages()
        assert ram_hash(vm) == before, "an inspection over the control socket changed guest RAM"
        proc = subprocess.run(
            [sys.executable, "vmm.py", "pt", path, "--json"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["runs"]
        proc = subprocess.run(
            [sys.executable, "vmm.py", "pt", path, "--png", str(tmp_path / "ram.png")],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
    assert ram_hash(vm) == before, "`vmm pt` over the control socket changed guest RAM"


def test_the_hash_sees_what_kvm_translate_does(stopped_vm):
    """The control: KVM_TRANSLATE walks like the CPU and sets Accessed bits."""
    vm = stopped_vm
    before = ram_hash(vm)
    for offset in range(0, vm.memory.size, 2 << 20):  # every 2 MiB page of the direct map
        vm.vcpu.translate(PHYS_OFFSET + offset)
    assert ram_hash(vm) != before
