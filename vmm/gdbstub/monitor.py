"""``monitor ...`` in gdb (qRcmd): the inspector's views as the CLI prints them.

Each command renders with the same function the command line uses (the
inspector's ``Inspection.render``, ``vmm.render.memmap_table``, the shared
``vmm.inspector.lookup`` text), into plain text for gdb's console. The guest
is stopped while gdb holds it, so every view is of one consistent moment.
"""

from __future__ import annotations

import argparse
import io
import shlex

from rich.console import Console

from ..commands.filters import run_filter
from ..commands.options import add_filters
from ..inspector.lookup import MAX_DUMP, hexdump, translate_text
from ..inspector.snapshot import take_snapshot
from ..inspector.target import LocalTarget
from ..inspector.views import inspect
from ..registers import capture, format_registers
from ..render import memmap_table

HELP = """\
pyvmm monitor commands (the guest is stopped while they run):
  pt [filters]         page tables, effective flags, labels (filters as `vmm pt`: --writable
                       --executable --user --kernel-half --page-size 4K --range A:B --label TEXT --all)
  heap                 the guest heap's free list
  frames               physical frames by region (the frame bitmap against the tables)
  memmap               the guest's memory map
  audit                W+X, user pages in the kernel half, guard pages, table aliases
  slide                the KASLR slide, and the symbol-file line that applies it
  translate VA         the walk of VA: each level's entry and flags, the physical address
  xp PA [LEN]          guest-physical memory, hex and ASCII (LEN default 64, at most 64 KiB)
  regs                 every register, with GDTR, IDTR, TR and decoded control bits
  write-through on|off gdb writes ignore read-only pages (default off: a write to a page the
                       guest cannot write fails)
"""


class MonitorError(ValueError):
    pass


def _text(renderable, width: int = 160) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False).print(renderable)
    return buf.getvalue()


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        try:
            return int(text, 16)
        except ValueError:
            raise MonitorError(f"bad {what}: {text!r}") from None


def _inspection(dbg, flt=None):
    target = LocalTarget(dbg.vm)
    snap = take_snapshot(target)
    return inspect(snap, target.physmem, flt=flt)


def _pt(dbg, args: list[str]) -> str:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise MonitorError(message)

    p = _Parser(prog="monitor pt", add_help=False)
    add_filters(p)
    p.add_argument("--all", action="store_true")
    ns = p.parse_args(args)
    view = _inspection(dbg, run_filter(ns))
    return _text(view.render(max_rows=len(view.runs) if ns.all else 200))


def _regs(dbg) -> str:
    """The same text as `vmm regs` and fault reports (vmm.registers)."""
    return format_registers(capture(dbg.vm.vcpu)) + "\n"


def run_monitor(dbg, command: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return f"monitor: {exc}"
    if not words or words[0] in ("help", "?"):
        return HELP
    cmd, args = words[0], words[1:]
    try:
        return _dispatch(dbg, cmd, args)
    except MonitorError as exc:
        return f"monitor {cmd}: {exc}"


def _dispatch(dbg, cmd: str, args: list[str]) -> str:
    vm = dbg.vm
    if cmd == "pt":
        return _pt(dbg, args)
    if cmd == "heap":
        view = _inspection(dbg)
        return _text(view._heap_text()) if view.heap is not None else "the guest reported no heap\n"
    if cmd == "frames":
        view = _inspection(dbg)
        return _text(view._physical_table()) if view.physical is not None else "the guest reported no frame bitmap\n"
    if cmd == "audit":
        return _text(_inspection(dbg)._findings_table())
    if cmd == "memmap":
        return _text(memmap_table(vm.layout.memmap))
    if cmd == "slide":
        kernel = getattr(vm.image, "path", "KERNEL")
        return (f"KASLR slide {vm.slide:#x} (gdb applied it from qOffsets)\n"
                f"by hand: symbol-file -o {vm.slide:#x} {kernel}\n")
    if cmd == "translate":
        if len(args) != 1:
            raise MonitorError("usage: monitor translate VA")
        regs = dbg.registers()
        return translate_text(vm.memory, regs["cr3"], _number(args[0], "address"),
                              nxe=bool(regs["efer"] & (1 << 11)))
    if cmd == "xp":
        if not 1 <= len(args) <= 2:
            raise MonitorError("usage: monitor xp PA [LEN]")
        pa = _number(args[0], "address")
        n = _number(args[1], "length") if len(args) > 1 else 64
        if not 0 < n <= MAX_DUMP:
            raise MonitorError(f"length must be 1..{MAX_DUMP}")
        if not vm.memory.contains(pa, n):
            raise MonitorError(f"[{pa:#x}, {pa + n:#x}) is not inside guest RAM [0, {vm.memory.size:#x})")
        return hexdump(vm.memory.read(pa, n), pa)
    if cmd == "regs":
        return _regs(dbg)
    if cmd == "write-through":
        if args == ["on"]:
            dbg.write_through = True
        elif args == ["off"]:
            dbg.write_through = False
        elif args:
            raise MonitorError("usage: monitor write-through on|off")
        return f"write-through is {'on: gdb writes ignore read-only pages' if dbg.write_through else 'off'}\n"
    raise MonitorError(f"unknown command (monitor help lists them)")
