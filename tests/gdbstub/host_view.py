"""Run by gdb's `shell` while gdb holds the guest: the host's own view of
the same moment, through the control socket (KVM_GET_SREGS in the VMM, guest
RAM through the shared memfd and the project's walker), printed on one line:

    HOST cr3=0x... bytes=<hex of N bytes at VA>
"""

from __future__ import annotations

import sys

from mm.walker import read_virt
from vmm.inspector.control import RemoteTarget


def main(sock: str, va: int, n: int) -> None:
    with RemoteTarget(sock) as t, t.paused() as parked:
        regs = t.control_registers()
        data = read_virt(t.physmem, regs.root, va, n)
        print(f"HOST cr3={regs.cr3:#x} parked={parked} bytes={data.hex()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0))
