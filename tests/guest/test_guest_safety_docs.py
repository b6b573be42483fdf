"""Every `unsafe fn` in the guest states its caller's obligations.

The guest is built by Debian's rustc for `x86_64-unknown-none` with
`-Z build-std`; clippy (whose `missing_safety_doc` lint this mirrors) exists
here only in rustup's toolchains, which carry no library source to build
`core` for that target offline. So the check reads the sources: the doc
comment right above each `unsafe fn` (attributes may sit between) must have
a `# Safety` section, as rustdoc and clippy expect it.
"""

from __future__ import annotations

import re
from pathlib import Path

GUEST_SRC = Path(__file__).resolve().parents[2] / "guest" / "src"

# A declaration, not a function-pointer type (`unsafe fn(u64)` has no name).
UNSAFE_FN = re.compile(r'^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?unsafe\s+(?:extern\s+"[^"]*"\s+)?fn\s+(\w+)')
SAFETY_HEADING = re.compile(r"^\s*///\s*#\s+Safety\s*$")


def missing_safety_docs(text: str) -> list[tuple[int, str]]:
    """(line number, name) of each `unsafe fn` in `text` whose doc comment
    lacks a `# Safety` heading."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = UNSAFE_FN.match(line)
        if not m:
            continue
        j = i - 1
        # Attributes between the doc comment and the item, one line each.
        while j >= 0 and lines[j].strip().startswith("#[") and lines[j].rstrip().endswith("]"):
            j -= 1
        has_heading = False
        while j >= 0 and lines[j].strip().startswith("///"):
            has_heading |= bool(SAFETY_HEADING.match(lines[j]))
            j -= 1
        if not has_heading:
            missing.append((i + 1, m.group(1)))
    return missing


def test_every_guest_unsafe_fn_has_a_safety_section():
    sources = sorted(GUEST_SRC.rglob("*.rs"))
    assert sources, GUEST_SRC
    found = 0
    bad = []
    for path in sources:
        text = path.read_text()
        found += sum(1 for line in text.splitlines() if UNSAFE_FN.match(line))
        bad += [f"{path.relative_to(GUEST_SRC)}:{n}: unsafe fn {name}" for n, name in missing_safety_docs(text)]
    assert found > 0, "no unsafe fn found: the pattern no longer matches the sources"
    assert not bad, "unsafe fn without a `/// # Safety` section:\n" + "\n".join(bad)


def test_check_flags_a_missing_section():
    src = """
/// Zeroes memory.
pub unsafe fn zero(p: *mut u8) {}

/// Reads a port.
///
/// # Safety
/// The port must be safe to read.
#[inline]
pub unsafe fn inb(port: u16) -> u8 { 0 }

#[inline(always)]
unsafe fn bare() {}

/// # Safety
/// Obligation of an earlier item, separated by code.
fn safe() {}
pub(crate) const unsafe fn later() {}

/// The section must be a heading, not a word in prose: Safety first.
unsafe extern "C" fn entry() {}

struct S { f: unsafe fn(u64) }
"""
    assert missing_safety_docs(src) == [(3, "zero"), (13, "bare"), (18, "later"), (21, "entry")]
