"""guest/src/abi.rs and vmm/abi.py agree (the ABI is defined once per side).

Pure: reads the Rust source as text; no toolchain or KVM needed. The guest
pins its own struct sizes and offsets at compile time; this checks that the
two sides also agree on field order and on every shared constant.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmm import abi

ABI_RS = Path(__file__).resolve().parents[2] / "guest" / "src" / "abi.rs"


@pytest.fixture(scope="module")
def source() -> str:
    return ABI_RS.read_text()


def rust_int(text: str) -> int:
    text = text.replace("_", "").strip()
    m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)(?:\s*<<\s*(\d+))?", text)
    assert m, f"cannot evaluate {text!r}"
    value = int(m.group(1), 0)
    return value << int(m.group(2)) if m.group(2) else value


def consts(block: str) -> dict[str, int]:
    found = {}
    for name, value in re.findall(r"pub const (\w+): \w+ = ([^;]+);", block):
        try:
            found[name] = rust_int(value)
        except AssertionError:
            pass
    return found


def struct_fields(src: str, name: str) -> list[str]:
    body = re.search(r"pub struct " + name + r" \{(.*?)\n\}", src, re.S).group(1)
    return re.findall(r"pub (\w+):", body)


def mod_block(src: str, name: str) -> str:
    return re.search(r"pub mod " + name + r" \{(.*?)\n\}", src, re.S).group(1)


def test_boot_info_fields_in_host_order(source):
    assert struct_fields(source, "BootInfo") == [f for f, _ in abi.BootInfo._fields_]


def test_report_header_fields(source):
    assert struct_fields(source, "ReportHeader") == [f for f, _ in abi.ReportHeader._fields_]


def test_constants_match(source):
    c = consts(source)
    assert c["BOOT_INFO_MAGIC"] == abi.BOOT_INFO_MAGIC
    assert c["BOOT_INFO_VERSION"] == abi.BOOT_INFO_VERSION
    assert c["REPORT_MAGIC"] == abi.REPORT_MAGIC
    assert c["REPORT_MAX_PAYLOAD"] == abi.REPORT_MAX_PAYLOAD
    assert c["BOOT_FLAG_DIRECT_MAP_1G"] == abi.BOOT_FLAG_DIRECT_MAP_1G


def test_ports_match(source):
    p = consts(mod_block(source, "port"))
    assert p["COM1_THR"] == abi.COM1_BASE
    assert p["COM1_LSR"] == abi.COM1_BASE + 5
    assert p["EXIT"] == abi.EXIT_PORT
    assert p["REPORT"] == abi.REPORT_PORT


def test_exit_codes_match(source):
    e = consts(mod_block(source, "exit"))
    assert e == {
        "SUCCESS": abi.ExitCode.SUCCESS,
        "TEST_FAILURE": abi.ExitCode.TEST_FAILURE,
        "PANIC": abi.ExitCode.PANIC,
        "STACK_OVERFLOW": abi.ExitCode.STACK_OVERFLOW,
        "FAULT": abi.ExitCode.GUEST_FAULT,
    }


def test_report_kinds_match(source):
    body = re.search(r"pub enum ReportKind \{(.*?)\}", source, re.S).group(1)
    guest = {name: int(v) for name, v in re.findall(r"(\w+) = (\d+)", body)}
    host = {k.name.replace("_", "").lower(): int(k) for k in abi.ReportKind}
    assert {k.lower(): v for k, v in guest.items()} == host


def test_backends_match(source):
    body = re.search(r"pub enum Backend \{(.*?)\}", source, re.S).group(1)
    guest = {name.upper(): int(v) for name, v in re.findall(r"(\w+) = (\d+)", body)}
    assert guest == {b.name: int(b) for b in abi.Backend}
