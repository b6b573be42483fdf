"""The boot GDT, encoded once as integers.

The same integers are written to guest memory and decoded into the vCPU's
segment registers, so the two can never disagree (Firecracker's approach).
"""

from __future__ import annotations

import struct

from .kvm_abi import kvm_segment

KERNEL_CS = 0x08
KERNEL_DS = 0x10


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a legacy 8-byte segment descriptor (SDM Vol. 3A, 3.4.5).

    ``flags`` holds the access byte in bits 0..7 and G/DB/L/AVL in bits 12..15,
    the same packing the descriptor uses in its bits 40..55.
    """
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


# Access byte 0x9B: present, DPL 0, code/data, execute/read, accessed (set so
# the CPU never needs to write the descriptor). 0xA000: G=1, L=1 (64-bit).
CODE64 = gdt_entry(0xA09B, 0, 0xFFFFF)
# 0x93: present, DPL 0, read/write data, accessed. 0xC000: G=1, D/B=1.
DATA = gdt_entry(0xC093, 0, 0xFFFFF)

BOOT_GDT: tuple[int, ...] = (0, CODE64, DATA)


def gdt_bytes(entries: tuple[int, ...] = BOOT_GDT) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)


def segment_from_entry(selector: int, entry: int) -> kvm_segment:
    """Decode a descriptor into the kvm_segment the vCPU should hold."""
    base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000)
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    return kvm_segment(
        base=base,
        # KVM wants the byte-granular limit: with G=1 the 20-bit limit counts 4 KiB units.
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        s=(entry >> 44) & 1,
        dpl=(entry >> 45) & 3,
        present=(entry >> 47) & 1,
        avl=(entry >> 52) & 1,
        l=(entry >> 53) & 1,
        db=(entry >> 54) & 1,
        g=g,
    )
