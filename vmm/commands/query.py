"""``vmm translate``, ``vmm x``, ``vmm xp``, ``vmm regs``: one-shot queries.

Against a control socket (``vmm run --control SOCKET``) or, without one, a
guest booted here and stopped at its READY point. The answers come from
``vmm.inspector.queries`` (the gdb stub's ``monitor`` commands print the same
``text()``); this module only finds the target and renders rich tables or
JSON. The parsers are in ``query_options``.
"""

from __future__ import annotations

import contextlib
import json
import sys

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mm.flags import ADDR_MASK

from ..abi import ExitCode, ReportKind
from ..cpu import decode_bits
from ..devices import Stop
from ..inspector.control import RemoteTarget
from ..inspector.queries import Dump, QueryError, Registers, Walk, hexdump_phys, hexdump_virt, translate
from ..inspector.target import LocalTarget
from ..registers import GPRS, SEGMENTS, rflags_bits, segment_kind
from ..vm import Vm, VmConfig
from .common import kernel_image, memory_size

DEFAULT_LEN = 64


def _int(text: str) -> int | None:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        return None


def parse_words(command: str, words: list[str]) -> tuple[str | None, list[int]]:
    """(socket or None, numbers). The first word is a socket if it is not a number."""
    words = list(words)
    socket = None
    if words and _int(words[0]) is None:
        socket = words.pop(0)
    nums = []
    for w in words:
        v = _int(w)
        if v is None:
            raise QueryError(f"{w!r} is not a number (decimal or 0x-hex)")
        nums.append(v)
    want = {"translate": (1, 1), "x": (1, 2), "xp": (1, 2), "regs": (0, 0)}[command]
    if not want[0] <= len(nums) <= want[1]:
        usage = {"translate": "[SOCKET] VA", "x": "[SOCKET] VA [LEN]", "xp": "[SOCKET] PA [LEN]", "regs": "[SOCKET]"}
        raise QueryError(f"usage: vmm {command} {usage[command]}")
    return socket, nums


@contextlib.contextmanager
def open_target(socket: str | None, args):
    """The target to ask, with (registers, facts) read consistently.

    Yields ``(target, registers_dict_or_None)``; registers are the vCPU's own
    (from a paused vCPU when remote)."""
    if socket:
        with RemoteTarget(socket) as target:
            yield target, target.all_registers()
        return
    size = memory_size(args)
    image = kernel_image(args, quiet=True)

    def at_ready(report):
        return Stop(ExitCode.SUCCESS, "ready", "stopped at READY") if report.kind == ReportKind.READY else None

    with Vm(image, VmConfig(memory=size, cmdline=args.cmdline, timeout=60, slide=0 if args.no_kaslr else None), on_report=at_ready) as vm:
        result = vm.run()
        if result.stop_reason != "ready":
            raise QueryError(f"the guest stopped before its READY point: {result.message}")
        yield LocalTarget(vm), vm.register_dump()


def main(args) -> int:
    socket, nums = parse_words(args.command, args.words)
    with open_target(socket, args) as (target, regs):
        facts = target.facts()
        walk_kw = {"maxphyaddr": facts.maxphyaddr, "gbpages": facts.gbpages}
        if args.command == "regs":
            result = Registers(regs)
        elif args.command == "xp":
            result = hexdump_phys(target.physmem, facts.ram_size, nums[0], nums[1] if len(nums) > 1 else DEFAULT_LEN)
        elif args.command == "x":
            result = hexdump_virt(target.physmem, regs["cr3"], nums[0], nums[1] if len(nums) > 1 else DEFAULT_LEN, **walk_kw)
        else:
            result = translate(target.physmem, regs["cr3"], nums[0], **walk_kw)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    con = Console() if sys.stdout.isatty() else Console(width=120)
    con.print(render(result))
    return 0


def render(result):
    """A rich renderable for a query result."""
    if isinstance(result, Walk):
        t = Table(title=f"translate {result.virt:#018x} (CR3 {result.cr3:#x})", title_justify="left")
        for col in ("level", "index", "entry at", "entry", "flags", "points to", "in effect"):
            t.add_column(col, no_wrap=True, justify="right" if col == "index" else "left")
        for s in result.steps:
            target = "-" if s.target is None else (f"page {s.target:#x}" if s.leaf else f"table {s.target:#x}")
            t.add_row(s.name, str(s.index), f"{s.entry_addr:#x}", f"{s.raw:016x}", " ".join(s.flags) or "-", target,
                      s.effective)
        style = "bold green" if result.mapped else "bold red"
        return Group(t, Text(result.summary(), style=style))
    if isinstance(result, Dump):
        space = "virtual" if result.virtual else "physical"
        t = Table(title=f"{len(result.data)} bytes of {space} memory at {result.addr:#x}", title_justify="left")
        t.add_column("address", no_wrap=True)
        if result.virtual:
            t.add_column("physical", no_wrap=True)
        t.add_column("bytes", no_wrap=True)
        t.add_column("ascii", no_wrap=True)
        for addr, phys, chunk in result.lines():
            hexpart = " ".join(chunk[j : j + 8].hex(" ") for j in range(0, len(chunk), 8))
            ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
            row = [f"{addr:016x}"] + ([f"{phys:#x}"] if result.virtual else []) + [hexpart, ascii_]
            t.add_row(*row)
        return Group(t, Text(result.note, style="yellow")) if result.note else t
    if isinstance(result, Registers):
        return _registers_table(result)
    raise TypeError(result)


def _registers_table(result):
    v = result.values
    gpr = Table(title="general purpose", title_justify="left", show_header=False)
    for _ in range(4):
        gpr.add_column(no_wrap=True)
        gpr.add_column(no_wrap=True)
    for i in range(0, len(GPRS), 4):
        row = []
        for n in GPRS[i : i + 4]:
            row += [n, f"{v[n]:016x}"]
        gpr.add_row(*row)
    gpr.add_row("rip", f"{v['rip']:016x}", "rflags", f"{v['rflags']:08x}", " ".join(rflags_bits(v["rflags"])), "", "", "")
    parts = [gpr]
    if "cs_attr" in v:
        seg = Table(title="segments and descriptor tables", title_justify="left")
        for col in ("reg", "selector", "base", "limit", "attr", "kind"):
            seg.add_column(col, no_wrap=True)
        for n in SEGMENTS:
            seg.add_row(n, f"{v[n]:04x}", f"{v[n + '_base']:016x}", f"{v[n + '_limit']:08x}", f"{v[n + '_attr']:05x}",
                        segment_kind(v[n + "_attr"], n))
        seg.add_row("gdtr", "", f"{v['gdtr_base']:016x}", f"{v['gdtr_limit']:04x}", "", "")
        seg.add_row("idtr", "", f"{v['idtr_base']:016x}", f"{v['idtr_limit']:04x}", "", "")
        parts.append(seg)
    ctl = Table(title="control registers", title_justify="left")
    for col in ("reg", "value", "bits set"):
        ctl.add_column(col, no_wrap=col != "bits set")
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        if n not in v:
            continue
        bits = " ".join(decode_bits(n, v[n])) if n in ("cr0", "cr4", "efer") else ""
        if n == "cr3":
            bits = f"PML4 at {v[n] & ADDR_MASK:#x}" + (f", PCID {v[n] & 0xFFF}" if v[n] & 0xFFF else "")
        if n == "cr2":
            bits = "last page-fault address"
        ctl.add_row(n, f"{v[n]:016x}", bits)
    parts.append(ctl)
    return Group(*parts)
