"""Parsers of ``vmm translate``, ``x``, ``xp``, ``regs`` (light: the parser is built from them)."""

from __future__ import annotations

from .options import add_guest_options

COMMANDS = ("translate", "x", "xp", "regs")


def add_parsers(sub) -> None:
    """Register the four commands on an argparse subparsers object."""
    where = ("With SOCKET, ask the VM served by `vmm run --control SOCKET` (it keeps running); without, "
             "boot the default guest, stop it at its READY point, answer, and shut it down.")
    specs = {
        "translate": ("walk the page tables for one virtual address, level by level",
                      "[SOCKET] VA", "Walk the guest's 4-level page tables for VA as the CPU would: each level's "
                      "table, index, entry and flags, and the permissions in effect (W and U ANDed over the levels, "
                      "NX ORed). Says \"not mapped at level N\" where the walk ends."),
        "x": ("hexdump guest-virtual memory (through the guest's page tables)", "[SOCKET] VA [LEN]",
              "Hexdump LEN bytes (default 64) at virtual address VA, translated through the guest's page tables "
              "page by page (each line shows its physical address); stops at the first unmapped page."),
        "xp": ("hexdump guest-physical memory", "[SOCKET] PA [LEN]",
               "Hexdump LEN bytes (default 64) of guest RAM at physical address PA."),
        "regs": ("all vCPU registers, descriptor tables, decoded CR0/CR4/EFER", "[SOCKET]",
                 "All registers of the vCPU: general purpose, RIP/RFLAGS, segments with base, limit and kind, "
                 "GDTR/IDTR/TR/LDTR, CR0/CR2/CR3/CR4/CR8 and EFER with their bits decoded."),
    }
    for name, (short, usage, desc) in specs.items():
        p = sub.add_parser(name, help=short, description=f"{desc} {where}", usage=f"vmm {name} {usage} [options]")
        p.add_argument("words", nargs="*" if name == "regs" else "+", metavar="ARG", help=usage)
        add_guest_options(p)
        p.add_argument("--cmdline", "-c", default="", metavar="TEXT", help="guest command line (when booting)")
        p.add_argument("--no-kaslr", action="store_true", help="when booting: load the kernel at its link address")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
