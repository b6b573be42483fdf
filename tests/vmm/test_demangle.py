"""Symbol names through binutils' c++filt (vmm.demangle)."""

from __future__ import annotations

import re

import pytest

from vmm.demangle import cxxfilt_path, demangle, demangle_all, is_mangled
from vmm.elf import Symbol, Symbolizer

needs_cxxfilt = pytest.mark.skipif(cxxfilt_path() is None, reason="c++filt (binutils) is not installed; setup.sh installs it")


@needs_cxxfilt
def test_every_guest_symbol_demangles(guest_image):
    """Each mangled symbol of the guest comes back readable: no mangling left,
    brackets balanced, no crate hashes, and names are unique where the
    mangled ones were (no two functions collapse into one name by accident,
    beyond generic instances that really share a path)."""
    mangled = [s.name for s in guest_image.symbols if is_mangled(s.name)]
    assert len(mangled) > 100, "the guest should have a few hundred Rust symbols"
    out = demangle_all(mangled)
    raw = [(m, d) for m, d in zip(mangled, out) if d == m or is_mangled(d)]
    assert not raw, f"{len(raw)} of {len(mangled)} symbols left mangled, e.g. {raw[:3]}"
    for d in out:
        assert d.count("<") == d.count(">"), d
        assert d.count("[") == d.count("]"), d
        assert not re.search(r"\[[0-9a-f]{16}\]", d), d
        assert "::" in d or d.isidentifier(), d


@needs_cxxfilt
def test_trait_impl_reads_as_rust():
    # <kernel::memory::heap::KernelAllocator as core::alloc::global::GlobalAlloc>::dealloc, v0-mangled by rustc 1.96
    v0 = "_RNvXs1_NtNtCsbsDnxlzKwrt_6kernel6memory4heapNtB5_15KernelAllocatorNtNtNtCs5VRQ8JxYsY3_4core5alloc6global11GlobalAlloc7dealloc"
    assert demangle(v0) == "<kernel::memory::heap::KernelAllocator as core::alloc::global::GlobalAlloc>::dealloc"
    # legacy scheme: hash suffix dropped
    assert demangle("_ZN4core3fmt5write17h0123456789abcdefE") == "core::fmt::write"


def test_plain_names_pass_through_without_cxxfilt(monkeypatch):
    monkeypatch.setattr("vmm.demangle.cxxfilt_path", lambda: None)
    assert demangle_all(["kmain", "_RNvCs1_6kernel5kmain"]) == ["kmain", "_RNvCs1_6kernel5kmain"]


@needs_cxxfilt
def test_symbolizer_demangles_only_when_asked():
    syms = [Symbol("_RNvCsbsDnxlzKwrt_6kernel5kmain", 0x1000, 0x40), Symbol("plain", 0x2000, 0)]
    sz = Symbolizer(syms, slide=0x200000)
    assert sz._names is None  # nothing demangled at construction (boot path)
    assert sz.lookup(0x201010) == "kernel::kmain+0x10"
    assert sz.resolve(0x201000) == ("kernel::kmain", 0, 0x201000)
    assert sz.lookup(0x201040) is None  # past the symbol's size
    assert sz.lookup(0x202abc) == "plain+0xabc"
