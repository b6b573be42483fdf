"""The register file gdb sees: a target description and its ``g``/``p`` codec.

gdb numbers registers in the order the target description lists them, and a
``g`` reply is their values concatenated, little-endian, in hex. The
``org.gnu.gdb.i386.core`` feature must hold the general registers, rip,
eflags, the six selectors and the x87 registers, in gdb's order, or gdb
rejects the description (i386_validate_tdesc_p). We cannot show x87 state
(the guest runs without it) and send those as ``xx`` (unavailable).
``org.gnu.gdb.i386.segments`` adds fs_base/gs_base; control registers and
EFER go in a feature of our own in the "system" group, as QEMU does, so
``info registers cr3`` and tools like gdb-pt-dump and pwndbg find them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Register", "REGISTERS", "BY_NAME", "WRITABLE", "target_xml", "encode_all", "encode_one", "decode_all",
           "decode_one", "PC_REGNUM"]


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bits // 8


_CORE = "org.gnu.gdb.i386.core"
_SEGMENTS = "org.gnu.gdb.i386.segments"
_SYSTEM = "org.pyvmm.x86.system"


def _core() -> list[Register]:
    regs = [Register(n, 64, "int64", _CORE) for n in "rax rbx rcx rdx rsi rdi".split()]
    regs += [Register("rbp", 64, "data_ptr", _CORE), Register("rsp", 64, "data_ptr", _CORE)]
    regs += [Register(f"r{i}", 64, "int64", _CORE) for i in range(8, 16)]
    regs += [Register("rip", 64, "code_ptr", _CORE), Register("eflags", 32, "i386_eflags", _CORE)]
    regs += [Register(n, 32, "int32", _CORE) for n in "cs ss ds es fs gs".split()]
    regs += [Register(f"st{i}", 80, "i387_ext", _CORE, "float") for i in range(8)]
    regs += [Register(n, 32, "int", _CORE, "float") for n in "fctrl fstat ftag fiseg fioff foseg fooff fop".split()]
    return regs


REGISTERS: tuple[Register, ...] = tuple(
    _core()
    + [Register("fs_base", 64, "int", _SEGMENTS), Register("gs_base", 64, "int", _SEGMENTS)]
    + [Register(n, 64, "int", _SYSTEM, "system") for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
)
BY_NAME = {r.name: i for i, r in enumerate(REGISTERS)}
PC_REGNUM = BY_NAME["rip"]
#: What G/P may change. Selectors would need their descriptors reloaded and
#: x87 state is not ours to show; both are refused.
WRITABLE = frozenset(
    "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip eflags fs_base gs_base "
    "cr0 cr2 cr3 cr4 cr8 efer".split()
)

# gdb's own eflags flags type (features/i386/64bit-core.xml).
_EFLAGS_TYPE = """  <flags id="i386_eflags" size="4">
    <field name="" start="22" end="31"/>
    <field name="CF" start="0" end="0"/>
    <field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/>
    <field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/>
    <field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/>
    <field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/>
    <field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/>
    <field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/>
    <field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/>
    <field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>
"""


def target_xml() -> str:
    """The whole description in one document (annex ``target.xml``)."""
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
           "  <architecture>i386:x86-64</architecture>"]
    feature = None
    for i, r in enumerate(REGISTERS):
        if r.feature != feature:
            if feature is not None:
                out.append("</feature>")
            feature = r.feature
            out.append(f'<feature name="{feature}">')
            if feature == _CORE:
                out.append(_EFLAGS_TYPE.rstrip("\n"))
        group = f' group="{r.group}"' if r.group else ""
        out.append(f'  <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{i}"{group}/>')
    out += ["</feature>", "</target>"]
    return "\n".join(out) + "\n"


def encode_one(number: int, values: dict[str, int]) -> bytes:
    """Hex of one register, ``xx...`` if its value is unknown."""
    r = REGISTERS[number]
    v = values.get(r.name)
    if v is None:
        return b"xx" * r.size
    return (v & ((1 << r.bits) - 1)).to_bytes(r.size, "little").hex().encode()


def encode_all(values: dict[str, int]) -> bytes:
    return b"".join(encode_one(i, values) for i in range(len(REGISTERS)))


def decode_one(number: int, raw: bytes) -> int:
    r = REGISTERS[number]
    if len(raw) != r.size:
        raise ValueError(f"register {r.name} takes {r.size} bytes, got {len(raw)}")
    return int.from_bytes(raw, "little")


def decode_all(raw: bytes) -> dict[str, int]:
    """Values of a ``G`` packet (binary, already un-hexed), by name; a short
    packet sets the leading registers only, as gdb allows."""
    out: dict[str, int] = {}
    pos = 0
    for r in REGISTERS:
        if pos + r.size > len(raw):
            break
        out[r.name] = int.from_bytes(raw[pos : pos + r.size], "little")
        pos += r.size
    return out
