"""The vCPU's whole register state as one flat dict, and its text form.

``capture(vcpu)`` reads KVM_GET_REGS and KVM_GET_SREGS once and flattens
them into ``{name: int}`` (JSON-friendly, the same keys everywhere: run
results, fault reports, ``vmm regs``, the gdb stub's ``monitor regs``).
``format_registers`` is the text every one of them prints.

Segment attributes are packed in the VMX "access rights" layout (SDM Vol. 3C,
24.4.1), the form Intel documents and QEMU's ``info registers`` prints:
bits 3:0 type, 4 S, 6:5 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 unusable.
"""

from __future__ import annotations

from .cpu import decode_bits

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

# RFLAGS (SDM Vol. 1, 3.4.3)
_RFLAGS = {0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF", 11: "OF",
           14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID"}


def pack_attr(seg) -> int:
    """kvm_segment's attribute fields -> VMX access-rights word."""
    return ((seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7
            | (seg.avl & 1) << 12 | (seg.l & 1) << 13 | (seg.db & 1) << 14 | (seg.g & 1) << 15
            | (seg.unusable & 1) << 16)


def capture(vcpu) -> dict[str, int]:
    """Every register KVM reports for this vCPU, flattened."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    out = {name: getattr(regs, name) for name, _ in regs._fields_}
    for name in CONTROL:
        out[name] = getattr(sregs, name)
    for name in SEGMENTS:
        seg = getattr(sregs, name)
        out[name] = seg.selector
        out[f"{name}_base"] = seg.base
        out[f"{name}_limit"] = seg.limit
        out[f"{name}_attr"] = pack_attr(seg)
    out["gdtr_base"], out["gdtr_limit"] = sregs.gdt.base, sregs.gdt.limit
    out["idtr_base"], out["idtr_limit"] = sregs.idt.base, sregs.idt.limit
    return out


def rflags_bits(value: int) -> list[str]:
    out = [name for bit, name in _RFLAGS.items() if value >> bit & 1]
    iopl = value >> 12 & 3
    if iopl:
        out.append(f"IOPL={iopl}")
    return out


def segment_kind(attr: int, name: str) -> str:
    """Short reading of an access-rights word: 'code64 DPL0', 'data DPL3', 'tss64-busy'..."""
    if attr >> 16 & 1 or not attr >> 7 & 1:
        return "unusable" if attr >> 16 & 1 else "not present"
    typ, dpl = attr & 0xF, attr >> 5 & 3
    if not attr >> 4 & 1:  # system segment (SDM Vol. 3A, table 3-2, IA-32e mode)
        system = {2: "ldt", 9: "tss64-avail", 11: "tss64-busy"}.get(typ, f"system type {typ}")
        return system
    if typ & 8:
        width = "64" if attr >> 13 & 1 else ("32" if attr >> 14 & 1 else "16")
        return f"code{width} DPL{dpl}"
    return f"data{'' if typ & 2 else ' ro'} DPL{dpl}"


def format_registers(regs: dict[str, int]) -> str:
    """Plain text, 100 columns at most: GPRs, RIP/RFLAGS, segments with base,
    limit and kind, descriptor tables, control registers with decoded bits."""
    lines = []
    for i in range(0, len(GPRS), 4):
        lines.append("  ".join(f"{n:>3}={regs[n]:016x}" for n in GPRS[i : i + 4]))
    lines.append(f"rip={regs['rip']:016x}  rflags={regs['rflags']:08x} [{' '.join(rflags_bits(regs['rflags']))}]")
    if "cs_base" in regs:
        for n in SEGMENTS:
            lines.append(
                f"{n:>3}={regs[n]:04x} base={regs[n + '_base']:016x} limit={regs[n + '_limit']:08x}"
                f" attr={regs[n + '_attr']:05x} {segment_kind(regs[n + '_attr'], n)}"
            )
        lines.append(
            f"gdtr={regs['gdtr_base']:016x}/{regs['gdtr_limit']:04x}  idtr={regs['idtr_base']:016x}/{regs['idtr_limit']:04x}"
        )
    lines.append("  ".join(f"{n}={regs[n]:016x}" for n in ("cr0", "cr2", "cr3", "cr4")))
    lines.append(f"efer={regs['efer']:x}" + (f"  cr8={regs['cr8']:x}" if "cr8" in regs else ""))
    lines.append(
        f"cr0[{' '.join(decode_bits('cr0', regs['cr0']))}] cr4[{' '.join(decode_bits('cr4', regs['cr4']))}]"
        f" efer[{' '.join(decode_bits('efer', regs['efer']))}]"
    )
    return "\n".join(lines)
