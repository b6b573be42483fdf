from __future__ import annotations

import json

from rich.console import Console

from mm.audit import audit_all
from mm.memmap import MemoryMap, MemoryType
from mm.walker import walk
from tests.mm.test_audit import DIRECT, guest
from vmm.render import findings_table, findings_to_json, memmap_table, runs_table, runs_to_json
from vmm.units import hex_addr, human_size


def text(renderable) -> str:
    c = Console(width=200, record=True, file=open("/dev/null", "w"))
    c.print(renderable)
    return c.export_text()


def test_formatting_helpers():
    assert hex_addr(0xFFFF_8000_0000_0000) == "0xffff_8000_0000_0000"
    assert hex_addr(0x1000) == "0x0000_0000_0000_1000"
    assert human_size(4096) == "4 KiB" and human_size(3 << 29) == "1.5 GiB" and human_size(10) == "10 B"


def test_tables_render():
    m = guest()
    runs = list(walk(m.mem, m.root))
    out = text(runs_table(runs, labels=[(DIRECT, DIRECT + (1 << 30), "direct map")]))
    assert "0xffff_8000_0000_0000" in out and "direct map" in out and "1 GiB" in out
    out = text(findings_table(audit_all(m.mem, m.root)))
    assert "pt_alias_writable" in out
    mm = MemoryMap.from_ram(1 << 24)
    mm.carve(0, 4096, MemoryType.RESERVED)
    out = text(memmap_table(mm))
    assert "RESERVED" in out and "CONVENTIONAL" in out and "0x0000_0000_1000" in out


def test_json_helpers():
    m = guest()
    js = runs_to_json(walk(m.mem, m.root))
    assert js[0]["virt"] == DIRECT and "NO_EXECUTE" in js[0]["flag_names"]
    fj = findings_to_json(audit_all(m.mem, m.root))
    assert fj and {"kind", "severity", "virt", "size", "detail"} <= set(fj[0])
    json.dumps([js, fj])
