"""Hostile or broken clients against `vmm run --gdb`: the host stays unharmed,
the guest's RAM untouched, and the stub keeps serving.

The guest is held before its first instruction (--gdb-wait), so its RAM
cannot change by itself: a hash of all of it through the control socket
before and after proves that nothing a client sent was written.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from vmm.gdbstub.commands import MAX_LENGTH
from vmm.gdbstub.packets import checksum, encode
from vmm.inspector.control import RemoteTarget
from vmm.layout import PHYS_OFFSET

from .harness import RspClient, VmmProcess

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def kernel(vmm_kernel_path):
    return vmm_kernel_path


def _ram_hash(control) -> str:
    with RemoteTarget(str(control)) as t:
        size = t._facts.ram_size
        h = hashlib.sha256()
        for off in range(0, size, 1 << 22):
            h.update(t.physmem.read(off, min(1 << 22, size - off)))
        return h.hexdigest()


def test_bad_packets_get_the_protocol_answers_and_touch_nothing(kernel, tmp_path):
    control = tmp_path / "vm.ctl"
    mem = 64 << 20
    with VmmProcess(kernel, f"unix:{tmp_path / 'vm.gdb'}", "--control", str(control), "--memory", "64M") as vmm:
        before = _ram_hash(control)
        c = RspClient(vmm.address)
        # bad checksum: '-' and nothing else; the stub then answers the retransmission
        c.raw(b"$g#00")
        assert c.next_event().__class__.__name__ == "Nack"
        # unknown packets: the empty reply
        assert c.ask(b"vMustReplyEmpty") == b""
        assert c.ask(b"qFooBar") == b""
        # malformed arguments: an error reply
        for bad in (b"mzz,4", b"m10", b"M10,2:abc", b"Z0,zz,1", b"p", b"X10,3:ab", b"qRcmd,7"):
            assert c.ask(bad).startswith(b"E"), bad
        # oversize length fields and oversize packets
        assert c.ask(b"m0,%x" % (MAX_LENGTH + 1)).startswith(b"E")
        assert c.ask(b"mffffffff80000000,ffffffffffffffff").startswith(b"E")
        big = b"M0,10:" + b"00" * 40000
        c.raw(b"$" + big + b"#%02x" % checksum(big))
        assert c.next_packet().startswith(b"E")
        # unmapped and non-canonical reads
        assert c.ask(b"m0,8").startswith(b"E")  # page 0 is not mapped
        assert c.ask(b"m800000000000,8").startswith(b"E")  # non-canonical
        assert c.ask(b"m%x,8" % (PHYS_OFFSET + mem)).startswith(b"E")  # just past the direct map of RAM
        # writes that would leave guest RAM: the last 4 bytes are mapped, the next 4 are not
        assert c.ask(b"M%x,8:0102030405060708" % (PHYS_OFFSET + mem - 4)).startswith(b"E")
        assert c.ask(b"X%x,4:abcd" % (PHYS_OFFSET + mem)).startswith(b"E")
        # a write to read-only kernel text is refused (no write-through)
        rip = c.ask(b"p10")
        assert c.ask(b"M%x,1:cc" % int.from_bytes(bytes.fromhex(rip.decode()), "little")).startswith(b"E")
        # still serving
        assert len(c.ask(b"g")) > 100
        assert _ram_hash(control) == before
        c.ask(b"D")
        c.close()
        assert vmm.wait() == 0, vmm.err


def test_second_client_is_refused_and_first_keeps_working(kernel):
    with VmmProcess(kernel, "127.0.0.1:0") as vmm:
        first = RspClient(vmm.address)
        assert first.ask(b"qSupported").startswith(b"PacketSize=")
        host, _, port = vmm.address.rpartition(":")
        second = socket.create_connection((host, int(port)), timeout=10)
        data = b""
        while True:
            chunk = second.recv(100)
            if not chunk:
                break
            data += chunk
        assert data == encode(b"E01")  # refused, then closed
        second.close()
        assert first.ask(b"?").startswith(b"T05")
        first.ask(b"D")
        first.close()
        assert vmm.wait() == 0
    assert "refused a second client" in vmm.err


def test_client_disconnecting_mid_packet_leaves_the_stub_serving(kernel):
    with VmmProcess(kernel, "127.0.0.1:0", "-c", "workload=mm workload_ms=3000", wait=False) as vmm:
        c = RspClient(vmm.address)
        assert c.ask(b"?").startswith(b"T")
        c.raw(b"$m0,")  # and gone
        c.close()
        time.sleep(0.3)
        again = RspClient(vmm.address)
        assert again.ask(b"?").startswith(b"T")
        again.ask(b"D")
        again.close()
        assert vmm.wait() == 0, vmm.err
    assert "mid-packet" in vmm.err
