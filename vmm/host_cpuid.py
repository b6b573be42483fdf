"""The CPUID instruction, executed by this (host) process.

/proc/cpuinfo shows the hypervisor bit but not which hypervisor: that is the
signature in leaf 0x40000000 (EBX, ECX, EDX = 12 ASCII bytes, e.g.
"TCGTCGTCGTCG" for QEMU's TCG emulator, "KVMKVMKVM\\0\\0\\0" for KVM). Python
cannot execute CPUID, so a 27-byte System V AMD64 function is mapped
executable and called through ctypes:

    void cpuid(uint32_t leaf /*edi*/, uint32_t subleaf /*esi*/, uint32_t out[4] /*rdx*/)
"""

from __future__ import annotations

import ctypes
import functools
import mmap

_CODE = bytes.fromhex(
    "53"          # push rbx            (callee-saved; CPUID writes it)
    "4989d0"      # mov  r8, rdx        (CPUID overwrites rdx: keep the out pointer)
    "89f8"        # mov  eax, edi       leaf
    "89f1"        # mov  ecx, esi       subleaf
    "0fa2"        # cpuid
    "418900"      # mov  [r8], eax
    "41895804"    # mov  [r8+4], ebx
    "41894808"    # mov  [r8+8], ecx
    "4189500c"    # mov  [r8+12], edx
    "5b"          # pop  rbx
    "c3"          # ret
)

_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))


@functools.lru_cache(maxsize=1)
def _stub():
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return page, _PROTO(addr)


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID(leaf, subleaf) on the CPU this process runs on."""
    out = (ctypes.c_uint32 * 4)()
    _stub()[1](leaf, subleaf, ctypes.byref(out))
    return tuple(out)


def hypervisor_signature() -> str | None:
    """The 12-byte vendor signature of the hypervisor we run under, or None on bare metal."""
    if not cpuid(1)[2] & (1 << 31):  # CPUID.1:ECX[31], "hypervisor present"
        return None
    _, b, c, d = cpuid(0x4000_0000)
    raw = b"".join(x.to_bytes(4, "little") for x in (b, c, d))
    return raw.rstrip(b"\0").decode("ascii", "replace") or None
