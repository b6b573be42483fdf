"""What a kernel developer needs when the guest stops badly: the code around
the faulting instruction and how the kernel got there.

``diagnose`` reads guest memory through the guest's own page tables (after
the stop, so nothing races) and gives a ``Diagnosis``:

* the instructions around RIP, disassembled with capstone, each with
  ``symbol+offset``. x86 instructions have no fixed length, so decoding
  backwards from RIP is guesswork; instead we decode forwards from the start
  of RIP's function (the symbol table says where it starts) and keep the
  last few before RIP. Without a symbol we show RIP onwards only.
* a backtrace along the frame-pointer chain. The guest is built with
  ``-C force-frame-pointers=yes``: every function starts ``push rbp; mov
  rbp, rsp``, so ``[rbp]`` is the caller's RBP and ``[rbp+8]`` the return
  address. The walk stops at RBP 0, a misaligned or unmapped RBP, or a chain
  that does not move up the stack: the guest's memory is never trusted.

Not on any hot path: it runs once, after an abnormal stop.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .abi import ExitCode

# Stops that need no register dump or disassembly: success, READY (exit code
# 0), and those the user asked for.
QUIET_STOPS = frozenset({ExitCode.SUCCESS, ExitCode.INTERRUPTED, ExitCode.BROKEN_PIPE, ExitCode.TERMINATED})

Reader = Callable[[int, int], "bytes | None"]

MAX_FRAMES = 256  # deep recursion (a stack overflow) still reaches its bottom frames
INSNS_BEFORE = 4
INSNS_AFTER = 4
_MAX_FUNCTION_PREFIX = 16 << 10  # decode at most this much of a function before RIP


@dataclass(frozen=True)
class Insn:
    addr: int
    symbol: str | None
    raw: bytes
    text: str
    current: bool

    def to_json(self) -> dict:
        return {"addr": self.addr, "symbol": self.symbol, "bytes": self.raw.hex(), "text": self.text, "current": self.current}


@dataclass(frozen=True)
class Frame:
    addr: int  # RIP of the faulting frame, then return addresses
    symbol: str | None

    def to_json(self) -> dict:
        return {"addr": self.addr, "symbol": self.symbol}


@dataclass
class Diagnosis:
    rip: int
    disassembly: list[Insn] = field(default_factory=list)
    backtrace: list[Frame] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "rip": self.rip,
            "disassembly": [i.to_json() for i in self.disassembly],
            "backtrace": [f.to_json() for f in self.backtrace],
            "notes": list(self.notes),
        }

    def render(self) -> str:
        lines = []
        if self.disassembly:
            lines.append("code:")
            width = max(len(i.raw) for i in self.disassembly) * 3
            symw = max(len(i.symbol) + 3 if i.symbol else 0 for i in self.disassembly)
            for i in self.disassembly:
                mark = "=>" if i.current else "  "
                where = f" <{i.symbol}>" if i.symbol else ""
                lines.append(f"  {mark} {i.addr:016x}{where:<{symw}}  {i.raw.hex(' '):<{width}} {i.text}")
        if self.backtrace:
            lines.append("backtrace (frame pointers):")
            n = 0
            while n < len(self.backtrace):
                f = self.backtrace[n]
                same = 1
                while n + same < len(self.backtrace) and self.backtrace[n + same].addr == f.addr:
                    same += 1
                lines.append(f"  #{n:<2} {f.addr:016x} {f.symbol or '?'}")
                if same > 2:  # recursion: one line for the repeats
                    lines.append(f"  ... the same frame {same - 1} more times (#{n + 1}-#{n + same - 1})")
                    n += same
                else:
                    n += 1
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def guest_reader(physmem, cr3: int) -> Reader:
    """Read guest-virtual memory through the tables rooted at CR3 (None where unmapped)."""
    from mm.errors import MMError
    from mm.flags import ADDR_MASK
    from mm.walker import read_virt

    root = cr3 & ADDR_MASK  # CR3 holds the root table's frame in bits 51:12, as an entry does

    def read(virt: int, n: int) -> bytes | None:
        try:
            return read_virt(physmem, root, virt, n)
        except (MMError, ValueError, OSError):
            return None

    return read


def _read_upto(read: Reader, virt: int, n: int) -> bytes | None:
    """As much of [virt, virt+n) as is mapped from virt on (stops at the first unmapped page)."""
    data = read(virt, n)
    if data is not None:
        return data
    page_end = (virt | 0xFFF) + 1
    return read(virt, page_end - virt) if page_end - virt < n else None


def disassemble(read: Reader, rip: int, symbolizer=None, before: int = INSNS_BEFORE, after: int = INSNS_AFTER) -> tuple[list[Insn], list[str]]:
    try:
        import capstone
    except ImportError:
        return [], ["capstone is not installed (pip install capstone): no disassembly"]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    notes: list[str] = []
    start = rip
    hit = symbolizer.resolve(rip) if symbolizer is not None else None
    if hit is not None and 0 < hit[1] <= _MAX_FUNCTION_PREFIX:
        start = hit[2]
    tail = 16 * (after + 1)
    code = _read_upto(read, start, rip - start + tail)
    if code is None and start != rip:
        start, code = rip, _read_upto(read, rip, tail)
    if code is None:
        return [], [f"the code at RIP {rip:#x} is not mapped"]
    decoded = list(md.disasm_lite(code, start))
    idx = next((k for k, (a, *_rest) in enumerate(decoded) if a == rip), None)
    if idx is None and start != rip:
        # RIP is not on an instruction boundary of a decode from the function's
        # start (data in code, or a corrupt RIP): decode from RIP itself.
        notes.append(f"RIP {rip:#x} is not an instruction boundary from {start:#x}; decoding from RIP")
        decoded, idx = list(md.disasm_lite(code[rip - start :], rip)), 0
    if not decoded or idx is None:
        return [], notes + [f"no instruction decodes at RIP {rip:#x}"]
    out = []
    for addr, size, mnemonic, ops in decoded[max(0, idx - before) : idx + after + 1]:
        raw = code[addr - start : addr - start + size]
        sym = symbolizer.lookup(addr) if symbolizer is not None else None
        text = f"{mnemonic} {ops}".strip()
        if symbolizer is not None and (mnemonic == "call" or mnemonic.startswith("j")) and ops.startswith("0x"):
            target = symbolizer.lookup(int(ops, 16))  # a direct call/jump: name its target
            if target:
                text += f" <{target}>"
        out.append(Insn(addr, sym, bytes(raw), text, addr == rip))
    return out, notes


def backtrace(read: Reader, rip: int, rbp: int, symbolizer=None, limit: int = MAX_FRAMES) -> tuple[list[Frame], list[str]]:
    look = symbolizer.lookup if symbolizer is not None else (lambda a: None)

    def look_return(addr: int) -> str | None:
        # A return address follows its call; when the call ends a function
        # (a call to a function that never returns), it points past that
        # function's end. Resolve the call's last byte instead, as gdb does.
        hit = symbolizer.resolve(addr - 1) if symbolizer is not None else None
        return None if hit is None else f"{hit[0]}+{hit[1] + 1:#x}"

    frames = [Frame(rip, look(rip))]
    notes: list[str] = []
    while len(frames) < limit:
        if rbp == 0:
            break  # the outermost frame (the entry code clears RBP)
        if rbp & 7:
            notes.append(f"backtrace stops: RBP {rbp:#x} is not 8-byte aligned")
            break
        data = read(rbp, 16)
        if data is None:
            notes.append(f"backtrace stops: RBP {rbp:#x} is not mapped")
            break
        caller_rbp, ret = struct.unpack("<QQ", data)
        if ret == 0:
            break
        frames.append(Frame(ret, look_return(ret)))
        if caller_rbp != 0 and caller_rbp <= rbp:
            notes.append(f"backtrace stops: the chain does not move up the stack ({rbp:#x} -> {caller_rbp:#x})")
            break
        rbp = caller_rbp
    else:
        notes.append(f"backtrace cut at {limit} frames")
    return frames, notes


def diagnose(read: Reader, rip: int, rbp: int | None, symbolizer=None) -> Diagnosis:
    """Disassembly around RIP and, when RBP is known, the frame-pointer backtrace."""
    d = Diagnosis(rip)
    d.disassembly, notes = disassemble(read, rip, symbolizer)
    d.notes += notes
    if rbp is not None:
        d.backtrace, notes = backtrace(read, rip, rbp, symbolizer)
        d.notes += notes
    return d


def stop_report(result) -> list[str]:
    """The lines ``vmm run`` prints on stderr when a guest stops (a RunResult):
    the stop message always; for an abnormal stop the registers, the code
    around RIP and the backtrace; for a guest FAULT report its summary, code
    and backtrace. ``-q`` never hides these (only the console and banner)."""
    from .registers import format_registers

    out = [f"vmm: {result.message} (exit code {result.exit_code}, {result.timings_ms['run']:.1f} ms, {result.exits} exits)"]
    out += [f"vmm: bad report: {err}" for err in result.report_errors[:5]]
    fault = result.fault
    if fault is not None:
        task = fault.get("task_name") or fault.get("task")
        out.append(
            f"vmm: guest fault ({fault.get('kind', '?')}): {fault.get('name') or ''} at {fault.get('rip_symbol') or fault.get('rip')}"
            f", address {fault.get('addr', '?')}, error {fault.get('error', '?')} ({fault.get('error_bits', '')})"
            + (f", task {task}" if "task" in fault else "")
        )
    if result.registers is not None and result.exit_code not in QUIET_STOPS:
        out.append(f"  RIP: {result.rip_symbol}")
        out += ["  " + line for line in format_registers(result.registers).splitlines()]
    if result.diagnosis is not None:
        out += ["  " + line for line in result.diagnosis.render().splitlines()]
    return out
